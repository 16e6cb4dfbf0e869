"""The pipeline runner: compose and validate every stage, then run them one after another.

    polmctl run recipe=compress                        # prune -> distill -> quantize
    polmctl run recipe=instructgpt model=tiny "method.common=['trainer.max_steps=2','eval.tasks=[]']"
    polmctl run recipe=compress resume=auto hydra.run.dir=outputs/compress/<date>/<time>   # go on

Stages, their ``${stage:NAME.KEY}`` references and what each stage's overrides are: see
``polmctl.methods.pipeline``. Every stage is composed with Hydra's compose API and validated
before the first one runs (references filled in with the paths the stages will write), so a typo
in stage 3 fails at once, not after stage 2 has trained (a quantize stage's backend library is
checked then too). Each stage then runs in-process with its own
runner (``polmctl.runners.RUNNERS``) into ``<run dir>/<N>-<name>/``, which holds what that
runner always writes (summary.json, final/, ...) plus ``.hydra/config.yaml`` and
``.hydra/overrides.yaml`` (what it was composed from, so ``polmctl eval <stage dir>`` works as
for any run).

Each stage holds its own dir's lock while it runs (as any run holds its run dir, see
``runners.common.held_run_dir``). A stage that fails stops the pipeline: summary.json gets status
"failed" with every stage's state, ``<stage dir>/error.log`` the traceback, and the run ends with
one line naming the stage and its run dir. ``resume=auto`` with the same run dir (``hydra.run.dir=<dir>`` or
``output_dir=<dir>``) skips the stages whose summary.json says completed, whatever their overrides
say now (delete a stage's dir to run it again), up to the first unfinished one; that one runs with
``resume=auto``, so an interrupted training stage continues from its last checkpoint
(``trainer.save_every``), and every stage after it runs afresh (its input has just been made again).

The pipeline's summary.json: every stage's name, recipe, runner, run dir, status, wall time,
overrides, the model it started from, its final/, its eval before/after and its headline numbers
(the scalar fields of its own summary.json); a table prints them. When every stage is done,
``<run dir>/final`` links to the last stage's final/, so the pipeline's run dir works as a model
(``polmctl eval <run dir>``, ``model.name_or_path=<run dir>``).
"""

from __future__ import annotations

import gc
import json
import os
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from polmctl.config.schema import RunConfig
from polmctl.console import console
from polmctl.engine.metrics import write_json
from polmctl.engine.progress import summary_table
from polmctl.errors import ConfigError, TrainingError
from polmctl.methods.pipeline import PipelineMethod, outputs_of, override_key, stage_dir, stage_overrides
from polmctl.runners.common import held_run_dir
from polmctl.validate import require_method, runner_of

# Pipeline-level keys a pipeline reads itself; any other command-line override would reach no stage.
OWN_KEYS = ("recipe", "model", "model.name_or_path", "method", "output_dir", "resume")
# Headline numbers shown in the table when a stage's summary has them (all of them go to summary.json):
# label -> key, or (before key, after key) shown as "before -> after".
TABLE_KEYS = {
    "steps": "steps",
    "final loss": "final_loss",
    "tokens/s": "tokens_per_s",
    "sparsity": "sparsity.overall",
    "layers": ("layers.before", "layers.after"),
    "params": ("params.before", "params.after"),
    "calibration ppl": ("calibration.perplexity_before", "calibration.perplexity_after"),
    "size on disk ratio": "size_on_disk_bytes.ratio",
    "param memory ratio": "param_memory_bytes.ratio",
    "tokens/s ratio": "tokens_per_s.ratio",
}
SKIP_IN_HEADLINE = ("eval", "data", "generation", "quantized_layers", "resumed_from")


class StageError(TrainingError):
    """A stage failed; the message names it, its run dir and how to go on."""


@dataclass
class PlannedStage:
    index: int
    name: str
    recipe: str
    runner: str
    dir: Path
    model: str
    overrides: list[str]


