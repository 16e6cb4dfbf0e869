"""Optimizer and learning-rate schedule from ``TrainerConfig``."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from polmctl.config.schema import TrainerConfig


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    # Biases, norms and 1-d vectors (e.g. DoRA magnitudes) are not decayed, as in GPT-2/Llama recipes.
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def build_optimizer(model: torch.nn.Module, cfg: TrainerConfig) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters; check the peft config")
    groups = [
        {"params": [p for n, p in params if not _no_decay(n, p)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in params if _no_decay(n, p)], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.betas[0])


def warmup_steps(cfg: TrainerConfig) -> int:
    return cfg.warmup_steps or int(cfg.warmup_ratio * cfg.max_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainerConfig):
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(cfg), num_training_steps=cfg.max_steps)
