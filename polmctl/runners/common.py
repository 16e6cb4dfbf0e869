"""What every runner does around its own work: before, check that the rest of the run fits its
method, make the run dir and set the seed; after, write summary.json and print its table. Around it
all, ``held_run_dir``: the run dir's lock for the run's whole life, and summary.json marked
"failed" or "interrupted" when the run ends that way. A train run's checkpoints record what the run
was (``run_record``), and a resume is checked against it before anything loads (``check_resume``).

    polmctl run recipe=prune | quantize | merge | vlm_adapter | lora | ...
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml
from accelerate.utils import set_seed
from rich.markup import escape

from polmctl.config.schema import RunConfig
from polmctl.console import console
from polmctl.data import encode_dataset, load_config_rows, pad_collate
from polmctl.engine.checkpoint import newest_checkpoint
from polmctl.engine.metrics import write_json
from polmctl.engine.progress import summary_table
from polmctl.engine.rundir import RunDirBusy, RunDirLock, RunRefused, recorded_files, restore_files
from polmctl.errors import ConfigError, ModelError
from polmctl.models.load import head_of
from polmctl.validate import require_method

# What a checkpoint's weights were trained as: resuming with another value of these is refused.
# Every peft key but merge_on_save (which only shapes final/); the method's name decides its heads.
RESUME_KEYS = {"model": ("name_or_path", "revision", "quantization"), "peft": None, "method": ("name",)}
RESUME_SKIP = {"peft": ("merge_on_save",)}


def begin(cfg: RunConfig, method: str, *, no_adapters: str | None = None, full_precision: str | None = None) -> Path:
    """The run dir of a ``method`` run, after checking what the method schema cannot see: with
    ``no_adapters`` (the reason, for the message) peft must be none, with ``full_precision`` the
    model must load unquantized."""
    require_method(cfg, method)
    if full_precision and cfg.model.quantization != "none":
        raise ConfigError("model.quantization", f"got {cfg.model.quantization!r}; {full_precision}")
    if no_adapters and cfg.peft.method != "none":
        raise ConfigError("peft.method", f"got {cfg.peft.method!r}; {no_adapters}")
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    return run_dir


def finish(run_dir: Path, summary: dict[str, Any], title: str, rows: dict[str, Any]) -> dict[str, Any]:
    """Write ``summary.json`` and print its table and the run dir; returns the summary."""
    write_json(run_dir / "summary.json", summary)
    console.print(summary_table(title, rows))
    console.print(f"run dir: {run_dir}", highlight=False, soft_wrap=True)
    return summary


def eval_rows(results: dict[str, dict | None], skip: tuple[str, ...] = ("n",)) -> dict[str, Any]:
    """Table rows ``task/metric (tag)`` of ``{"before": {task: {metric: value}}, "after": ...}``."""
    rows = {}
    for tag, tasks in results.items():
        for task, metrics in (tasks or {}).items():
            for name, value in metrics.items():
                if name not in skip:
                    rows[f"{task}/{name} ({tag})"] = value
    return rows


# -- the run's whole life ------------------------------------------------------------------------


@contextmanager
def held_run_dir(run_dir: Path, command: str, *, lock: bool = True, record_hydra: bool = True) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block (``lock=False``: ranks after the first of several processes,
    which leave the run dir to rank 0). A run into a dir held by a live run raises RunDirBusy at once and
    puts back the holder's ``.hydra/`` files, which this run's Hydra has just rewritten. If the block
    ends by an error or Ctrl-C, summary.json says "failed" (with the error's line) or "interrupted";
    an error that refused the run before it started (a config error, RunRefused) leaves the dir as it was.
    ``record_hydra``: record the dir's ``.hydra/`` files in the lock (False for a pipeline stage,
    whose files are written after it takes the lock)."""
    if not lock:
        yield
        return
    held = RunDirLock(run_dir, command, recorded_files(run_dir) if record_hydra else None)
    try:
        held.acquire()
    except RunDirBusy as err:
        if err.holder is not None and err.holder.files is not None:
            restore_files(run_dir, err.holder.files)
        raise
    if held.taken_over:
        note = f"took over {held.path} from a run that ended without releasing it ({held.taken_over.describe()})"
        console.print(f"[yellow]run dir lock:[/] {escape(note)}", highlight=False, soft_wrap=True)
    since = time.time()
    try:
        yield
    except KeyboardInterrupt:
        mark_ended(run_dir, "interrupted", None, since)
        raise
    except (ConfigError, RunRefused):
        raise
    except Exception as err:
        mark_ended(run_dir, "failed", one_line(err), since)
        raise
    finally:
        held.release()


def mark_ended(run_dir: Path, status: str, error: str | None, since: float) -> None:
    """summary.json of a run that ended ``status`` (failed | interrupted): steps done, its last checkpoint,
    the error. A completed summary it replaces is kept under "previous"; one the runner wrote itself
    for this ending (a pipeline's, with every stage) is left as it is."""
    path = run_dir / "summary.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and old.get("status") in ("failed", "interrupted") and path.stat().st_mtime >= since:
        return
    last = newest_checkpoint(run_dir)
    summary = {
        "run_dir": str(run_dir),
        "status": status,
        "error": error,
        "steps": _last_logged_step(run_dir / "metrics.jsonl"),
        "last_checkpoint": str(last) if last else None,
        "wall_time_s": time.time() - since,
    }
    if isinstance(old, dict) and old.get("status") == "completed":
        summary["previous"] = old
    try:
        write_json(path, summary)
    except OSError as err:  # a full disk, say: the run's own error is the one to show
        console.print(f"[yellow]note:[/] {escape(f'could not write {path} ({err})')}", highlight=False, soft_wrap=True)


