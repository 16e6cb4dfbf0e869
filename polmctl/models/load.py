"""Load a tokenizer and a causal LM from builtin:<name>, a hub id, a local dir or a run dir.

    polmctl run recipe=lora model.name_or_path=HuggingFaceTB/SmolLM2-360M-Instruct
    polmctl run recipe=qlora model.quantization=nf4 model.dtype=bfloat16
    polmctl eval outputs/lora/2026-11-24/10-00-00       # a run dir loads its final/

A dir holding a peft adapter (adapter_config.json) loads the base model it names, then
attaches the adapter. Quantization (bitsandbytes nf4 / fp4 / int8) works on CPU and CUDA.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from polmctl.config.schema import ModelConfig
from polmctl.errors import ModelError
from polmctl.models.builtin import BUILTIN_MODELS, materialise_builtin
from polmctl.models.hub import hub_or_cache
from polmctl.models.precision import (
    AUTO_DTYPES,
    LOW_PRECISION,
    choose_dtype,
    contiguous_head_input,
    no_cudnn_attention,
    say_dtype_choice,
)
from polmctl.models.replaced import is_replaced_dir, load_replaced

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# What a failing library call raises for a missing, unreachable or malformed model.
LOAD_ERRORS = (OSError, ValueError)


def resolve_model_path(name_or_path: str, cache_dir: str | None = None) -> str:
    """builtin:<name> -> its cache dir; a run dir -> its final/; a model dir or hub id (org/name) as is."""
    if name_or_path.startswith("builtin:"):
        return str(materialise_builtin(name_or_path.split(":", 1)[1], cache_dir))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "final").is_dir():  # a polmctl run dir
            return str(path / "final")
        if (path / "config.json").exists() or (path / "adapter_config.json").exists():
            return str(path)
        checkpoint = checkpoint_hint(path)
        if checkpoint:
            raise ModelError(checkpoint)
        hint = " (a run dir without final/: the run has not finished)" if (path / "checkpoints").is_dir() else ""
        raise ModelError(
            f"{name_or_path} holds no model{hint}: no config.json, adapter_config.json or final/; "
            "point model.name_or_path at a model dir, a finished run dir, a hub id or builtin:<name>"
        )
    if path.exists():
        raise ModelError(
            f"{name_or_path} is a file, not a model dir; point model.name_or_path at the dir that "
            "holds config.json (or adapter_config.json)"
        )
    if HUB_ID.match(name_or_path):
        return name_or_path
    raise ModelError(
        f"model {name_or_path!r} not found: no such local dir, and not a hub id (org/name) or "
        f"builtin:<name> ({', '.join('builtin:' + n for n in BUILTIN_MODELS)})"
    )


def checkpoint_hint(path: Path) -> str | None:
    """For a training checkpoint (checkpoints/step-N: trained weights and trainer state, no model
    config), the one line that says how to make it a model dir; None for anything else."""
    path = Path(path).expanduser()
    named = path.parent.name == "checkpoints" and re.fullmatch(r"step-\d+", path.name)
    if not path.is_dir() or not (named or (path / "trainable.safetensors").is_file()):
        return None
    return (
        f"{path} is a training checkpoint (trained weights and trainer state), not a model dir; make "
        f"one with `polmctl export {path} --out exported/{path.name}` (add --merge-adapters for a LoRA "
        f"run) and use exported/{path.name}"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _call(fn, name: str, what: str, **kwargs):
    """``fn(name, **kwargs)``, with a failure turned into one ModelError line naming ``name``; a hub id
    when the hub cannot be reached loads from the local cache or fails at once (models/hub.py)."""
    if not Path(name).expanduser().exists() and HUB_ID.match(name):
        name = hub_or_cache(name, what, kwargs.get("revision"))
    try:
        return fn(name, **kwargs)
    except LOAD_ERRORS as err:
        if Path(name).expanduser().exists():
            raise ModelError(f"cannot load the {what} from {name}: {_first_line(err)}") from err
        raise ModelError(
            f"cannot load {name!r} ({what}) from the Hugging Face hub: {_first_line(err)} "
            "Check the id and the network, or use a local dir or builtin:smollm2-135m "
            "(set HF_HUB_OFFLINE=1 to fail at once without a hub)"
        ) from err


def adapter_base(path: str, cache_dir: str | None) -> str | None:
    """The resolved base model of the peft adapter in ``path``, or None if ``path`` holds no adapter."""
    adapter = Path(path) / "adapter_config.json"
    if not adapter.is_file():
        return None
    try:
        base = json.loads(adapter.read_text())["base_model_name_or_path"]
    except (ValueError, KeyError) as err:
        raise ModelError(f"{adapter} is not a peft adapter config ({err}); re-save the adapter") from None
    if not base:
        raise ModelError(f"{adapter} names no base_model_name_or_path; set it to the base model's dir or hub id")
    # relative to the adapter dir (recipe=quantize method.adapter=keep writes ./base)
    if base.startswith(("./", "../")):
        base = str((Path(path) / base).resolve())
    try:
        return resolve_model_path(base, cache_dir)
    except ModelError as err:
        raise ModelError(
            f"the adapter in {path} needs its base model {base!r}, which cannot be found ({err}); "
            "restore that dir or edit base_model_name_or_path in adapter_config.json"
        ) from None


def _read_chat_template(value: str) -> str:
    """model.chat_template is inline Jinja or the path of a file that holds it."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ModelError(
            f"model.chat_template={value!r} is neither a Jinja template nor an existing file; "
            "give the template text or the path of a .jinja file"
        )
    return path.read_text()


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer with a pad token, right padding, and ``cfg.chat_template`` if given."""
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.name_or_path, cfg.cache_dir)
    # An adapter dir normally carries the tokenizer (save_model writes it); if not, use its base's.
    base = adapter_base(path, cfg.cache_dir)
    if base is not None and not (Path(path) / "tokenizer_config.json").exists():
        path = base
    tok = _call(
        AutoTokenizer.from_pretrained, path, "tokenizer", trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
    )
    if cfg.chat_template:
        tok.chat_template = _read_chat_template(cfg.chat_template)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(
                f"the tokenizer of {cfg.name_or_path} has neither a pad nor an eos token; "
                "use a model whose tokenizer defines an eos token"
            )
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"  # training pads right; generation switches to left itself
    return tok


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """model.dtype -> torch dtype; auto is bfloat16 where the hardware computes it fast (CUDA compute
    capability >= 8.0, a CPU with AVX512-BF16 or AMX-BF16), else float32; auto_gpu (the default) the
    same on GPUs, float32 on CPUs (models/precision.py)."""
    return choose_dtype(name, torch.device(device))[0]


def _check_device(device: torch.device) -> torch.device:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {device} was asked for but CUDA is not available here; use trainer.device=cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def quantization_config(cfg: ModelConfig, device: torch.device):
    """A transformers BitsAndBytesConfig for ``cfg.quantization`` on ``device``, or None for none."""
    if cfg.quantization == "none":
        return None
    try:
        import bitsandbytes
        from transformers import BitsAndBytesConfig
    except (ImportError, RuntimeError, OSError) as err:  # missing, or its native library does not load
        raise ModelError(
            f"model.quantization={cfg.quantization} needs a working bitsandbytes "
            f"({_first_line(err)}): pip install -U bitsandbytes, or set model.quantization=none"
        ) from None
    supported = getattr(bitsandbytes, "supported_torch_devices", {"cpu", "cuda"})
    if device.type not in supported:
        raise ModelError(
            f"model.quantization={cfg.quantization}: bitsandbytes {bitsandbytes.__version__} does not "
            f"run on {device.type} (it runs on {', '.join(sorted(supported))}); "
            "use another device or model.quantization=none"
        )
    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if device.type == "cuda":
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        compute = torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quantization,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_use_double_quant=cfg.double_quant,
    )


def _enable_checkpointing(model) -> None:
    """Activation checkpointing (non-reentrant) with input grads on, so frozen-base adapters get gradients."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


