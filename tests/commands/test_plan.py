"""``polmctl plan``: the dry run's counts match what a real run loads; the verdict follows free memory.

OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/commands/test_plan.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from polmctl.commands import plan as plan_module
from polmctl.commands.plan import make_plan
from polmctl.config.schema import ModelConfig, PeftConfig
from polmctl.data import encode_dataset, load_rows
from polmctl.models import apply_peft, load_model, load_tokenizer, trainable_parameter_summary

pytestmark = pytest.mark.cli

TINY = ["model=tiny", "data.max_rows=64"]


def polmctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polmctl", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=300,
    )


def test_counts_match_the_loaded_model_and_the_encoded_data():
    result = make_plan(["recipe=sft", *TINY, "data.max_length=100"])
    model = load_model(ModelConfig(name_or_path="builtin:tiny", dtype="float32"), for_training=True)
    real_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert result["memory"]["weights"] == real_bytes
    assert result["parameters"] == result["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    assert result["memory"]["gradients"] == real_bytes  # full fine-tuning, float32
    assert result["memory"]["optimizer state"] == 2 * real_bytes  # AdamW: two float32 states

    tokenizer = load_tokenizer(ModelConfig(name_or_path="builtin:tiny"))
    _, stats = encode_dataset(
        load_rows("builtin:arithmetic", "train", max_rows=64), tokenizer, source="builtin:arithmetic", max_length=100
    )
    data = result["data"]
    assert (data["rows"], data["kept"], data["tokens"], data["truncated"]) == (
        64,
        stats.kept,
        stats.tokens,
        stats.truncated,
    )
    assert data["truncated"] > 0 and data["longest"] == 100


def test_lora_trainable_count_is_peft_s():
    result = make_plan(["recipe=lora", *TINY, "peft.r=4"])
    model = load_model(ModelConfig(name_or_path="builtin:tiny", dtype="float32"), for_training=True)
    real = apply_peft(model, PeftConfig(method="lora", r=4, alpha=8))
    trainable, _ = trainable_parameter_summary(real)
    assert result["trainable_parameters"] == trainable
    assert result["memory"]["gradients"] == 4 * trainable
    assert result["memory"]["optimizer state"] == 8 * trainable


def test_checkpointing_lowers_activations_and_verdict_follows_free_memory(monkeypatch):
    plain = make_plan(["recipe=sft", *TINY])
    checkpointed = make_plan(["recipe=sft", *TINY, "model.gradient_checkpointing=true"])
    assert checkpointed["memory"]["activations"] < plain["memory"]["activations"]
    need = plain["total_bytes"]
    for free, verdict in ((need * 2, "FITS"), (int(need * 1.1), "TIGHT"), (need // 2, "DOES NOT FIT")):
        monkeypatch.setattr(plan_module, "free_memory", lambda device, free=free: (free, "test"))
        assert make_plan(["recipe=sft", *TINY])["verdict"] == verdict


def test_cli_plan_reports_and_exits_by_verdict():
    ok = polmctl("plan", "recipe=lora", *TINY)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "trainable" in ok.stdout and "memory: optimizer state" in ok.stdout and "FITS" in ok.stdout
    huge = polmctl(
        "plan", "recipe=sft", *TINY, "data.packing=true", "data.max_length=100000", "trainer.micro_batch_size=100000"
    )
    assert huge.returncode == 1 and "DOES NOT FIT" in huge.stdout


def test_cli_plan_bad_config_is_one_line():
    result = polmctl("plan", "recipe=lora", "model=tiny", "peft.r=0")
    assert result.returncode != 0 and "peft.r: must be > 0" in result.stderr and "Traceback" not in result.stderr


def test_activation_estimate_is_close_to_what_autograd_saves(tiny_model):
    """Without checkpointing, the estimate is within 25% of the bytes autograd keeps for backward."""
    import torch

    from polmctl.commands.plan import activation_bytes

    rows, seq, seen = 8, 155, {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 256, (rows, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tiny_model(ids, labels=ids)
    weights = {p.untyped_storage().data_ptr() for p in tiny_model.parameters()}
    saved = sum(n for ptr, n in seen.items() if ptr not in weights)
    estimate = activation_bytes(tiny_model.config, rows, seq, 4, checkpointing=False, eager=False)
    assert 0.8 < estimate / saved < 1.25


def test_plan_prints_the_length_that_keeps_most_rows_whole(tmp_path, capsys):
    import json

    rows = [
        {"prompt": f"Problem {i}: simplify $\\frac{{{2 * i}}}{{{4 * i}}}$.", "completion": "Divide both by 2. " * i}
        for i in range(1, 41)
    ]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = make_plan(["recipe=sft", "model=tiny", f"data.source={path}", "data.max_length=200"])
    data = result["data"]
    assert data["truncated"] > 2 and data["whole_length"] > 200
    tokenizer = load_tokenizer(ModelConfig(name_or_path="builtin:tiny"))
    _, stats = encode_dataset(rows, tokenizer, source=str(path), max_length=200)
    assert data["whole_length"] == stats.whole_length()
    err = " ".join(capsys.readouterr().err.split())
    assert f"data.max_length={data['whole_length']} keeps 95% of rows whole" in err
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(plan_module.plan_table(result))
    assert re.search(rf"keeps 95% of rows whole +│ data\.max_length={data['whole_length']} ", console.export_text())


def test_plan_fails_when_the_data_lacks_a_reward_column(tmp_path):
    """GRPO on prompts without the answer column math_answer reads: plan stops, no FITS."""
    import json

    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"What is {i} + {i}?", "solution": str(2 * i)} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = polmctl("plan", "recipe=grpo", "model=tiny", f"data.source={path}")
    assert result.returncode != 0 and "FITS" not in result.stdout and "Traceback" not in result.stderr
    assert (
        "reward 'math_answer' (method.rewards[0]) reads the column 'answer', which the data lacks (columns: solution)"
        in " ".join(result.stderr.split())
    )


# The tiny model by hand: hidden 64, MLP 128, 4 heads of 16 and 2 KV heads, vocabulary 260 (tied
# head), 2 layers. A layer: q, o 64x64 + k, v 64x32 + MLP 3x64x128 + 2 norms of 64 = 36,992
# parameters; outside the layers: embeddings 260x64 + the final norm 64 = 16,704. Float32.
LAYER, OUTSIDE = 36_992 * 4, 16_704 * 4
W = 2 * LAYER + OUTSIDE  # 362,752 bytes: weights, and gradients of a full fine-tune
SHARDED = ["launcher=accelerate", "launcher.num_processes=2"]


def test_per_rank_memory_divides_what_each_strategy_shards():
    one = make_plan(["recipe=sft", *TINY])
    assert one["memory"]["weights"] == W and "strategies" not in one
    result = make_plan(["recipe=sft", *TINY, *SHARDED, "launcher.config_file=fsdp"])
    assert result["processes"] == 2 and result["strategy"] == "fsdp2" and result["shared_memory"]
    rows = {name: row["memory"] for name, row in result["strategies"].items()}
    act = one["memory"]["activations"]
    assert rows["ddp"] == {
        "weights": W, "gradients": W, "optimizer state": 2 * W, "activations": act, "gradient buckets": W
    }  # fmt: skip
    assert rows["deepspeed_zero2"] == {"weights": W, "gradients": W // 2, "optimizer state": W, "activations": act}
    sharded = {
        "weights": W // 2, "gradients": W // 2, "optimizer state": W, "activations": act,
        "gathered weights": OUTSIDE + 2 * LAYER,  # the root unit and two layers (one computing, one prefetched)
    }  # fmt: skip
    assert rows["fsdp2"] == rows["deepspeed_zero3"] == sharded
    assert result["memory"] == sharded and result["total_bytes"] == sum(sharded.values())
    assert "2 ranks sharing it: " in result["verdict_reason"]  # on CPU the ranks share the RAM

    four = make_plan(["recipe=sft", *TINY, "launcher=accelerate", "launcher.num_processes=4"])
    assert four["strategy"] == "ddp" and four["memory"]["gradient buckets"] == W
    assert four["strategies"]["deepspeed_zero3"]["memory"]["weights"] == W // 4
    assert four["strategies"]["deepspeed_zero2"]["memory"]["optimizer state"] == 2 * W // 4


def test_lora_shards_only_the_adapters_gradients_and_optimizer_state():
    one = make_plan(["recipe=lora", *TINY, "peft.r=4"])
    lora = one["memory"]["gradients"]  # the adapters' float32 bytes
    rows = make_plan(["recipe=lora", *TINY, "peft.r=4", *SHARDED, "launcher.config_file=deepspeed_zero3"])
    zero3 = rows["strategies"]["deepspeed_zero3"]["memory"]
    assert zero3["gradients"] == lora // 2 and zero3["optimizer state"] == lora
    assert zero3["weights"] == -(-one["memory"]["weights"] // 2)


def test_the_plan_names_a_strategy_that_fits_when_the_requested_one_does_not(monkeypatch):
    args = ["recipe=sft", *TINY, "trainer.micro_batch_size=1", *SHARDED]
    act = make_plan(args)["strategies"]["ddp"]["memory"]["activations"]
    zero2 = 2 * (2.5 * W + act)  # two ranks on one machine's RAM
    monkeypatch.setattr(plan_module, "free_memory", lambda device: (int(zero2 / plan_module.TIGHT_ABOVE) + 1, "test"))
    result = make_plan(args)
    assert result["strategy"] == "ddp" and result["verdict"] != "FITS"
    assert result["strategies"]["deepspeed_zero2"]["verdict"] == "FITS"
    assert result["strategy_hint"].startswith("launcher.config_file=deepspeed_zero2 fits")
    monkeypatch.setattr(plan_module, "free_memory", lambda device: (W, "test"))
    assert "no strategy fits" in make_plan(args)["strategy_hint"]


def test_cli_plan_prints_a_row_per_strategy():
    out = polmctl("plan", "recipe=sft", *TINY, *SHARDED, "launcher.config_file=fsdp")
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("ddp x 2", "fsdp2 x 2 (launcher.config_file)", "deepspeed_zero2 x 2", "deepspeed_zero3 x 2"):
        assert name in out.stdout
    assert "memory: total per rank" in out.stdout
