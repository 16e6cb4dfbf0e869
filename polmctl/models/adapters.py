"""Attach peft adapters by ``peft.method``: lora, dora, prompt_tuning, prefix_tuning, and the rest of
peft's family for causal LMs (ia3, vera, loha, lokr, oft, boft, adalora, ln_tuning; built by
polmctl/models/peft_variants.py, which also holds LoRA's initialisations). none: full fine-tuning.

    polmctl run recipe=lora peft.r=8 peft.target_modules=[q_proj,v_proj]
    polmctl run recipe=prompt_tuning peft.prompt_init_text="Answer with the number only."
    polmctl run recipe=lora peft=adalora          # any adapter type on the LoRA recipe's data and budget

Known limit (transformers 5.24 + peft 0.21.2): training forward/backward of prompt and
prefix tuning is right, but ``PeftModel.generate`` is not. transformers renamed the
generation cache kwarg ``past_key_values`` to ``cache``; peft's
``PeftModelForCausalLM.prepare_inputs_for_generation`` still reads and writes
``past_key_values``, so it re-injects the soft prompt at every decoding step (prompt
tuning with a KV cache) and hands the prefix as ``past_key_values`` next to generate's own
``cache``, which the model's ``deprecate_kwarg`` keeps while dropping the prefix (prefix
tuning, with or without a KV cache from the second step on). See the tests in
tests/models/test_adapters.py. ``polmctl.rollout.generate`` (used by every eval and
sampler) decodes prompt-learning models with its own loop instead, so polmctl is unaffected.
"""

from __future__ import annotations

from polmctl.config.schema import PEFT_METHODS, PeftConfig
from polmctl.errors import ModelError
from polmctl.models import peft_variants

METHODS = PEFT_METHODS


def peft_config(cfg: PeftConfig, tokenizer=None, model=None, total_steps: int | None = None):
    """The peft config object for ``cfg.method`` (not ``none``); ``total_steps`` is AdaLoRA's schedule."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType

    from polmctl.models.load import head_of

    # SEQ_CLS / TOKEN_CLS make peft keep a reward model's (a PRM's) fresh score head trainable (modules_to_save).
    tasks = {"reward": TaskType.SEQ_CLS, "prm": TaskType.TOKEN_CLS}
    task = tasks.get(head_of(model), TaskType.CAUSAL_LM) if model is not None else TaskType.CAUSAL_LM
    if cfg.method in ("lora", "dora"):
        targets = "all-linear" if list(cfg.target_modules) == ["all-linear"] else list(cfg.target_modules)
        return LoraConfig(
            task_type=task,
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=targets,
            use_dora=cfg.method == "dora",
            use_rslora=cfg.use_rslora,
            # peft 0.21's token-classification model names its head (classifier / score) only after
            # placing LoRA, so all-linear would adapt the fresh head and then fail to train it whole.
            modules_to_save=["classifier", "score"] if task == TaskType.TOKEN_CLS else None,
            **peft_variants.lora_options(cfg, weights_known=model is None or not _on_meta(model)),
        )
    if cfg.method == "prompt_tuning":
        if not cfg.prompt_init_text:
            return PromptTuningConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens)
        # peft tokenizes the init text itself, loading the tokenizer from this name or dir.
        source = getattr(tokenizer, "name_or_path", None) or getattr(model, "name_or_path", None)
        if not source:
            raise ModelError("peft.prompt_init_text needs the model's tokenizer: pass it to apply_peft")
        return PromptTuningConfig(
            task_type=task,
            num_virtual_tokens=cfg.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text=cfg.prompt_init_text,
            tokenizer_name_or_path=source,
        )
    if cfg.method == "prefix_tuning":
        return PrefixTuningConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens)
    if cfg.method in METHODS and cfg.method != "none":
        return peft_variants.variant_config(cfg, task, total_steps)
    raise ModelError(f"peft.method={cfg.method!r} is not an adapter; use one of {', '.join(METHODS)}")


def _adapter_method(model) -> str:
    """The peft.method name of a PeftModel's active adapter."""
    config = model.active_peft_config
    kind = getattr(config.peft_type, "value", str(config.peft_type)).lower()
    if kind == "lora":
        return "dora" if getattr(config, "use_dora", False) else "lora"
    return kind