def run_pipeline(cfg: RunConfig) -> dict[str, Any]:
    started = time.perf_counter()
    m: PipelineMethod = cfg.method
    _check_config(cfg)
    run_dir = Path(cfg.output_dir)
    resume = cfg.resume == "auto"
    plan = plan_stages(cfg)  # every stage composes and validates, or nothing runs
    run_dir.mkdir(parents=True, exist_ok=True)

    entries = [_entry(p) for p in plan]
    summary: dict[str, Any] = {
        "recipe": cfg.recipe.name,
        "runner": "pipeline",
        "run_dir": str(run_dir),
        "status": "running",
        "model": cfg.model.name_or_path,
        "common": list(m.common),
        "resumed": resume,
        "skipped": [],
        "failed_stage": None,
        "final": None,
        "wall_time_s": 0.0,
        "stages": entries,
    }
    console.print(
        f"[bold]pipeline[/] {cfg.recipe.name}: {len(plan)} stages, "
        f"{' -> '.join(f'{p.name} ({p.recipe})' for p in plan)}; run dir {run_dir}",
        highlight=False,
    )

    skipping = resume  # until the first unfinished stage: every stage after it runs again, on its new input
    for planned, entry in zip(plan, entries):
        title = (
            f"stage {planned.index + 1}/{len(plan)}: {planned.name} (recipe={planned.recipe}, runner={planned.runner})"
        )
        done = _completed_summary(planned.dir) if skipping else None
        if done is not None:
            console.print(
                f"[bold]{title}[/]: completed earlier ({planned.dir / 'summary.json'}), skipped", highlight=False
            )
            _fill(entry, done, skipped=True)
            ran_with = _recorded_overrides(planned.dir)
            if ran_with is not None and ran_with != planned.overrides:
                entry["overrides"] = ran_with
                console.print(
                    f"  note: it ran with other overrides than this config gives it now; delete "
                    f"{planned.dir} to run it again",
                    highlight=False,
                )
            summary["skipped"].append(planned.name)
            continue
        # Only the first unfinished stage continues from its checkpoints: a later one's were trained on
        # an input that this run makes again.
        resume_stage, skipping = skipping, False
        console.rule(f"[bold]{title}" + (" (resume=auto)" if resume_stage else ""))
        stage_started = time.perf_counter()
        entry["status"] = "running"
        _write(summary, run_dir, started)
        (planned.dir / "error.log").unlink(missing_ok=True)
        try:
            dcfg, run = _compose(planned, resume=resume_stage)
            from polmctl.runners import RUNNERS

            # The stage holds its own dir (and its summary.json says how it ended), as a run of its own would.
            with held_run_dir(planned.dir, f"stage {planned.name} of the pipeline in {run_dir}", record_hydra=False):
                _write_hydra_files(planned, dcfg, resume_stage)
                result = RUNNERS[runner_of(run)](run)
        except KeyboardInterrupt:
            _fail(summary, entry, run_dir, started, stage_started, "interrupted", "interrupted (KeyboardInterrupt)")
            raise
        except Exception as err:  # noqa: BLE001 -- every failure is recorded, then reported in one line
            reason = _one_line(err)
            (planned.dir).mkdir(parents=True, exist_ok=True)
            (planned.dir / "error.log").write_text(traceback.format_exc())
            _fail(summary, entry, run_dir, started, stage_started, "failed", reason)
            raise StageError(
                f"stage {planned.index + 1}/{len(plan)} {planned.name!r} (recipe={planned.recipe}) "
                f"failed: {reason} (stage run dir: {planned.dir}); fix it and rerun with resume=auto "
                f"output_dir={run_dir}"
            ) from err
        finally:
            _release_memory()
        _fill(entry, result if isinstance(result, dict) else _completed_summary(planned.dir) or {}, skipped=False)
        entry["wall_time_s"] = time.perf_counter() - stage_started

    summary["status"] = "completed"
    last = entries[-1]
    summary["final"] = last["final"]
    if last.get("objective") is not None:
        summary["objective"] = last["objective"]
    _link_final(run_dir, plan[-1].dir)
    _write(summary, run_dir, started)
    console.print(summary_table(f"{cfg.recipe.name} pipeline summary", table_rows(summary)))
    console.print(f"run dir: {run_dir}", highlight=False, soft_wrap=True)
    return summary


# -- planning: compose + validate every stage up front -------------------------------------------


def plan_stages(cfg: RunConfig) -> list[PlannedStage]:
    """Compose and validate every stage, references filled in; a ConfigError names the stage."""
    m: PipelineMethod = cfg.method
    m.check("method")  # also when the RunConfig was built without validate()
    outputs: dict[str, dict[str, str]] = {}
    plan = []
    for i, stage in enumerate(m.stages):
        overrides = stage_overrides(m, i, cfg.output_dir, cfg.model.name_or_path, outputs)
        planned = PlannedStage(i, stage.name, stage.recipe, "", stage_dir(cfg.output_dir, i, stage.name), "", overrides)
        _, run = _compose(planned)
        if runner_of(run) == "pipeline":
            raise ConfigError(
                f"method.stages.{i}.recipe",
                f"stage {stage.name!r}: recipe={stage.recipe} is a pipeline itself; list its stages here instead",
            )
        try:
            _preflight(run)
        except ConfigError as err:
            raise ConfigError(f"method.stages.{i}", f"stage {stage.name!r} (recipe={stage.recipe}): {err}") from None
        planned.runner, planned.model = runner_of(run), run.model.name_or_path
        outputs[stage.name] = outputs_of(cfg.output_dir, i, stage.name, run.model.name_or_path)
        plan.append(planned)
    return plan


