"""lm-evaluation-harness tasks as polmctl eval tasks: ``lm_eval:<task>`` in ``eval.tasks``.

    pip install 'polmctl[lmeval]'
    polmctl eval outputs/lora/2026-11-24/10-00-00 "eval.tasks=[lm_eval:hellaswag,lm_eval:arc_easy]" eval.max_samples=200
    polmctl eval builtin:smollm2-135m "eval.tasks=[lm_eval:path/to/my_task.yaml]"     # a local task config

The loaded model (a run's, adapters and all) is handed to lm-eval's HFLM as it is, so the
numbers are lm-eval's own; ``eval.max_samples`` is lm-eval's ``limit`` and ``eval.batch_size``
its batch size. Task data comes from the Hugging Face hub (or, for a local task config, from
whatever its ``dataset_path`` / ``dataset_kwargs`` name): where it cannot be reached, the task
fails with one line naming the dataset it needs.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

PREFIX = "lm_eval:"


def is_lm_eval_task(name: str) -> bool:
    return name.startswith(PREFIX)


def _spec(name: str) -> str:
    return name[len(PREFIX) :]


def _is_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def check_lm_eval_task(name: str, key: str) -> None:
    """Config-time check of one ``lm_eval:`` task name (no task index is built: that takes seconds)."""
    from polmctl.errors import ConfigError

    if not _spec(name).strip():
        raise ConfigError(key, f"{name!r} names no task; use lm_eval:<task>, e.g. lm_eval:hellaswag")
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(
            key, f"{name} needs lm-evaluation-harness: pip install 'polmctl[lmeval]' (or pip install lm-eval)"
        )


def _dataset_of(spec: str, manager) -> str:
    """The dataset a task reads ("Rowan/hellaswag", "json (data/x.jsonl)"), for error messages."""
    entry = manager.task_index.get(spec) if not _is_file(spec) else None
    cfg = entry.cfg if entry is not None else None
    if cfg is None and _is_file(spec):
        import yaml

        try:  # !function tags and includes are irrelevant here: only the dataset keys are read
            cfg = yaml.load(Path(spec).read_text(), Loader=yaml.BaseLoader)
        except (OSError, yaml.YAMLError):
            cfg = None
    if not isinstance(cfg, dict) or not cfg.get("dataset_path"):
        return f"the task data of {spec}"
    name = cfg["dataset_path"] + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") not in (None, "None") else "")
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") if isinstance(cfg.get("dataset_kwargs"), dict) else None
    return f"{name}, files {files}" if files else name


def _load_errors() -> tuple[type[BaseException], ...]:
    """What ``datasets`` raises for data it cannot reach: ConnectionError and FileNotFoundError
    (OSError), DatasetNotFoundError, and ValueError for an offline cache miss."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    try:
        from datasets.exceptions import DatasetNotFoundError

        errors.append(DatasetNotFoundError)
    except ImportError:
        pass
    return tuple(errors)


def _metrics(task_results: dict, n: int | None) -> dict[str, Any]:
    """lm-eval's ``{"acc,none": 0.3, "acc_stderr,none": 0.05, "alias": ...}`` -> ``{"acc": 0.3, ...}``."""
    out: dict[str, Any] = {}
    for key, value in task_results.items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, filt = key.split(",", 1)
        out[metric if filt == "none" else f"{metric}/{filt}"] = value
    if n is not None:
        out["n"] = n
    return out


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def run_lm_eval(model, tokenizer, name: str, cfg) -> dict[str, Any]:
    """Run lm-eval task ``name`` (``lm_eval:<task or file.yaml>``) on the loaded model:
    ``{"metrics": {...}, "samples": [...]}`` like every polmctl eval task."""
    from polmctl.errors import DataError

    check_lm_eval_task(name, "eval.tasks")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    spec = _spec(name)
    if _is_file(spec) and not Path(spec).is_file():
        raise DataError(f"eval task {name}: no task config file {spec}")
    # lm-eval's INFO/WARNING lines and the datasets progress bars say nothing a polmctl user can act on.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    import datasets

    datasets.disable_progress_bars()
    # The default index (14k task configs) takes seconds to build; a local config needs none of it.
    manager = TaskManager(include_defaults=not _is_file(spec))
    if not _is_file(spec) and spec not in manager.all_tasks:
        raise DataError(
            f"eval task {name}: lm-eval has no task {spec!r}; list them with `lm-eval ls tasks`, or "
            "give a task config file: lm_eval:path/to/task.yaml"
        )
    was_training = model.training
    model.eval()
    try:
        # A copy: HFLM sets padding options on the tokenizer it is given.
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=cfg.batch_size)
        results = simple_evaluate(
            model=lm, tasks=[spec], limit=cfg.max_samples, task_manager=manager, log_samples=True, bootstrap_iters=0
        )
    except _load_errors() as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(
            f"eval task {name} needs the dataset {_dataset_of(spec, manager)}, which cannot be loaded here "
            f"({reason[:200]}); run it where the Hugging Face hub (or the task's files) can be reached"
        )
    finally:
        model.train(was_training)
    tasks = results["results"]
    counts = results.get("n-samples", {})
    if len(tasks) == 1:
        ((task, values),) = tasks.items()
        metrics = _metrics(values, counts.get(task, {}).get("effective"))
    else:  # a group: every subtask's metrics, prefixed with its name
        metrics = {
            f"{task}/{k}": v
            for task, values in tasks.items()
            for k, v in _metrics(values, counts.get(task, {}).get("effective")).items()
        }
    samples = [
        _plain(
            {
                "task": task,
                "doc_id": s.get("doc_id"),
                "target": s.get("target"),
                "response": s.get("filtered_resps"),
                **{m: s.get(m) for m in s.get("metrics", [])},
            }
        )
        for task, rows in (results.get("samples") or {}).items()
        for s in rows
    ]
    return {"metrics": metrics, "samples": samples}
