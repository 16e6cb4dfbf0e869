"""recipe=edit end to end: on the toy model that knows twelve capitals (tests/editing/facts_model.py)
the builtin facts it knows are kept, edited (ROME, MEMIT), measured and saved; final/ reloads with
the edit; bad requests and layers fail with the row or key before a model is written."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from polmctl.compose import compose_config
from polmctl.editing.evaluate import score_targets
from polmctl.errors import ConfigError, DataError
from polmctl.runners import RUNNERS
from polmctl.runners.edit import run_edit
from polmctl.validate import runner_of, validate
from tests.editing.facts_model import build_facts_model

pytestmark = pytest.mark.recipes

FAST = [
    "logger.progress=false",
    "method.fact_token=last",
    "method.max_requests=2",
    "method.calibration_rows=60",
    "method.fluency_rows=8",
    "method.num_prefixes=2",
    "method.prefix_tokens=6",
    "method.trace_samples=3",
    "method.trace_requests=2",
]


@pytest.fixture(scope="session")
def facts_model(tmp_path_factory):
    return build_facts_model(tmp_path_factory.getbasetemp() / "facts-model")


def edit(tmp_path, model, *overrides: str) -> dict:
    cfg = validate(
        compose_config(["recipe=edit", f"model.name_or_path={model}", *FAST, *overrides, f"output_dir={tmp_path}"])
    )
    summary = run_edit(cfg)
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    return summary


def test_edit_is_a_registered_runner():
    assert RUNNERS["edit"] is run_edit
    assert runner_of(validate(compose_config(["recipe=edit"]))) == "edit"


def test_rome_run_edits_the_known_facts_and_final_reloads_with_the_edit(tmp_path, facts_model):
    summary = edit(tmp_path, facts_model, "method.layer=2", "method.max_requests=1")
    req = summary["requests"]
    assert req["applied"] == 1 and 2 <= req["known_before"] <= 12 < req["candidates"]
    assert summary["layers"]["edited"] == [2] and summary["layers"]["chosen_by"] == "method.layer"
    assert summary["layers"]["changes"]["2"]["rank"] == 1
    before, after = summary["edit"]["before"], summary["edit"]["after"]
    assert after["efficacy"]["prob_target"] > 5 * before["efficacy"]["prob_target"]
    assert after["generalisation"]["prob_target"] > 5 * before["generalisation"]["prob_target"]
    assert before["efficacy"]["success"] == before["efficacy"]["exact_match"] == 0.0  # it knew the old answer
    assert summary["fluency"]["rows"] == 8 and summary["fluency"]["perplexity_after"] > 0
    assert summary["neighbour_drift"]["kl"] >= 0 and summary["calibration"]["tokens"] > 128

    rows = [json.loads(line) for line in (tmp_path / "edits.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["target_new"] != rows[0]["target_true"]
    assert len((tmp_path / "eval" / "edits-after.jsonl").read_text().splitlines()) == 1

    original = AutoModelForCausalLM.from_pretrained(facts_model).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    items = [(r["prompt"].replace("{}", r["subject"]), r["target_new"]) for r in rows]
    old = score_targets(original, tok, items)
    new = score_targets(reloaded, tok, items)
    assert not old[0].greedy and new[0].logprob > old[0].logprob + 1.5  # e^1.5: 4.5x more likely
    changed = [k for k, v in reloaded.state_dict().items() if not torch.equal(v, original.state_dict()[k])]
    assert changed == ["model.layers.2.mlp.down_proj.weight"]


def test_memit_run_traces_its_window_and_spreads_the_batch(tmp_path, facts_model):
    summary = edit(tmp_path, facts_model, "method.algorithm=memit", "method.window=2", "method.max_requests=3")
    trace = summary["layers"]["trace"]
    assert summary["layers"]["chosen_by"] == "causal tracing" and trace["candidates"] == [0, 1, 2, 3]
    last = max(trace["candidates"], key=lambda i: (trace["effects"][i], -i))
    assert summary["layers"]["edited"] == [max(0, last - 1), last][-min(2, last + 1) :]
    assert all(c["rank"] >= 1 for c in summary["layers"]["changes"].values())
    memit = summary["memit"]
    assert memit["update_weight"] == 128.0 and memit["residual_after"] < memit["residual_before"][0]
    assert summary["edit"]["after"]["efficacy"]["prob_target"] > summary["edit"]["before"]["efficacy"]["prob_target"]


def test_a_random_model_knows_no_builtin_fact_and_says_how_to_go_on(tmp_path):
    with pytest.raises(DataError, match="method.known_only=false"):
        edit(tmp_path, "builtin:tiny")
    assert not (tmp_path / "final").exists()


def test_bad_request_file_fails_with_its_row_before_a_model_loads(tmp_path, facts_model):
    bad = tmp_path / "edits.jsonl"
    bad.write_text(json.dumps({"subject": "Paris", "prompt": "Paris is in", "target_new": "Rome"}) + "\n")
    with pytest.raises(DataError, match=r"edits.jsonl: row 0, column 'prompt'"):
        edit(tmp_path / "run", facts_model, f"method.requests={bad}")
    assert not (tmp_path / "run" / "final").exists()


def test_the_last_layer_is_refused_where_its_state_reaches_no_later_token(tmp_path, facts_model):
    with pytest.raises(ConfigError, match="method.layer: layer 3 is the model's last"):
        edit(tmp_path, facts_model, "method.layer=3", "method.fact_token=subject_last")
    with pytest.raises(ConfigError, match="method.layer: got 9; the model has 4 decoder layers"):
        edit(tmp_path, facts_model, "method.layer=9")


@pytest.mark.parametrize(
    "override,key",
    [
        ("method.algorithm=knn", "method.algorithm"),
        ("method.layers=[1,2]", "method.layers"),
        ("method.fact_token=first", "method.fact_token"),
        ("method.max_requests=0", "method.max_requests"),
        ("peft=lora", None),
    ],
)
def test_bad_method_values_fail_validation_with_the_key(override, key):
    if key is None:  # peft is refused by the runner, with its key
        cfg = validate(compose_config(["recipe=edit", override]))
        with pytest.raises(ConfigError, match="peft.method"):
            run_edit(cfg)
        return
    with pytest.raises(ConfigError) as info:
        validate(compose_config(["recipe=edit", override]))
    assert info.value.key == key


def test_a_single_file_has_no_held_out_text_for_fluency(tmp_path, facts_model):
    rows = tmp_path / "text.jsonl"
    rows.write_text(json.dumps({"text": "The capital of Russia is Moscow ."}) + "\n")
    with pytest.raises(ConfigError, match="data.source: .* has no held-out split"):
        edit(tmp_path / "run", facts_model, f"data.source={rows}")