def _preflight(run: RunConfig) -> None:
    """What a stage's runner checks before it loads anything, checked before the first stage runs: a
    quantize stage's missing library fails now, not after the training stages before it."""
    if runner_of(run) == "quantize":
        import torch

        from polmctl.compress.quantize import check_backend
        from polmctl.runners.quantize import _device  # the device the quantize runner will use

        check_backend(run.method.scheme, torch.device(_device(run)))


def _compose(planned: PlannedStage, resume: bool = False) -> tuple[DictConfig, RunConfig]:
    from polmctl.compose import compose_config
    from polmctl.validate import validate

    overrides = planned.overrides + (["resume=auto"] if resume else [])
    where = f"stage {planned.name!r} (recipe={planned.recipe})"
    try:
        with _nested_compose():
            dcfg = compose_config(overrides)
    except ValueError as err:
        raise ConfigError(f"method.stages.{planned.index}", f"{where}: {err}") from None
    try:
        return dcfg, validate(dcfg)
    except ConfigError as err:
        raise ConfigError(f"method.stages.{planned.index}", f"{where}: {err}") from None


@contextmanager
def _nested_compose() -> Iterator[None]:
    """Hydra's compose API refuses to start inside a running ``@hydra.main`` app (``polmctl run``):
    the app's GlobalHydra is set aside while a stage composes, and put back after."""
    from hydra.core.global_hydra import GlobalHydra

    gh = GlobalHydra.instance()
    saved = gh.hydra
    gh.clear()
    try:
        yield
    finally:
        gh.hydra = saved
        GlobalHydra.set_instance(gh)


def _check_config(cfg: RunConfig) -> None:
    require_method(cfg, "pipeline")
    if cfg.resume not in (None, "auto"):
        raise ConfigError("resume", f"got {cfg.resume!r}; a pipeline resumes with resume=auto (and the same run dir)")
    for override in _command_line(cfg):
        key = override_key(override)
        if key in OWN_KEYS or key.startswith("method."):
            continue
        raise ConfigError(
            key,
            f"{override} reaches no stage of a pipeline; pass it to every stage with "
            f"\"method.common=['{override}']\" (or to one in method.stages.N.overrides)",
        )


def _command_line(cfg: RunConfig) -> list[str]:
    """The task overrides of the ``polmctl run`` that runs this pipeline (none in-process)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return []
        hydra_cfg = HydraConfig.get()
        if Path(hydra_cfg.runtime.output_dir).resolve() != Path(cfg.output_dir).resolve():
            return []
        return list(hydra_cfg.overrides.task)
    except Exception:  # noqa: BLE001 -- no Hydra run to look at
        return []


# -- one stage's record ------------------------------------------------------------------------


def _entry(p: PlannedStage) -> dict[str, Any]:
    return {
        "name": p.name,
        "recipe": p.recipe,
        "runner": p.runner,
        "run_dir": str(p.dir),
        "status": "pending",
        "skipped": False,
        "model": p.model,
        "final": None,
        "wall_time_s": None,
        "overrides": p.overrides,
        "eval": {"before": None, "after": None},
        "metrics": {},
        "error": None,
    }


def _completed_summary(path: Path) -> dict[str, Any] | None:
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("status") == "completed" else None


def _recorded_overrides(path: Path) -> list[str] | None:
    """What a finished stage was composed from (its .hydra/overrides.yaml), without resume=auto."""
    try:
        recorded = OmegaConf.to_container(OmegaConf.load(path / ".hydra" / "overrides.yaml"))
    except Exception:  # noqa: BLE001 -- missing or unreadable: nothing to compare with
        return None
    return [o for o in recorded if o != "resume=auto"] if isinstance(recorded, list) else None


def _fill(entry: dict[str, Any], stage_summary: dict[str, Any], skipped: bool) -> None:
    final = Path(entry["run_dir"]) / "final"
    entry.update(
        status="completed",
        skipped=skipped,
        final=str(final) if final.exists() else None,
        wall_time_s=stage_summary.get("wall_time_s"),
        eval=_eval_of(stage_summary),
        metrics=headline(stage_summary),
    )
    if stage_summary.get("objective") is not None:
        entry["objective"] = stage_summary["objective"]


def _eval_of(stage_summary: dict[str, Any]) -> dict[str, Any]:
    """``{"before", "after"}`` eval results; the evaluate runner's plain results count as "after"."""
    results = stage_summary.get("eval") or {}
    if set(results) <= {"before", "after"}:
        return {"before": results.get("before"), "after": results.get("after")}
    return {"before": None, "after": results}


