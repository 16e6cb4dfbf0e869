"""Run dirs written by hand, shaped as the runners write them, for the report and stage-table tests.

from tests.commands.fake_runs import fake_run, fake_pipeline
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

PROMPTS = [f"What is {a} + {a + 3}? Say <b>why</b> & show it" for a in range(1, 13)]


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _answers(correct_upto: int) -> list[dict]:
    rows = []
    for i, prompt in enumerate(PROMPTS):
        answer = str(2 * (i + 1) + 3)
        ok = i < correct_upto
        completion = f"The answer is {answer}." if ok else f"I think it is {i}.\n\n\n"
        rows.append(
            {
                "prompt": prompt,
                "completion": completion,
                "predicted": answer if ok else str(i),
                "answer": answer,
                "correct": ok,
            }
        )
    return rows


def fake_run(
    path: Path,
    recipe: str = "lora",
    paradigm: str = "fine-tuning",
    model: str = "builtin:tiny",
    steps: int = 12,
    before: float | None = 0.25,
    after: float = 0.75,
    rewards: bool = False,
    final_bytes: int = 4096,
) -> Path:
    """A completed train-runner run dir: .hydra/, metrics.jsonl, eval/, final/, summary.json."""
    hydra = path / ".hydra"
    hydra.mkdir(parents=True, exist_ok=True)
    config = {
        "recipe": {"name": recipe, "paradigm": paradigm},
        "model": {"name_or_path": model},
        "data": {"source": "builtin:arithmetic", "eval_split": "test"},
        "eval": {"tasks": ["arithmetic"], "before": before is not None, "source": None, "max_samples": 12},
        "method": {"name": "sft"},
    }
    (hydra / "config.yaml").write_text(yaml.safe_dump(config))
    (hydra / "overrides.yaml").write_text(yaml.safe_dump([f"recipe={recipe}", f"trainer.max_steps={steps}"]))
    lines = []
    for step in range(1, steps + 1):
        row = {"loss": 2.0 / step, "lr": 1e-3 * (1 - step / (steps + 1)), "grad_norm": 1.0 + step / 10, "step": step}
        if rewards:
            row.update({"reward": step / steps, "rewards/math_answer": step / steps, "kl": 0.01 * step})
        lines.append(json.dumps(row))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    n = len(PROMPTS)
    results = {"before": {"arithmetic": {"accuracy": before, "n": n}} if before is not None else None}
    results["after"] = {"arithmetic": {"accuracy": after, "n": n}}
    for tag, value in results.items():
        if value is None:
            continue
        rows = _answers(round(value["arithmetic"]["accuracy"] * n))
        (path / "eval").mkdir(exist_ok=True)
        (path / "eval" / f"arithmetic-{tag}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        _write_json(path / "eval" / f"results-{tag}.json", value)
    (path / "final").mkdir(exist_ok=True)
    (path / "final" / "model.safetensors").write_bytes(b"\0" * final_bytes)
    _write_json(
        path / "summary.json",
        {
            "recipe": recipe,
            "model": model,
            "run_dir": str(path),
            "status": "completed",
            "steps": steps,
            "first_loss": 2.0,
            "final_loss": 2.0 / steps,
            "train_time_s": 12.5,
            "wall_time_s": 20.25,
            "tokens_per_s": 1234.5,
            "peak_memory_mb": 812.0,
            "trainable_params": 1000,
            "total_params": 50000,
            "eval": results,
        },
    )
    return path


def fake_pipeline(path: Path) -> Path:
    """A completed two-stage pipeline: sft (measures before and after), then grpo from sft's final/ (after only)."""
    sft = fake_run(path / "1-sft", before=0.25, after=0.5)
    grpo = fake_run(
        path / "2-grpo",
        recipe="grpo",
        paradigm="reasoning",
        model=str(sft / "final"),
        before=None,
        after=0.75,
        rewards=True,
    )
    (path / ".hydra").mkdir(parents=True, exist_ok=True)
    (path / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"recipe": {"name": "survey", "paradigm": "integration"}})
    )
    stages = []
    for name, recipe, sdir in (("sft", "lora", sft), ("grpo", "grpo", grpo)):
        stages.append(
            {
                "name": name,
                "recipe": recipe,
                "runner": "train",
                "run_dir": str(sdir),
                "status": "completed",
                "skipped": False,
                "wall_time_s": 20.25,
            }
        )
    _write_json(
        path / "summary.json",
        {
            "recipe": "survey",
            "runner": "pipeline",
            "status": "completed",
            "model": "builtin:tiny",
            "skipped": [],
            "failed_stage": None,
            "wall_time_s": 41.0,
            "stages": stages,
        },
    )
    return path
