"""Build a LLaVA-style vision-language model around a polmctl causal LM, load a saved one,
and set which parts train in each stage.

    polmctl run recipe=vlm_adapter                       # builds it: SmolLM2 + a random SigLIP encoder
    polmctl run recipe=vlm_adapter model.name_or_path=<vlm run dir> method.train=false   # loads it

The model is transformers' ``LlavaForConditionalGeneration``: vision tower (any transformers
vision model) -> ``LlavaMultiModalProjector`` (two linear layers) -> the projected patch
features replace the ``<image>`` placeholder tokens of the prompt in the LM's input
embeddings. The processor is a ``LlavaProcessor``, which expands one ``<image>`` in a prompt
into as many placeholders as the encoder yields patch features. Both save with
``save_pretrained`` and reload with ``from_pretrained`` (model_type ``llava``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from polmctl.config.schema import ModelConfig, PeftConfig
from polmctl.errors import ConfigError, ModelError
from polmctl.models import load_model, load_tokenizer, resolve_model_path

IMAGE_TOKEN = "<image>"


def is_vlm_dir(path: str | Path) -> bool:
    """True if ``path`` (a model dir) holds a saved LLaVA model."""
    config = Path(path) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("model_type") == "llava"
    except ValueError:
        return False


def load_vlm(model_cfg: ModelConfig, *, device: torch.device | str = "cpu", for_training: bool = False):
    """``(model, processor)`` from a saved VLM dir or a vlm_adapter run dir (its final/)."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    path = resolve_model_path(model_cfg.name_or_path, model_cfg.cache_dir)
    if not is_vlm_dir(path):
        raise ModelError(
            f"{model_cfg.name_or_path} holds no vision-language model (no config.json with "
            "model_type llava); give a vlm_adapter run dir or its final/"
        )
    try:
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=_dtype(model_cfg, device))
        processor = LlavaProcessor.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot load the vision-language model in {path}: {str(err).strip().splitlines()[0]}"
        ) from None
    model.to(device)
    model.train(for_training)
    _with_pad_token(processor.tokenizer)
    return model, processor


def build_vlm(model_cfg: ModelConfig, method, *, device: torch.device | str = "cpu"):
    """``(model, processor)``: the LM of ``model_cfg`` with a vision tower and a fresh projector.

    The LM's own modules are moved into the LLaVA model (no copy); the tokenizer gains an
    ``<image>`` token (its embedding row is only a placeholder, overwritten by image features).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    tokenizer = load_tokenizer(model_cfg)
    lm = load_model(model_cfg, device=device, for_training=True, head="causal_lm", pad_token_id=tokenizer.pad_token_id)
    if hasattr(lm, "peft_config") or getattr(lm, "is_quantized", False):
        raise ConfigError(
            "model.name_or_path",
            f"{model_cfg.name_or_path} is an adapter dir or quantized; the "
            "vlm recipe builds on a full-precision causal LM (merge the adapter "
            "first, e.g. peft.merge_on_save=true, or use its base)",
        )
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer))
    vision, image_processor = _vision_encoder(method)
    extra_tokens, n_patches = _feature_layout(vision, image_processor)
    strategy = "default" if extra_tokens == 1 else "full"  # "default" drops a leading CLS token (CLIP)
    if extra_tokens not in (0, 1):
        raise ModelError(
            f"the vision model yields {extra_tokens} tokens besides its {n_patches} patches; "
            "LLaVA supports 0 (SigLIP) or 1 (a CLS token, CLIP)"
        )
    layer = method.vision_feature_layer
    if layer >= 0:
        # Stored as a negative index: transformers 5.24's select_hidden_states reads layer 0 as
        # "no hidden states wanted" (a falsy output_hidden_states) and the forward pass fails.
        layer -= vision.config.num_hidden_layers + 1
    config = LlavaConfig(
        vision_config=vision.config,
        text_config=lm.config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=n_patches,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=layer,
        projector_hidden_act=method.projector_act,
    )
    # Built on the meta device: every submodule is replaced below, so nothing is initialised twice.
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.multi_modal_projector = LlavaMultiModalProjector(config)
    model.model.language_model = lm.get_decoder()
    model.lm_head = lm.get_output_embeddings()
    model.generation_config = lm.generation_config
    model.to(device=device, dtype=lm.dtype)
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ModelError(f"building the vision-language model left parameters uninitialised: {', '.join(meta[:3])}")
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra_tokens,
        image_token=IMAGE_TOKEN,
        chat_template=tokenizer.chat_template,
    )
    _with_pad_token(tokenizer)
    return model, processor


def _vision_encoder(method):
    """``(vision model, image processor)``: pretrained from ``method.vision_model``, else a random SigLIP."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, SiglipVisionConfig
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    if method.vision_model is None:
        config = SiglipVisionConfig(
            hidden_size=method.vision_hidden_size,
            intermediate_size=4 * method.vision_hidden_size,
            num_hidden_layers=method.vision_layers,
            num_attention_heads=method.vision_heads,
            image_size=method.image_size,
            patch_size=method.patch_size,
        )
        size = {"height": method.image_size, "width": method.image_size}
        return AutoModel.from_config(config), SiglipImageProcessorPil(size=size)
    name = method.vision_model
    try:
        config = AutoConfig.from_pretrained(name)
        # A two-tower checkpoint (CLIP, SigLIP) holds the vision tower's config inside its own.
        vision_config = getattr(config, "vision_config", None) or config
        vision = AutoModel.from_pretrained(name, config=vision_config)
        image_processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot load method.vision_model={name!r}: {str(err).strip().splitlines()[0]}; give a "
            "hub id that is reachable or a local dir holding a vision model and its image "
            "processor, or leave it unset for a random encoder"
        ) from None
    if not hasattr(vision.config, "patch_size"):
        raise ModelError(
            f"method.vision_model={name!r} is a {type(vision).__name__}, not a ViT-style patch "
            "encoder (no patch_size); use a SigLIP or CLIP vision model"
        )
    return vision, image_processor


