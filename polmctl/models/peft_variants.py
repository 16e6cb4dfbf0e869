"""The peft family beyond LoRA/DoRA and prompt learning, and LoRA's own variants: what
``polmctl.models.adapters`` hands to peft for each ``peft.method`` / ``peft.init``, and what
a run needs around them.

    polmctl run recipe=lora peft=ia3              # or vera, loha, lokr, oft, boft, adalora, ln_tuning
    polmctl run recipe=lora peft.init=pissa       # olora, eva, gaussian, pissa_niter_4; loftq on CUDA
    polmctl run recipe=lora "peft.rank_pattern={q_proj: 4, down_proj: 32}"

Around peft itself:
  - AdaLoRA moves its rank budget as training goes: ``AdaLoraBudget`` calls peft's
    ``update_and_allocate(step)`` after every optimizer step, through the trainer's after_step hooks
    (installed by the train runner, the one place hooks come from). peft adds AdaLoRA's
    orthogonality penalty only to a loss the model computes from ``labels``; polmctl's objectives
    compute theirs from the logits, so ``AdaLoraOrthogonality`` computes the same term and the trainer
    adds it to every step (``peft.adalora_orth_reg_weight``).
  - PiSSA and OLoRA move the top singular directions of W out of the base weights into the adapter.
    The adapter as trained only fits that residual base, so ``initial_adapter`` keeps its starting
    weights and ``models.save`` writes final/ as the plain LoRA update from the original base
    (peft's ``path_initial_model_for_weight_conversion``: rank 2r, ``AB - A0B0``).
  - EVA starts A from the SVD of the layer inputs over the first training rows (peft's
    ``initialize_lora_eva_weights``), moving rank to the layers that need it.
  - LoftQ quantizes W inside peft, which computes only on CUDA (peft/utils/loftq_utils.py); it
    replaces W by its 4-bit round trip, so final/ is written merged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from polmctl.config.schema import PeftConfig
from polmctl.errors import ConfigError, ModelError, TrainingError

EVA_ROWS = 64  # training rows whose layer inputs EVA's SVD sees
EVA_BATCH = 16
# peft cannot give these a bitsandbytes (quantized) base: no such layers, or an init that needs W itself.
NO_QUANTIZED_BASE = {"loha": "peft has no 4/8-bit LoHa layers", "lokr": "peft has no 4/8-bit LoKr layers"}


def targets(cfg: PeftConfig):
    return "all-linear" if list(cfg.target_modules) == ["all-linear"] else list(cfg.target_modules)


def adalora_schedule(cfg: PeftConfig, total_steps: int | None) -> dict[str, int]:
    """peft's AdaLoRA schedule in optimizer steps: warmup at rank r (tinit), pruning, final ranks (tfinal).
    Without ``total_steps`` (a model built only to load weights into or to count them) there is no schedule."""
    if total_steps is None:
        return {"total_step": 1, "tinit": 0, "tfinal": 0, "deltaT": 1}
    return {
        "total_step": total_steps,
        "tinit": int(cfg.adalora_warmup * total_steps),
        "tfinal": int(cfg.adalora_final * total_steps),
        "deltaT": cfg.adalora_interval,
    }


def variant_config(cfg: PeftConfig, task, total_steps: int | None):
    """The peft config of the adapter types past LoRA/DoRA and prompt learning."""
    import peft

    common = {"task_type": task, "target_modules": targets(cfg)}
    m = cfg.method
    if m == "ia3":
        return peft.IA3Config(**common, feedforward_modules=list(cfg.feedforward_modules) or None)
    if m == "vera":
        return peft.VeraConfig(**common, r=cfg.r, vera_dropout=cfg.dropout)
    if m in ("loha", "lokr"):
        kind = peft.LoHaConfig if m == "loha" else peft.LoKrConfig
        patterns = {"rank_pattern": dict(cfg.rank_pattern), "alpha_pattern": dict(cfg.alpha_pattern)}
        return kind(**common, r=cfg.r, alpha=cfg.alpha, **patterns)
    if m == "oft":
        return peft.OFTConfig(**common, r=0, oft_block_size=cfg.block_size)
    if m == "boft":
        return peft.BOFTConfig(**common, boft_block_size=cfg.block_size, boft_n_butterfly_factor=cfg.butterfly_factor)
    if m == "adalora":
        return peft.AdaLoraConfig(
            **common,
            init_r=cfg.r,
            target_r=cfg.adalora_target_r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            orth_reg_weight=cfg.adalora_orth_reg_weight,
            **adalora_schedule(cfg, total_steps),
        )
    if m == "ln_tuning":
        return peft.LNTuningConfig(**common)
    raise ModelError(f"peft.method={m!r} is not a peft variant polmctl builds")


def lora_options(cfg: PeftConfig, *, weights_known: bool) -> dict[str, Any]:
    """LoraConfig keywords for peft.init, rank_pattern and alpha_pattern. ``weights_known`` False (a
    model on the meta device, built to count parameters) keeps peft's default init: the shapes are
    the same and PiSSA/OLoRA/EVA need real weights or data."""
    options: dict[str, Any] = {"rank_pattern": dict(cfg.rank_pattern), "alpha_pattern": dict(cfg.alpha_pattern)}
    if cfg.init == "default" or not weights_known:
        return options
    if cfg.init == "eva":
        from peft import EvaConfig

        options.update(init_lora_weights="eva", eva_config=EvaConfig())
    elif cfg.init == "loftq":
        from peft import LoftQConfig

        options.update(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1))
    else:  # gaussian, pissa, pissa_niter_N, olora
        options["init_lora_weights"] = cfg.init
    return options


def rewrites_base(cfg: PeftConfig) -> bool:
    """PiSSA and OLoRA move part of W into the adapter: the base under the adapter is not the original."""
    return cfg.method == "lora" and (cfg.init.startswith("pissa") or cfg.init == "olora")


def eva_batches(examples: Sequence[dict], pad_token_id: int) -> list[dict[str, torch.Tensor]]:
    """The first ``EVA_ROWS`` encoded rows as right-padded batches (every non-padding token is seen)."""
    rows = [e["input_ids"] for e in examples[:EVA_ROWS] if "input_ids" in e]
    if not rows:
        raise ModelError(
            "peft.init=eva needs the training rows as token ids (SFT-style data); this method's rows have none: "
            "use another peft.init"
        )
    batches = []
    for i in range(0, len(rows), EVA_BATCH):
        chunk = rows[i : i + EVA_BATCH]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, r in enumerate(chunk):
            ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, : len(r)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def after_get_peft_model(model, cfg: PeftConfig, *, examples: Sequence[dict] | None, pad_token_id: int | None):
    """What a fresh adapter needs once peft has built it: EVA's data-driven init, and PiSSA/OLoRA's
    starting weights kept for the save (``initial_adapter``)."""
    from peft import get_peft_model_state_dict

    if cfg.method == "lora" and cfg.init == "eva":
        from peft import initialize_lora_eva_weights

        if examples is None or pad_token_id is None:
            raise ModelError("peft.init=eva initialises from the training rows; pass examples to apply_peft")
        device = next(model.parameters()).device
        batches = [{k: v.to(device) for k, v in b.items()} for b in eva_batches(examples, pad_token_id)]
        initialize_lora_eva_weights(model, batches, show_progress_bar=False)
    if rewrites_base(cfg):
        model.polmctl_initial_adapter = {
            k: v.detach().clone().cpu() for k, v in get_peft_model_state_dict(model).items()
        }
    return model


def initial_adapter(model) -> dict[str, torch.Tensor] | None:
    """The PiSSA/OLoRA adapter weights as they were before training (None for other adapters)."""
    return getattr(model, "polmctl_initial_adapter", None)


def save_converted(model, out_dir: Path) -> None:
    """Write a PiSSA/OLoRA adapter as the plain LoRA that turns the original base into the trained
    model (peft's conversion: ``[A | A0]``, ``[B | -B0]``, rank 2r), so it loads on that base."""
    from safetensors.torch import save_file

    work = out_dir.with_name(f"{out_dir.name}.initial")
    initial = work / "initial"
    initial.mkdir(parents=True, exist_ok=True)
    try:
        save_file(initial_adapter(model), str(initial / "adapter_model.safetensors"))
        model.save_pretrained(out_dir, safe_serialization=True, path_initial_model_for_weight_conversion=str(initial))
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


class AdaLoraBudget:
    """After every optimizer step (before the gradients are cleared), AdaLoRA's importance scores and
    rank budget: peft's ``update_and_allocate`` with the number of the step just taken."""

    def __init__(self) -> None:
        self.step = 0

    def __call__(self, model) -> None:
        missing = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n and p.grad is None]
        if missing:
            raise TrainingError(
                f"peft.method=adalora scores each rank by its weight x gradient after the optimizer step, but "
                f"{missing[0]} has no gradient there (DeepSpeed keeps gradients sharded); use launcher.config_file="
                "ddp or one process"
            )
        model.base_model.update_and_allocate(self.step)
        self.step += 1


