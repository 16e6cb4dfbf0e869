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

A sharded run (FSDP2) writes ``sharded/`` instead of ``trainable.safetensors``: every rank's shard
of the trainable weights and of the optimizer state, written by all ranks at once with
torch.distributed.checkpoint into the same temp dir, which rank 0 renames after they are done.
Its trainer_state.pt then holds the optimizer's param groups (plain values), not its state.

Nothing in a checkpoint is unpickled: a trainer_state.pt that needs more than tensors and plain
values (a crafted file, or one written before RNG states were stored as tensors) is refused, and
``sharded/`` is read with a restricted reader (``SafeCheckpointReader``): its ``.metadata`` through an
unpickler that builds torch's checkpoint-metadata classes only, its ``.distcp`` files as tensors only.
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
    tmp = ckpt_root / f"step-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)

    def weights(into: Path) -> None:
        into.mkdir()
        save_file(trainable_state(model), str(into / "trainable.safetensors"))

    return _complete(ckpt_root, step, tmp, weights, state, keep_last, tokenizer, files)


def _complete(ckpt_root: Path, step: int, tmp: Path, weights, state, keep_last: int, tokenizer, files) -> Path:
    """Into ``tmp``: ``weights(tmp)``, the trainer state, ``files`` and the tokenizer; then renamed to
    step-<step> and all but the newest ``keep_last`` checkpoints deleted."""
    final = ckpt_root / f"step-{step}"
    disk_full = False
    try:
        weights(tmp)
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
        raise _disk_full_error(final, ckpt_root)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _disk_full_error(final: Path, ckpt_root: Path) -> CheckpointError:
    free = shutil.disk_usage(ckpt_root).free / 2**20
    return CheckpointError(
        f"no space left on device writing checkpoint {final} ({free:.1f} MiB free on the file system of "
        f"{ckpt_root}); the partial save was removed and the earlier checkpoints are intact: free some "
        "space (or lower trainer.keep_last), then resume with resume=auto"
    )


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


# -- sharded checkpoints (FSDP2): torch.distributed.checkpoint --------------------------------------

SHARDED_DIR = "sharded"


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / SHARDED_DIR / ".metadata").is_file()


def save_sharded_checkpoint(
    ckpt_root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int,
    *,
    tmp_pid: int,
    is_main: bool,
    barrier,
    tokenizer: Any = None,
    files: dict[str, str] | None = None,
) -> Path | None:
    """Every rank calls it. All ranks write their shards of the trainable weights and of the
    optimizer state into ``step-<step>.tmp-<tmp_pid>/sharded/`` (rank 0's pid, so a killed save's
    temp dir is found like any other); then rank 0 adds the trainer state and the files and renames
    the dir into place. Returns the checkpoint on rank 0, None on the others."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    tmp = ckpt_root / f"step-{step}.tmp-{tmp_pid}"
    if is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    # Trainable weights only (adapters under LoRA), as trainable.safetensors holds; keyed by name.
    weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    try:
        # Tensors only: the param groups (plain values) go into trainer_state.pt, so reading sharded/
        # back never has a non-tensor entry to unpickle.
        dcp.save({"model": weights, "optim": optim["state"]}, storage_writer=dcp.FileSystemWriter(tmp / SHARDED_DIR))
    except BaseException as err:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(err):
            raise _disk_full_error(ckpt_root / f"step-{step}", ckpt_root) from None
        raise
    if not is_main:
        return None
    state = {**state, "optimizer_param_groups": optim["param_groups"], "sharded": True}
    return _complete(ckpt_root, step, tmp, lambda into: None, state, keep_last, tokenizer, files)


def load_sharded_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every rank calls it: each reads its own shards (resharded by torch if the process count
    changed) into the sharded model and optimizer; returns the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    state = load_trainer_state(path)
    options = StateDictOptions(ignore_frozen_params=True)
    weights, optim = get_state_dict(model, optimizer, options=options)
    target = {"model": weights, "optim": optim["state"]}
    names = set(weights)
    _check_sharded_names(path, _stored_weights(path), required=names, allowed=names, what="the model's parameters")
    dcp.load(target, storage_reader=SafeCheckpointReader(path / SHARDED_DIR), planner=TensorsOnlyPlanner())
    set_state_dict(
        model,
        optimizer,
        model_state_dict=target["model"],
        optim_state_dict={"state": target["optim"], "param_groups": state["optimizer_param_groups"]},
        options=options,
    )
    return state


def load_sharded_trainable(path: Path, model: torch.nn.Module) -> None:
    """One process, no process group: a sharded checkpoint's trainable weights into the matching
    parameters of an ordinary model (``polmctl export``); the optimizer state is not read."""
    import torch.distributed.checkpoint as dcp

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    tensors = model.state_dict()  # every name, tied ones too (torch's sharded state dict keeps both names)
    stored = _stored_weights(path)
    _check_sharded_names(path, stored, required=trainable, allowed=set(tensors), what="this model's parameters")
    # Loaded in place into the model's own tensors (state_dict() shares their storage).
    dcp.load(
        {"model": {n: tensors[n] for n in stored}},
        storage_reader=SafeCheckpointReader(path / SHARDED_DIR),
        planner=TensorsOnlyPlanner(),
        no_dist=True,
    )


def _stored_weights(path: Path) -> set[str]:
    """The names of the weights in a sharded checkpoint (its ``model.`` entries)."""
    metadata = SafeCheckpointReader(path / SHARDED_DIR).read_metadata().state_dict_metadata
    return {k.removeprefix("model.") for k in metadata if k.startswith("model.")}


def _check_sharded_names(path: Path, stored: set[str], *, required: set[str], allowed: set[str], what: str) -> None:
    """Every ``required`` weight is in the checkpoint and nothing in it is outside ``allowed``, as
    load_trainable checks a trainable.safetensors."""
    missing, unknown = sorted(required - stored), sorted(stored - allowed)
    if missing or unknown:
        raise ValueError(
            f"checkpoint {path} does not match {what} (missing {missing[:3]}, unexpected {unknown[:3]}); resume "
            "with the same model and peft config"
        )


# The classes a torch.distributed.checkpoint .metadata file is built from (torch 2.x FileSystemWriter).
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds the checkpoint-metadata classes above (and torch dtypes), nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_CLASSES or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise CheckpointError(
            f"{module}.{name} in a sharded checkpoint's .metadata: polmctl reads checkpoint metadata classes only "
            "and never unpickles other objects from a file; do not trust this checkpoint"
        )


def _reader_base():
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader


def _planner_base():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    return DefaultLoadPlanner


class SafeCheckpointReader(_reader_base()):
    """torch's FileSystemReader, but its ``.metadata`` (a pickle) is read with a restricted unpickler:
    torch's own reader calls pickle.load on it, which would run whatever a crafted file names.
    Written here because torch.distributed.checkpoint has no safe metadata reader; the tensor data
    it reads with torch.load(weights_only=True) already."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as file:
                metadata = _MetadataUnpickler(file).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as err:
            raise CheckpointError(f"{path} is not a readable checkpoint metadata file ({err})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorsOnlyPlanner(_planner_base()):
    """torch's default load planner, except that a non-tensor entry is refused: torch would read it
    with torch.load(weights_only=False). polmctl writes tensors only into sharded/."""

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(
            f"the sharded checkpoint holds a non-tensor entry ({read_item.dest_index.fqn}); polmctl writes tensors "
            "only there and does not unpickle other entries"
        )