def headline(stage_summary: dict[str, Any]) -> dict[str, Any]:
    """A stage summary's headline numbers: its scalar fields and those one level down, dotted."""
    out: dict[str, Any] = {}
    for key, value in stage_summary.items():
        if key in SKIP_IN_HEADLINE:
            continue
        if _number(value):
            out[key] = value
        elif isinstance(value, dict):
            for sub, inner in value.items():
                if _number(inner):
                    out[f"{key}.{sub}"] = inner
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(
    summary: dict, entry: dict, run_dir: Path, started: float, stage_started: float, status: str, reason: str
) -> None:
    entry.update(status=status, error=reason, wall_time_s=time.perf_counter() - stage_started)
    summary.update(status=status, failed_stage=entry["name"])
    _write(summary, run_dir, started)
    console.print(summary_table(f"{summary['recipe']} pipeline summary ({status})", table_rows(summary)))


def _write(summary: dict[str, Any], run_dir: Path, started: float) -> None:
    summary["wall_time_s"] = time.perf_counter() - started
    write_json(run_dir / "summary.json", summary)


def _write_hydra_files(planned: PlannedStage, dcfg: DictConfig, resume: bool) -> None:
    hydra_dir = planned.dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(dcfg, hydra_dir / "config.yaml")
    OmegaConf.save(
        OmegaConf.create(planned.overrides + (["resume=auto"] if resume else [])), hydra_dir / "overrides.yaml"
    )


def _link_final(run_dir: Path, last_dir: Path) -> None:
    """``<run dir>/final`` -> the last stage's final/ (relative), when there is one."""
    link = run_dir / "final"
    if not (last_dir / "final").is_dir() or (link.exists() and not link.is_symlink()):
        return
    try:
        if link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(last_dir / "final", run_dir), link, target_is_directory=True)
    except OSError:
        pass  # no symlinks here: summary.json's "final" still names it


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _release_memory() -> None:
    """Between stages: free the last stage's tensors and let the next stage set accelerate up afresh
    (a stage may ask for other mixed precision or device; in a multi-process launch the process
    group stays)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        from accelerate.state import AcceleratorState, GradientState, PartialState

        single = PartialState._shared_state.get("num_processes", 1) == 1
        AcceleratorState._reset_state(reset_partial_state=single)
        GradientState._reset_state()
    except Exception:  # noqa: BLE001 -- best effort: a later Accelerator with the same settings still works
        pass


# -- the table ---------------------------------------------------------------------------------


def table_rows(summary: dict[str, Any]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for i, entry in enumerate(summary["stages"], 1):
        label = f"{i}. {entry['name']}"
        status = entry["status"] + (" earlier (skipped)" if entry["skipped"] else "")
        wall = entry.get("wall_time_s")
        rows[f"{label} ({entry['recipe']})"] = status + (f", {wall:.1f} s" if isinstance(wall, (int, float)) else "")
        before, after = entry["eval"].get("before") or {}, entry["eval"].get("after") or {}
        for task in dict.fromkeys([*before, *after]):
            for metric in dict.fromkeys([*(before.get(task) or {}), *(after.get(task) or {})]):
                if metric in ("n", "tokens"):
                    continue
                old, new = (before.get(task) or {}).get(metric), (after.get(task) or {}).get(metric)
                rows[f"{label}: {task}/{metric} before -> after"] = f"{_fmt(old)} -> {_fmt(new)}"
        metrics = entry["metrics"]
        for name, key in TABLE_KEYS.items():
            if isinstance(key, tuple):
                if key[0] in metrics and key[1] in metrics:
                    rows[f"{label}: {name} before -> after"] = f"{_fmt(metrics[key[0]])} -> {_fmt(metrics[key[1]])}"
            elif key in metrics:
                rows[f"{label}: {name}"] = metrics[key]
        if entry.get("error"):
            rows[f"{label}: error"] = entry["error"][:200]
    rows["wall_time_s"] = summary["wall_time_s"]
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