class AdaLoraOrthogonality:
    """AdaLoRA's regulariser R(P, Q) = mean over the adapter's P and Q matrices of ||P P^T - I||_F and
    ||Q^T Q - I||_F (Zhang et al., 2023, eq. 4), times peft's orth_reg_weight. Written here because peft
    computes it only inside AdaLoraModel.forward, on a loss the model computed from ``labels``
    (peft/tuners/adalora/model.py); this is that code, in float32."""

    name = "adalora_orth"

    def __call__(self, model) -> torch.Tensor:
        adapter = model.base_model.trainable_adapter_name
        weight = model.peft_config[adapter].orth_reg_weight
        norms = []
        for name, p in model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and adapter in name and p.requires_grad:
                p = p.float()
                cov = p @ p.T if "lora_A" in name else p.T @ p
                norms.append(torch.linalg.matrix_norm(cov - torch.eye(len(cov), device=cov.device)))
        return weight * torch.stack(norms).mean()


def _adalora_config(model):
    """The model's active peft config if it is AdaLoRA's, else None."""
    config = getattr(model, "active_peft_config", None)
    return config if getattr(getattr(config, "peft_type", None), "value", None) == "ADALORA" else None


def step_penalties(model) -> list[AdaLoraOrthogonality]:
    """The penalties the model's adapter adds to every step's loss (AdaLoRA's orthogonality), for the trainer."""
    config = _adalora_config(model)
    return [AdaLoraOrthogonality()] if config is not None and config.orth_reg_weight > 0 else []


