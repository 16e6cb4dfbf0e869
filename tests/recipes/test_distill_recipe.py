"""recipe=distill end to end on model=tiny, with a teacher that is another tiny model (another
seed, made confident so its distributions are far from the student's): the student's
KL to the teacher falls, offline and on-policy, and every weight trains."""

from __future__ import annotations

import re

import pytest
import torch

from polmctl.engine.metrics import read_metrics
from polmctl.errors import ConfigError
from polmctl.models import save_model
from polmctl.models.tiny import build_tiny_model, build_tiny_tokenizer

pytestmark = pytest.mark.recipes

SHORT = [
    "trainer.max_steps=20",
    "trainer.lr=3e-3",
    "trainer.scheduler=constant",
    "trainer.micro_batch_size=8",
    "trainer.grad_accum=1",
    "data.max_rows=96",
    "method.max_new_tokens=16",
    "eval.tasks=[]",
]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    tok = build_tiny_tokenizer()
    teacher = build_tiny_model(tok, seed=1)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(8.0)  # peaked next-token distributions: a clear target
    return save_model(teacher, tok, tmp_path_factory.mktemp("teacher") / "final")


def first_and_last(lines, key, n=3):
    values = [l[key] for l in lines]
    return sum(values[:n]) / n, sum(values[-n:]) / n, values


@pytest.mark.parametrize(
    "extra",
    [
        ["method.loss=jsd", "method.beta=0.5"],
        ["method.loss=forward_kl", "method.temperature=2.0", "method.sft_weight=0.5"],
        ["method.loss=reverse_kl"],
        ["method.loss=forward_kl", "method.teacher_quantization=nf4"],
    ],
    ids=["jsd", "forward_kl-T2-sft", "reverse_kl", "nf4-teacher"],
)
def test_offline_distillation_lowers_the_kl_to_the_teacher(train_recipe, teacher_dir, extra):
    run = train_recipe(
        "distill", f"method.teacher={teacher_dir}", "method.on_policy_fraction=0", "method.sft_weight=0", *SHORT, *extra
    )
    assert run.unchanged_parameters() == []
    lines = read_metrics(run.dir / "metrics.jsonl")
    first, last, kls = first_and_last(lines, "kl_to_teacher")
    assert last < 0.6 * first, kls
    assert all(k in lines[0] for k in ("loss/distill", "loss/sft", "kl_to_teacher"))
    assert "on_policy" not in lines[0]  # on_policy_fraction=0: the runner's own offline batches
    if "method.sft_weight=0.5" in extra:  # loss = distill + 0.5 x the data's cross-entropy, per token
        assert lines[0]["loss"] == pytest.approx(lines[0]["loss/distill"] + 0.5 * lines[0]["loss/sft"], rel=1e-4)
    else:
        assert lines[0]["loss"] == pytest.approx(lines[0]["loss/distill"], rel=1e-4)


def test_on_policy_distillation_lowers_the_kl_on_the_students_samples(train_recipe, teacher_dir):
    run = train_recipe(
        "distill", f"method.teacher={teacher_dir}", "method.on_policy_fraction=1", "method.loss=jsd", *SHORT
    )
    assert run.unchanged_parameters() == []
    lines = read_metrics(run.dir / "metrics.jsonl")
    assert all(l["on_policy"] == 1.0 and l["completion_length"] > 0 and "rollout_time_s" in l for l in lines)
    assert not any("loss/sft" in l for l in lines)  # no cross-entropy on the student's own samples
    first, last, kls = first_and_last(lines, "kl_to_teacher")
    assert last < 0.6 * first, kls


def test_the_recipe_mixes_offline_and_on_policy_steps(train_recipe, teacher_dir):
    run = train_recipe("distill", f"method.teacher={teacher_dir}", *SHORT, "trainer.max_steps=6")
    kinds = [l["on_policy"] for l in read_metrics(run.dir / "metrics.jsonl")]
    assert 0.0 in kinds and 1.0 in kinds, kinds  # the recipe's on_policy_fraction=0.5


def test_a_teacher_with_another_tokenizer_stops_the_run_before_training(train_recipe, tmp_path):
    tok = build_tiny_tokenizer()
    tok.add_tokens(["<extra>"])
    other = save_model(build_tiny_model(tok, seed=1), tok, tmp_path / "other")
    expected = (
        f"method.teacher: the teacher {other} and the student builtin:tiny have different tokenizers "
        "(vocab size 260 vs 261)"
    )
    with pytest.raises(ConfigError, match=re.escape(expected)):
        train_recipe("distill", f"method.teacher={other}", *SHORT, run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
