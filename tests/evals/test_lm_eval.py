"""lm-evaluation-harness tasks (``lm_eval:<task>``): a real run on a local task, config checks, offline errors.

OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/evals/test_lm_eval.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from polmctl.compose import compose_validated
from polmctl.config.schema import EvalConfig
from polmctl.errors import ConfigError, DataError
from polmctl.evals import check_tasks_fit
from polmctl.evals.lm_eval import run_lm_eval

pytestmark = pytest.mark.unit

TASK = """task: tiny_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
ROWS = [
    {"question": f"{a}+{b}?", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)], "label": 0}
    for a in range(1, 4)
    for b in range(1, 3)
]


@pytest.fixture()
def local_task(tmp_path):
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "sums.yaml").write_text(TASK.format(data=data))
    return tmp_path / "sums.yaml"


def _choice_logprob(model, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logps = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    return sum(logps[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_local_task_runs_and_scores_like_a_hand_computation(tiny_model, tiny_tokenizer, local_task):
    result = run_lm_eval(tiny_model.eval(), tiny_tokenizer, f"lm_eval:{local_task}", EvalConfig(max_samples=5))
    assert result["metrics"]["n"] == 5 and len(result["samples"]) == 5
    # lm-eval's multiple-choice accuracy: the choice with the highest log-likelihood is the target.
    hits = 0
    for row in ROWS[:5]:
        scores = [
            _choice_logprob(tiny_model, tiny_tokenizer, f"Q: {row['question']}\nA:", " " + c) for c in row["choices"]
        ]
        hits += int(max(range(3), key=scores.__getitem__) == row["label"])
    assert result["metrics"]["acc"] == pytest.approx(hits / 5)
    assert tiny_model.training is False


def test_missing_task_data_is_one_clear_error(tiny_model, tiny_tokenizer, local_task, tmp_path):
    (tmp_path / "sums.jsonl").unlink()
    with pytest.raises(DataError, match=r"needs the dataset json, files .*sums.jsonl"):
        run_lm_eval(tiny_model, tiny_tokenizer, f"lm_eval:{local_task}", EvalConfig(max_samples=2))
    with pytest.raises(DataError, match="no task config file"):
        run_lm_eval(tiny_model, tiny_tokenizer, f"lm_eval:{tmp_path / 'nope.yaml'}", EvalConfig())


def test_config_accepts_lm_eval_tasks_and_checks_them(monkeypatch):
    run, _ = compose_validated(["model=tiny", "eval.tasks=[arithmetic,lm_eval:hellaswag]"])
    assert run.eval.tasks == ["arithmetic", "lm_eval:hellaswag"]
    with pytest.raises(ConfigError, match=r"eval.tasks\[0\]: 'lm_eval:' names no task"):
        compose_validated(["model=tiny", "eval.tasks=[lm_eval:]"])
    with pytest.raises(ConfigError, match="cannot evaluate a reward model"):
        check_tasks_fit(["lm_eval:hellaswag"], "reward", "a reward model")
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else object())
    with pytest.raises(ConfigError, match=r"pip install 'polmctl\[lmeval\]'"):
        compose_validated(["model=tiny", "eval.tasks=[lm_eval:hellaswag]"])


def test_offline_hub_task_names_the_dataset(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "polmctl",
            "eval",
            "builtin:tiny",
            "eval.tasks=[lm_eval:hellaswag]",
            "eval.max_samples=2",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "200"},
        timeout=300,
    )
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "lm_eval:hellaswag needs the dataset Rowan/hellaswag" in text and "Traceback" not in text
