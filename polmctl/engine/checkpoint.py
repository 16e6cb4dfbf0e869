"""Atomic checkpoints: ``checkpoints/step-N/`` holds everything needed to continue.

A checkpoint is written into ``step-N.tmp-<pid>`` and renamed into place only when
complete, so a run killed mid-save never leaves a checkpoint that looks whole. Contents:

    trainable.safetensors   every trainable parameter by name (adapters, or the full model)
    trainer_state.pt        step, optimizer, scheduler, data position and RNG states
    tokenizer files         with the chat template, which travels with every checkpoint

``final/`` is different: it is a model dir for ``from_pretrained`` (see models.save_model).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    ckpt_root: Path, step: int, model: torch.nn.Module, state: dict[str, Any], keep_last: int, tokenizer: Any = None
) -> Path:
    """Write ``ckpt_root/step-<step>`` atomically, then delete all but the newest ``keep_last``."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f"step-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save({"step": step, **state, "rng": rng_state()}, tmp / "trainer_state.pt")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp dirs of interrupted saves are ignored)."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """``auto``: the newest checkpoint of this run dir (None if there is none); else a path."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if path.is_dir() and (path / "checkpoints").is_dir():
        found = list_checkpoints(path / "checkpoints")
        if not found:
            raise FileNotFoundError(f"resume={resume}: that run dir has no complete checkpoint")
        return found[-1]
    if not (path / "trainer_state.pt").exists():
        raise FileNotFoundError(
            f"resume={resume}: not a checkpoint dir (no trainer_state.pt); use auto or checkpoints/step-N"
        )
    return path


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load trainable weights into ``model``; return the trainer state (RNG restored by caller)."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    if missing or unknown:
        raise ValueError(
            f"checkpoint {path} does not match this model's trainable parameters "
            f"(missing {missing[:3]}, unexpected {unknown[:3]}); resume with the same model and peft config"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    # Our own file, written by save_checkpoint: it holds numpy RNG arrays, hence weights_only=False.
    return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
