"""Attach peft adapters by ``peft.method``: lora, dora, prompt_tuning, prefix_tuning (none: full FT)."""

from __future__ import annotations

from polmctl.config.schema import PeftConfig


def peft_config(cfg: PeftConfig, tokenizer=None, model_path: str | None = None):
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType

    if cfg.method in ("lora", "dora"):
        targets = cfg.target_modules[0] if list(cfg.target_modules) == ["all-linear"] else list(cfg.target_modules)
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=targets, use_dora=cfg.method == "dora", use_rslora=cfg.use_rslora)
    if cfg.method == "prompt_tuning":
        if cfg.prompt_init_text:
            return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens,
                                      prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=cfg.prompt_init_text,
                                      tokenizer_name_or_path=model_path or tokenizer.name_or_path)
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)
    if cfg.method == "prefix_tuning":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)
    raise ValueError(f"peft.method={cfg.method!r} has no adapter")


def apply_peft(model, cfg: PeftConfig, tokenizer=None):
    """Wrap ``model`` with the configured adapter; with ``none`` every parameter trains."""
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):  # a run dir's adapter, loaded trainable: continue training it
        return model
    if cfg.method == "none":
        for p in model.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
        return model
    return get_peft_model(model, peft_config(cfg, tokenizer, getattr(model, "name_or_path", None)))


def trainable_parameter_summary(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
