"""benchmarks/vs_trl.py on model=tiny: polmctl and TRL compute the same first-batch loss and
gradient for SFT, DPO and GRPO, the check notices when they do not, and the alternating
harness steps both sides through the same loss trajectory.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/benchmarks/test_vs_trl.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("trl")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import _equivalence  # noqa: E402
from _workload import default_workload  # noqa: E402

pytestmark = pytest.mark.recipes  # it trains (or starts processes): not in the fast tier


def tiny(method: str, **overrides):
    # Small shapes: GRPO 2 prompts x G=4, 8 new tokens.
    shapes = {"grpo": dict(micro_batch_size=8, grad_accum=1, num_generations=4, max_new_tokens=8)}.get(method, {})
    return default_workload(method, model="tiny", steps=2, **{**shapes, **overrides})


@pytest.mark.parametrize("method", ["sft", "dpo", "grpo"])
def test_polmctl_and_trl_agree_on_the_first_batch(method):
    eq = _equivalence.check(tiny(method))
    assert eq.same_tokens
    assert eq.loss_rel_diff <= _equivalence.LOSS_RTOL or abs(eq.polmctl_loss - eq.trl_loss) <= 1e-6
    assert eq.grad_rel_diff <= _equivalence.GRAD_RTOL
    assert eq.ok
    if method == "dpo":  # the adapters were perturbed: not the trivial log 2 of policy == reference
        assert abs(eq.trl_loss - 0.6931471805599453) > 1e-4


def test_the_check_catches_a_different_normalisation(monkeypatch):
    from polmctl.methods.sft import SFTObjective

    weight = SFTObjective.weight
    monkeypatch.setattr(SFTObjective, "weight", lambda self, batch: weight(self, batch) + 1)
    eq = _equivalence.check(tiny("sft"))
    assert eq.same_tokens and not eq.ok
    assert eq.loss_rel_diff > _equivalence.LOSS_RTOL


def test_alternating_rounds_follow_the_same_trajectory():
    import vs_trl

    args = SimpleNamespace(
        model="tiny",
        dtype="float32",
        steps=1,
        rounds=2,
        warmup=1,
        grpo_new_tokens=8,
        trl_precompute_ref=False,
        polmctl_plain_forward=False,
        skip_check=True,
        check_only=False,
        no_rss=True,
    )
    result = vs_trl.bench_method("sft", args, "installed", peak=1e11)
    for side in ("polmctl", "trl"):
        assert result[side]["steps_timed"] == 2 and result[side]["median_step_s"] > 0
        assert result[side]["tokens_per_s"] > 0 and 0 < result[side]["mfu"] < 1
    assert len(result["trl"]["losses"]) == 2
    assert result["loss_trajectory_max_rel_diff"] < 1e-4
    assert result["speedup"] == pytest.approx(1 / result["ratio_polmctl_over_trl"])
