"""Evaluation tasks, by name (``eval.tasks``), and the function that runs a config's tasks.

Each task reads held-out rows (the builtin set's test split unless ``eval.source`` names
one) and returns ``{"metrics": {...}, "samples": [...]}``; samples are written as JSONL
next to summary.json so a person can see what the model answered.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from polmctl.config.schema import DataConfig, EvalConfig
from polmctl.data import load_rows
from polmctl.data.builtin.reversal import extract_reversal_answer
from polmctl.evals.arithmetic import exact_match
from polmctl.evals.lm_eval import is_lm_eval_task, run_lm_eval
from polmctl.evals.perplexity import perplexity
from polmctl.evals.preference import preference_accuracy
from polmctl.evals.reward import reward_accuracy
from polmctl.evals.steps import prm_accuracy, step_preference_accuracy
from polmctl.evals.unlearn import recall_task

# task name -> (default held-out source, runner)
EVAL_TASKS = {
    "arithmetic": (
        "builtin:arithmetic",
        lambda m, t, rows, cfg: exact_match(m, t, rows, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens),
    ),
    "reversal": (
        "builtin:reversal",
        lambda m, t, rows, cfg: exact_match(
            m, t, rows, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, extract=extract_reversal_answer
        ),
    ),
    "perplexity": ("builtin:domain_text", lambda m, t, rows, cfg: perplexity(m, t, rows, batch_size=cfg.batch_size)),
    "preference": (
        "builtin:arithmetic_preference",
        lambda m, t, rows, cfg: preference_accuracy(m, t, rows, batch_size=cfg.batch_size),
    ),
    "reward": (
        "builtin:style_preference",
        lambda m, t, rows, cfg: reward_accuracy(m, t, rows, batch_size=cfg.batch_size),
    ),
    "prm": (
        "builtin:arithmetic_steps",
        lambda m, t, rows, cfg: prm_accuracy(m, t, rows, batch_size=cfg.batch_size),
    ),
    "step_preference": (
        "builtin:arithmetic_step_pairs",
        lambda m, t, rows, cfg: step_preference_accuracy(m, t, rows, batch_size=cfg.batch_size),
    ),
    "forget": ("builtin:facts", recall_task("forget")),
    "retain": ("builtin:facts", recall_task("retain")),
}
# The tasks of a model without an LM head, by the head they need (polmctl.models.load.HEADS);
# every other task needs a causal LM.
TASK_HEADS = {"reward": "reward", "prm": "prm"}
HEAD_NAMES = {"causal_lm": "a language model", "reward": "a reward model", "prm": "a process reward model"}


def check_tasks_fit(tasks: list[str], head: str, what: str) -> None:
    """A reward model runs only the reward task, a process reward model only the prm task, a
    language model all the others (``head``: causal_lm | reward | prm)."""
    from polmctl.errors import ConfigError

    for i, task in enumerate(tasks):
        if TASK_HEADS.get(task, "causal_lm") != head:
            own = [t for t, h in TASK_HEADS.items() if h == head]
            lm_tasks = ", ".join(t for t in EVAL_TASKS if t not in TASK_HEADS)
            fix = f"eval.tasks=[{own[0]}]" if own else f"an LM task ({lm_tasks})"
            raise ConfigError(f"eval.tasks[{i}]", f"{task!r} cannot evaluate {what}; use {fix}")


def eval_rows(task: str, cfg: EvalConfig, data: DataConfig) -> list[dict]:
    """Held-out rows for ``task``; builtin generator options follow the training data's when
    the sources match, so evaluation asks the same kind of question training taught."""
    source = cfg.source or EVAL_TASKS[task][0]
    options = dict(data.options) if source == data.source else {}
    if source == data.source:
        split = data.eval_split
    else:  # a local file given as eval.source is the held-out set, whole (a file has one split: 'train')
        split = "train" if cfg.source and Path(source).is_file() else "test"
    return load_rows(source, split, max_rows=cfg.max_samples, options=options or None)


def run_evals(
    model, tokenizer, cfg: EvalConfig, data: DataConfig, out_dir: Path | None = None, tag: str = ""
) -> dict[str, dict[str, Any]]:
    from polmctl.models import head_of

    head = head_of(model)
    check_tasks_fit(cfg.tasks, head, HEAD_NAMES[head])
    results = {}
    for task in cfg.tasks:
        if is_lm_eval_task(task):
            result = run_lm_eval(model, tokenizer, task, cfg)
        else:
            result = EVAL_TASKS[task][1](model, tokenizer, eval_rows(task, cfg, data), cfg)
        results[task] = result["metrics"]
        if out_dir is not None and result["samples"]:
            out_dir.mkdir(parents=True, exist_ok=True)
            stem = re.sub(r"[^\w.-]+", "_", task)  # lm_eval:path/to/task.yaml -> lm_eval_path_to_task.yaml
            path = out_dir / f"{stem}{'-' + tag if tag else ''}.jsonl"
            path.write_text("".join(json.dumps(s) + "\n" for s in result["samples"]))
    return results


def evaluate_run(cfg, model, tokenizer, run_dir: Path, tag: str, reuse: bool = False) -> dict | None:
    """The run's eval tasks on ``model``, written to ``<run_dir>/eval/results-<tag>.json`` (and
    the answers to eval/*.jsonl); None without tasks. ``reuse`` returns an earlier result for
    ``tag`` if there is one (a resumed run keeps its 'before'). Used by every runner."""
    from polmctl.console import console
    from polmctl.engine.metrics import write_json
    from polmctl.rollout.cache import generation_cache

    if not cfg.eval.tasks:
        return None
    path = run_dir / "eval" / f"results-{tag}.json"
    if reuse and path.exists():
        return json.loads(path.read_text())
    # generation.cache=quantized: every generate of the tasks uses the quantized KV cache.
    with console.status(f"evaluating ({tag}): {', '.join(cfg.eval.tasks)}"), generation_cache(model, cfg.generation):
        results = run_evals(model, tokenizer, cfg.eval, cfg.data, run_dir / "eval", tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, results)
    return results