def _last_logged_step(path: Path) -> int | None:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue  # a line a killed run left half-written
        if isinstance(step, int):
            return step
    return None


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# -- what a checkpoint records, and the resume check -----------------------------------------------


def run_record(cfg: RunConfig, run_dir: Path) -> dict[str, str]:
    """Files every checkpoint keeps: run_config.yaml (the run's model, peft and method config) and
    hydra/ (a copy of the run's .hydra/ files, put back when a resume with another model is refused)."""
    sections = {}
    for key in RESUME_KEYS:
        value = getattr(cfg, key)
        sections[key] = asdict(value) if is_dataclass(value) else value
    sections = json.loads(json.dumps(sections, default=str))  # tuples -> lists, anything else -> its text
    files = {"run_config.yaml": yaml.safe_dump(sections, sort_keys=False)}
    for name, text in recorded_files(run_dir).items():
        files["hydra/" + name.split("/", 1)[1]] = text
    return files


def check_resume(ckpt: Path, cfg: RunConfig, run_dir: Path) -> None:
    """Refuse to resume ``ckpt`` when this run's model, peft or method differs from what the checkpoint
    was trained as (before anything loads). A checkpoint of this run dir gives its recorded .hydra/
    files back, which Hydra rewrote as this run started, so the intact checkpoints still export."""
    try:
        recorded = yaml.safe_load((ckpt / "run_config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        recorded = None
    if not isinstance(recorded, dict):
        return  # from before checkpoints recorded their run (or unreadable): load_trainable checks the shapes
    now = yaml.safe_load(run_record(cfg, run_dir)["run_config.yaml"])
    diffs = []
    for section, keys in RESUME_KEYS.items():
        old, new = recorded.get(section) or {}, now[section]
        # Only keys the checkpoint recorded: a key added to polmctl since then has nothing to compare with.
        for key in [k for k in keys or sorted(old) if k in old and k not in RESUME_SKIP.get(section, ())]:
            if old[key] != new.get(key):
                diffs.append(f"{section}.{key}={old[key]!r} (this run: {new.get(key)!r})")
    if not diffs:
        return
    note = ""
    if ckpt.resolve().parent.parent == run_dir.resolve():
        copies = {f".hydra/{p.name}": p.read_text() for p in sorted((ckpt / "hydra").glob("*.yaml"))}
        if copies:
            restore_files(run_dir, copies)
            note = "; the run dir's .hydra/ config was put back"
    raise RunRefused(
        f"resume={cfg.resume}: {ckpt} was trained with {', '.join(diffs)}; resume with the checkpoint's values "
        f"(its run_config.yaml) or start a new run without resume{note}"
    )


def plain_causal_lm(model, verb: str, error: type[Exception] = ModelError, *, merge: bool = True):
    """The causal LM a one-shot runner works on: a reward model or a process reward model (a score head,
    no LM head) is refused, a LoRA-style adapter dir is merged into its base first (kept as it is with
    ``merge=False``), a prompt-learning adapter (nothing to merge) is refused. ``verb`` says what the
    runner does ("prune", "quantize", ...)."""
    head = head_of(model)
    if head != "causal_lm":
        what = "a reward model" if head == "reward" else "a process reward model"
        raise error(f"model.name_or_path holds {what} (a score head, no LM head); {verb} a causal LM")
    if hasattr(model, "merge_and_unload"):
        config = model.active_peft_config
        kind = getattr(config.peft_type, "value", config.peft_type)
        if config.is_prompt_learning:
            raise error(
                f"model.name_or_path holds a {kind} adapter, which does not merge into the weights; "
                f"{verb} its base model instead"
            )
        if not merge:
            return model
        console.print(f"[bold]model[/] a {kind} adapter dir: the adapter is merged into the base weights first")
        model = model.merge_and_unload()
    return model


def calibration_record(cfg: RunConfig, n_rows: int, before, after) -> dict[str, Any]:
    """summary.json's ``calibration``: the rows ``calibration_batches`` gave, and the perplexity on
    them of the model before and after (``compress.prune.calibrate``'s results)."""
    return {
        "source": cfg.data.source,
        "rows": n_rows,
        "tokens": before.tokens,
        "perplexity_before": before.perplexity,
        "perplexity_after": after.perplexity,
    }


def calibration_examples(cfg: RunConfig, tokenizer) -> list[dict]:
    """``method.calibration_rows`` rows of the run's data, encoded with every token labelled
    (preference rows calibrate on prompt + chosen answer)."""
    rows = load_config_rows(cfg.data, max_rows=cfg.method.calibration_rows)
    rows = [
        {"prompt": r["prompt"], "completion": r["chosen"]} if "chosen" in r and "completion" not in r else r
        for r in rows
    ]
    examples, _ = encode_dataset(
        rows,
        tokenizer,
        source=cfg.data.source,
        fmt=cfg.data.format,
        max_length=cfg.data.max_length,
        completion_only_loss=False,
        overlong="truncate",
    )
    return examples


def calibration_batches(cfg: RunConfig, tokenizer) -> tuple[list[dict], int]:
    """``calibration_examples`` in padded batches of ``method.calibration_batch_size``; and their count."""
    examples = calibration_examples(cfg, tokenizer)
    size = cfg.method.calibration_batch_size
    return [pad_collate(examples[i : i + size], tokenizer.pad_token_id) for i in range(0, len(examples), size)], len(
        examples
    )