def _on_meta(model) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def _linear_names(model) -> list[str]:
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def apply_peft(model, cfg: PeftConfig, tokenizer=None, *, examples=None, total_steps: int | None = None):
    """``model`` with the adapter of ``cfg.method`` attached; only adapter parameters train.

    ``examples`` (encoded training rows) feed peft.init=eva; ``total_steps`` (trainer.max_steps) is
    AdaLoRA's budget schedule, whose hook ``peft_variants.step_hooks`` gives the trainer.

    ``none`` returns the model itself with every parameter trainable (full fine-tuning).
    A model that already carries a peft adapter (loaded from an adapter dir) is returned as
    it is, so training continues that adapter; its method must match ``cfg.method``.

    Every trainable parameter comes back float32, whatever the weights' dtype (a bf16 model
    computes in bf16: models/precision.py ``float32_trainables``).
    """
    from peft import PeftModel, get_peft_model

    from polmctl.models.fused_lora import fuse_lora_layers
    from polmctl.models.precision import float32_trainables

    if cfg.method not in METHODS:
        raise ModelError(f"peft.method={cfg.method!r} is unknown; use one of {', '.join(METHODS)}")
    if isinstance(model, PeftModel):
        loaded = _adapter_method(model)
        if loaded != cfg.method:
            raise ModelError(
                f"the model already carries a {loaded} adapter but peft.method={cfg.method}; set "
                f"peft.method={loaded} to continue training it, or start from a merged or base model"
            )
        fuse_lora_layers(model)
        float32_trainables(model)
        return model
    if cfg.method == "none":
        if getattr(model, "is_quantized", False):
            raise ModelError(
                "full fine-tuning (peft.method=none) cannot update quantized weights; use "
                "peft.method=lora (QLoRA) or model.quantization=none"
            )
        for p in model.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
        float32_trainables(model)  # a bf16 model: float32 weights, bf16 compute under autocast
        return model
    try:
        on_meta = _on_meta(model)  # built to count parameters: no weights, nothing to initialise from
        config = peft_config(cfg, tokenizer, model, total_steps)
        # EVA fills A and B from data right after: peft builds them without initialising first.
        adapted = get_peft_model(model, config, low_cpu_mem_usage=getattr(config, "init_lora_weights", 0) == "eva")
    except ValueError as err:
        message = str(err).lower()
        if "target modules" in message or "target_modules" in message:
            raise ModelError(
                f"peft.target_modules={list(cfg.target_modules)} matches no layer of the model; "
                f"linear layers: {', '.join(_linear_names(model))}, or use [all-linear]"
            ) from None
        if "gradient checkpointing" in message:
            raise ModelError(
                f"peft.method={cfg.method} does not work with model.gradient_checkpointing=true "
                "(peft refuses it); set model.gradient_checkpointing=false"
            ) from None
        raise ModelError(f"peft.method={cfg.method}: {str(err).strip().splitlines()[0]}") from err
    if not on_meta:
        pad = getattr(tokenizer, "pad_token_id", None)
        peft_variants.after_get_peft_model(adapted, cfg, examples=examples, pad_token_id=pad)
    fuse_lora_layers(adapted)  # LoRA's update added inside the matmul (models/fused_lora.py)
    float32_trainables(adapted)  # what peft leaves in bf16: a copied score head, LN tuning's norms
    return adapted


def trainable_parameter_summary(model) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; 4-bit weights are counted unpacked, as peft does."""
    if hasattr(model, "get_nb_trainable_parameters"):  # a PeftModel knows its packed 4-bit params
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":  # two 4-bit values per stored byte
            n *= 2 * p.element_size()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