HEADS = ("causal_lm", "reward", "prm")
# The head of each kind of model, by the end of its class name and the task type of its peft adapter.
HEAD_CLASSES = {"reward": ("ForSequenceClassification", "SEQ_CLS"), "prm": ("ForTokenClassification", "TOKEN_CLS")}
PRM_LABELS = {0: "wrong", 1: "correct"}  # a process reward model's two labels per step (TRL: LABEL_1 is correct)


def model_head(path: str) -> str:
    """``reward`` if the model dir (or adapter dir) at ``path`` holds a sequence-classification
    model (a reward model), ``prm`` if a token-classification one (a process reward model), else
    ``causal_lm``; hub ids count as causal LMs."""

    def read(name: str) -> dict:  # a malformed file is reported by the loader, with its name
        try:
            return json.loads((Path(path) / name).read_text())
        except (OSError, ValueError):
            return {}

    architectures = read("config.json").get("architectures") or []
    task_type = read("adapter_config.json").get("task_type")
    for head, (suffix, task) in HEAD_CLASSES.items():
        if task_type == task or any(a.endswith(suffix) for a in architectures):
            return head
    return "causal_lm"


def head_of(model) -> str:
    """The head of a loaded model (or peft model): causal_lm | reward | prm."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    return next((head for head, (suffix, _) in HEAD_CLASSES.items() if name.endswith(suffix)), "causal_lm")


def is_reward_model(model) -> bool:
    return head_of(model) == "reward"


def load_model(
    cfg: ModelConfig,
    *,
    device: torch.device | str = "cpu",
    for_training: bool = True,
    head: str | None = None,
    pad_token_id: int | None = None,
):
    """A causal LM on ``device``, in train mode if ``for_training`` else in eval mode with no grads.

    ``head="reward"`` loads a sequence-classification model with one scalar output (a reward
    model; from a causal LM its score head starts untrained) and sets its ``pad_token_id``,
    which its pooling uses to find each row's last token. ``head="prm"`` loads a
    token-classification model with two labels per token (wrong, correct: a process reward
    model, TRL PRMTrainer's model). ``None`` takes the head the model dir was saved with.

    A dir holding a peft adapter loads the base model it names and attaches the adapter
    (trainable if ``for_training``). A quantized base that is trained goes through
    ``peft.prepare_model_for_kbit_training``.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

    device = _check_device(torch.device(device))
    path = resolve_model_path(cfg.name_or_path, cfg.cache_dir)
    head = head or model_head(path)
    if head not in HEADS:
        raise ModelError(f"unknown model head {head!r}; use one of {', '.join(HEADS)}")
    base_path = adapter_base(path, cfg.cache_dir)
    dtype, why = choose_dtype(cfg.dtype, device)
    if cfg.dtype in AUTO_DTYPES:
        say_dtype_choice(cfg.dtype, dtype, why)
    quant = quantization_config(cfg, device)
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": device})
    try:
        if head == "reward":
            kwargs["num_labels"] = 1
            if pad_token_id is not None:
                kwargs["pad_token_id"] = pad_token_id
        if head == "prm":
            kwargs.update(id2label=PRM_LABELS, label2id={v: k for k, v in PRM_LABELS.items()})
        autos = {"reward": AutoModelForSequenceClassification, "prm": AutoModelForTokenClassification}
        auto = autos.get(head, AutoModelForCausalLM)
        if is_replaced_dir(base_path or path):  # low-rank factors, HQQ / torchao int4 layers (models/replaced.py)
            model = load_replaced(
                base_path or path, dtype=dtype, device=device, head=head, quantization=cfg.quantization
            )
        else:
            model = _call(auto.from_pretrained, base_path or path, "model", **kwargs)
    except ImportError as err:  # e.g. attn_implementation=flash_attention_2 without flash-attn
        raise ModelError(f"cannot load {cfg.name_or_path}: {_first_line(err)}") from None
    if quant is None:
        model.to(device)
    if dtype in LOW_PRECISION:
        contiguous_head_input(model)  # no batched matmul against a copied LM head (its docstring)
        if device.type == "cpu":
            from polmctl.models.packed_attention import use_packed_attention

            use_packed_attention(model)  # float32 attention where bf16's CPU backward is slow (its docstring)
        elif device.type == "cuda":
            no_cudnn_attention()  # its per-shape graph builds cost more host time than the GPU work (its docstring)
    if for_training:
        if quant is not None:
            from peft import prepare_model_for_kbit_training

            # Checkpointing is switched on below, through transformers' current API.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if cfg.gradient_checkpointing:
            _enable_checkpointing(model)
    if base_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path, is_trainable=for_training)
    if for_training:
        model.train()
    else:
        model.eval()
        model.requires_grad_(False)
    return model


def load_model_and_tokenizer(cfg: ModelConfig, *, device: torch.device | str = "cpu", for_training: bool = True):
    """``(load_model(cfg, ...), load_tokenizer(cfg))``."""
    return load_model(cfg, device=device, for_training=for_training), load_tokenizer(cfg)