def step_hooks(model) -> list[Callable[[torch.nn.Module], None]]:
    """The after_step hooks the model's adapter needs (AdaLoRA's budget schedule), for the trainer."""
    return [AdaLoraBudget()] if _adalora_config(model) is not None else []


def check_peft_fits(run) -> None:
    """What PeftConfig.check cannot see: the adapter against the model, the device and the launcher."""
    cfg = run.peft
    if run.model.quantization != "none":
        reason = NO_QUANTIZED_BASE.get(cfg.method)
        if cfg.init.startswith("pissa") or cfg.init in ("olora", "loftq"):
            reason = f"peft.init={cfg.init} factors the full-precision weights (LoftQ quantizes them itself)"
        if reason:
            raise ConfigError(
                "model.quantization",
                f"got {run.model.quantization!r} with peft.method={cfg.method}: {reason}; set model.quantization=none",
            )
    if cfg.merge_on_save and cfg.method != "none" and run.model.quantization != "none":
        raise ConfigError(
            "peft.merge_on_save",
            f"merging into a {run.model.quantization} base would need a de-quantized copy of it (refused when "
            "final/ is written, after training); set peft.merge_on_save=false, merge into a full-precision base later",
        )
    if cfg.init == "loftq":
        device = run.trainer.device
        if device == "cpu" or (device == "auto" and not torch.cuda.is_available()) or device == "mps":
            raise ConfigError(
                "peft.init",
                "loftq runs only on CUDA (peft's LoftQ quantizes on the GPU); use peft.init=pissa on this "
                "machine, or a CUDA device",
            )
        if not cfg.merge_on_save:
            raise ConfigError(
                "peft.merge_on_save",
                "peft.init=loftq replaces the base weights by their 4-bit round trip, so the adapter alone fits no "
                "saved base; set peft.merge_on_save=true",
            )
    if cfg.method == "adalora" and run.resume:
        raise ConfigError(
            "resume",
            "peft.method=adalora cannot resume: its rank allocator (importance averages, the final rank pattern) "
            "is not in checkpoints; start the run again",
        )
