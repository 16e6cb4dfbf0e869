"""Atomic checkpoints: ``checkpoints/step-N/`` holds everything needed to continue.

A checkpoint is written into ``step-N.tmp-<pid>`` and renamed into place only when
complete, so a run killed mid-save never leaves a checkpoint that looks whole; a save that fails
(a full disk, Ctrl-C) removes its temp dir, and a killed one's is removed when the next run starts.
Contents:

    trainable.safetensors   every trainable parameter by name (adapters, or the full model)
    trainer_state.pt        step, optimizer, scheduler, data position and RNG states: tensors and
                            plain Python values only, loaded with ``torch.load(weights_only=True)``
    run_config.yaml, hydra/ what the run was (model, peft, method) and its .hydra/ files (the runner's)
    tokenizer files         with the chat template, which travels with every checkpoint

Nothing in a checkpoint is unpickled: a trainer_state.pt that needs more than tensors and plain
values (a crafted file, or one written before RNG states were stored as tensors) is refused.
``final/`` is different: it is a model dir for ``from_pretrained`` (see models.save_model).
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from polmctl.engine.rundir import pid_alive
from polmctl.errors import TrainingError

STEP_DIR = re.compile(r"^step-(\d+)$")
TMP_DIR = re.compile(r"^step-(\d+)\.tmp-(\d+)$")


class CheckpointError(TrainingError):
    """A checkpoint cannot be written (a full disk) or safely read."""


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values, so it loads with weights_only=True."""
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss_next],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss_next))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    keep_last: int,
    tokenizer: Any = None,
    files: dict[str, str] | None = None,
) -> Path:
    """Write ``ckpt_root/step-<step>`` atomically, then delete all but the newest ``keep_last``.
    ``files``: text files (relative path -> text) the checkpoint keeps beside the weights."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f"step-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    disk_full = False
    try:
        tmp.mkdir()
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        trainer_state = {"step": step, **state, "rng": rng_state()}
        _check_plain(trainer_state, "trainer state")
        torch.save(trainer_state, tmp / "trainer_state.pt")
        for name, text in (files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    except BaseException as err:  # Ctrl-C too: no half-written temp dir stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if not _disk_full(err):
            raise
        disk_full = True
    if disk_full:  # raised here, not in the except block: the failed writer's open file goes with its traceback
        free = shutil.disk_usage(ckpt_root).free / 2**20
        raise CheckpointError(
            f"no space left on device writing checkpoint {final} ({free:.1f} MiB free on the file system of "
            f"{ckpt_root}); the partial save was removed and the earlier checkpoints are intact: free some "
            "space (or lower trainer.keep_last), then resume with resume=auto"
        )
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


PLAIN = (torch.Tensor, int, float, str, bool, type(None), torch.dtype, torch.device)


def _check_plain(value: Any, where: str) -> None:
    """What weights_only=True loads back: tensors and plain values. Checked as the state is saved, so a batch
    source or optimizer holding anything else fails at its first checkpoint, not at resume."""
    if isinstance(value, dict):
        for key, inner in value.items():
            _check_plain(key, f"{where} (a key)")
            _check_plain(inner, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, inner in enumerate(value):
            _check_plain(inner, f"{where}[{i}]")
    elif not isinstance(value, PLAIN):
        raise TypeError(
            f"{where} is a {type(value).__module__}.{type(value).__qualname__}: a checkpoint's trainer state holds "
            "tensors and plain Python values only (it is loaded with weights_only=True); convert it in the "
            "state_dict() that returns it"
        )


def _disk_full(err: BaseException) -> bool:
    """Whether a failed write ran out of space. safetensors and the tokenizer raise OSError / a message with
    "os error 28"; torch's zip writer only says "unexpected pos" (a short write) or "file write failed"."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(err)
        if any(s in text for s in ("No space left on device", "os error 28", "unexpected pos", "file write failed")):
            return True
        err = err.__cause__ or err.__context__
    return False


def remove_interrupted_saves(ckpt_root: Path) -> list[str]:
    """Remove the temp dirs of saves whose process is gone (killed mid-save); one line per dir removed."""
    notes = []
    for path in sorted(ckpt_root.glob("step-*.tmp-*")) if ckpt_root.is_dir() else []:
        m = TMP_DIR.match(path.name)
        if not (m and path.is_dir()):
            continue
        pid = int(m.group(2))
        if pid == os.getpid() or not pid_alive(pid):  # this process is not saving while it starts training
            shutil.rmtree(path, ignore_errors=True)
            notes.append(f"removed {path}: an interrupted checkpoint save (its process, pid {pid}, is gone)")
    return notes


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp dirs of interrupted saves are ignored)."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The last checkpoint written in ``run_dir`` or one level down (a pipeline's stages, a vlm run's)."""
    roots = [run_dir / "checkpoints", *sorted(run_dir.glob("*/checkpoints"))]
    found = [p for root in roots for p in list_checkpoints(root)]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


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


def load_trainable(path: Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's trainable weights into ``model`` (safetensors: nothing is unpickled)."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    reshaped = [
        f"{n} {tuple(t.shape)} vs {tuple(params[n].shape)}"
        for n, t in weights.items()
        if n in params and t.shape != params[n].shape
    ]
    if missing or unknown or reshaped:
        raise ValueError(
            f"checkpoint {path} does not match this model's trainable parameters (missing {missing[:3]}, "
            f"unexpected {unknown[:3]}, other shapes (checkpoint vs model) {reshaped[:3]}); resume with the same "
            "model and peft config"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def load_trainer_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer state, read with ``weights_only=True``: tensors and plain values, never code."""
    file = path / "trainer_state.pt"
    try:
        with warnings.catch_warnings():  # a foreign file's pickle protocol is warned about; the error says enough
            warnings.simplefilter("ignore")
            return torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as err:
        text = str(err)
        refers = re.search(r"GLOBAL ([\w.]+)", text)
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text)
        reason = (
            f"it refers to {refers.group(1)}"
            if refers
            else (detail.group(1) if detail else " ".join(text.split())[:200])
        )
        raise CheckpointError(
            f"{file} cannot be loaded safely ({reason}): polmctl reads trainer state as tensors and plain values "
            "only and never unpickles objects from a file. If this checkpoint came from an older polmctl (which "
            "pickled numpy RNG states), training cannot resume from it, but its weights still export "
            f"(polmctl export {path}); otherwise do not trust the file"
        ) from None


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load trainable weights into ``model``; return the trainer state (RNG restored by caller).
    The state is read first, so an unreadable one fails before the model is touched."""
    state = load_trainer_state(path)
    load_trainable(path, model)
    return state