@torch.no_grad()
def _feature_layout(vision, image_processor) -> tuple[int, int]:
    """``(extra tokens, patches)`` the encoder yields for one processed picture, measured, not assumed."""
    from PIL import Image

    pixels = image_processor(images=[Image.new("RGB", (64, 64))], return_tensors="pt")["pixel_values"]
    height, width = pixels.shape[-2:]
    patch = vision.config.patch_size
    patches = (height // patch) * (width // patch)
    tokens = vision(pixel_values=pixels.to(vision.dtype)).last_hidden_state.shape[1]
    return tokens - patches, patches


def _dtype(model_cfg: ModelConfig, device) -> torch.dtype:
    from polmctl.models.load import resolve_dtype

    return resolve_dtype(model_cfg.dtype, torch.device(device))


def _with_pad_token(tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # training pads right; evaluation switches to left itself


def set_stage(model, stage: int, *, train_vision: bool) -> None:
    """Which parameters train: stage 1 the projector (and the encoder with ``train_vision``);
    stage 2 also the LM's adapters (added by ``add_lm_adapters``) -- everything else is frozen."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, p in model.named_parameters():
        p.requires_grad_(stage == 2 and "lora_" in name)
    base.model.multi_modal_projector.requires_grad_(True)
    if train_vision:
        base.model.vision_tower.requires_grad_(True)


def add_lm_adapters(model, peft: PeftConfig):
    """``model`` wrapped by peft with ``peft.method`` (lora | dora) on the language model's linear layers only."""
    from peft import LoraConfig, get_peft_model

    if peft.method not in ("lora", "dora"):
        raise ConfigError(
            "peft.method",
            f"stage 2 of the vlm recipe tunes the LM with lora or dora, got "
            f"{peft.method!r}; use peft=lora, or method.stage1_fraction=1.0 to skip it",
        )
    wanted = None if list(peft.target_modules) == ["all-linear"] else set(peft.target_modules)
    targets = [
        f"model.language_model.{name}"
        for name, module in model.model.language_model.named_modules()
        if isinstance(module, torch.nn.Linear) and (wanted is None or name.rsplit(".", 1)[-1] in wanted)
    ]
    if not targets:
        raise ConfigError(
            "peft.target_modules",
            f"{list(peft.target_modules)} matches no linear layer of the "
            "language model; use [all-linear] or e.g. [q_proj,v_proj]",
        )
    config = LoraConfig(
        r=peft.r,
        lora_alpha=peft.alpha,
        lora_dropout=peft.dropout,
        target_modules=targets,
        use_dora=peft.method == "dora",
        use_rslora=peft.use_rslora,
    )
    return get_peft_model(model, config)
