"""recipe=merge end to end on two tiny LoRA runs (arithmetic, reversal): final/ loads with
from_pretrained, its weights differ from both sources and equal the formula; summary.json holds
each task's accuracy for the merged model and the sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from polmctl.compose import compose_config
from polmctl.config.schema import ModelConfig
from polmctl.errors import ConfigError, ModelError
from polmctl.models import load_model
from polmctl.runners.merge import run_merge
from polmctl.validate import validate

pytestmark = pytest.mark.recipes
FAST = ["model=tiny", "eval.tasks=[]", "logger.progress=false"]
TINY_EVAL = ["eval.tasks=[arithmetic,reversal]", "eval.before=true", "eval.max_samples=4", "eval.max_new_tokens=8"]


def merge(out: Path, models: list[Path], *overrides: str) -> dict:
    cfg = validate(
        compose_config(
            ["recipe=merge", *FAST, f"method.models=[{','.join(map(str, models))}]", *overrides, f"output_dir={out}"]
        )
    )
    return run_merge(cfg)


def full_weights(path: Path) -> dict[str, torch.Tensor]:
    model = load_model(ModelConfig(name_or_path=str(path)), for_training=False)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture()
def two_lora_runs(train_recipe, tmp_path):
    # lr high enough that two steps move the adapters visibly
    common = ["trainer.max_steps=2", "data.max_rows=16", "trainer.lr=1e-2"]
    a = train_recipe("lora", *common, run_dir=tmp_path / "arith")
    b = train_recipe("lora", "data=reversal", *common, run_dir=tmp_path / "rev")
    return a.dir, b.dir


def test_linear_merge_of_two_lora_runs_is_their_average_and_loads(two_lora_runs, tmp_path):
    a, b = two_lora_runs
    summary = merge(tmp_path / "m", [a, b], "method.merge=linear")
    final = tmp_path / "m" / "final"
    assert summary["status"] == "completed" and summary["weights"] == [0.5, 0.5]
    assert summary["kinds"][0].startswith("LoRA adapter on ") and summary["eval"] == {"merged": None, "sources": None}
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in final.iterdir()}

    merged = AutoModelForCausalLM.from_pretrained(final).state_dict()
    wa, wb = full_weights(a), full_weights(b)
    adapted = [n for n in wa if not torch.equal(wa[n], wb[n])]
    assert any("q_proj" in n for n in adapted)
    for name in adapted:
        assert not torch.equal(merged[name], wa[name]) and not torch.equal(merged[name], wb[name]), name
    for name in wa:
        torch.testing.assert_close(merged[name], (wa[name] + wb[name]) / 2, rtol=1e-5, atol=1e-6)


def test_ties_merge_evaluates_the_merged_model_and_each_source_on_both_tasks(two_lora_runs, tmp_path):
    a, b = two_lora_runs
    summary = merge(tmp_path / "m", [a, b], "method.merge=ties", *TINY_EVAL)
    assert summary["base"] and summary["density"] == 0.5
    assert set(summary["eval"]["merged"]) == {"arithmetic", "reversal"}
    assert list(summary["eval"]["sources"]) == [str(a), str(b)]
    for results in [summary["eval"]["merged"], *summary["eval"]["sources"].values()]:
        assert all(0 <= results[t]["accuracy"] <= 1 and results[t]["n"] == 4 for t in ("arithmetic", "reversal"))
    assert json.loads((tmp_path / "m" / "summary.json").read_text())["eval"] == summary["eval"]
    assert (tmp_path / "m" / "eval" / "reversal-merged.jsonl").exists()


def test_dare_is_reproducible_by_seed(two_lora_runs, tmp_path):
    a, b = two_lora_runs
    runs = {}
    for name, seed in (("x", 1), ("y", 1), ("z", 2)):
        merge(tmp_path / name, [a, b], "method.merge=dare_linear", "method.density=0.5", f"seed={seed}")
        runs[name] = AutoModelForCausalLM.from_pretrained(tmp_path / name / "final").state_dict()
    name = next(n for n in runs["x"] if "q_proj" in n)
    assert torch.equal(runs["x"][name], runs["y"][name]) and not torch.equal(runs["x"][name], runs["z"][name])


def test_bad_inputs_fail_early_with_one_line(two_lora_runs, tmp_path):
    a, _ = two_lora_runs
    with pytest.raises(ConfigError, match="method.models: needs at least two models"):
        merge(tmp_path / "m1", [a])
    with pytest.raises(ConfigError, match="method.base"):  # full models, no base to take task vectors from
        merge(tmp_path / "m2", ["builtin:tiny", "builtin:tiny"], "method.merge=ties")
    with pytest.raises(ConfigError, match="method.models: slerp interpolates exactly two models"):
        merge(tmp_path / "m3", [a, a, a], "method.merge=slerp")
    with pytest.raises(ModelError, match=r"method.models\[1\].*no model"):
        merge(tmp_path / "m4", [a, tmp_path])
    assert not (tmp_path / "m4" / "final").exists()
