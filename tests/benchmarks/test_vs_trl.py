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


@pytest.fixture
def fresh_accelerate_state():
    """TRL's bf16 side leaves accelerate's process-wide state at mixed_precision=bf16; later tests
    in this process build Accelerators without it."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_bf16_runs_both_sides_in_one_process_after_the_check(method, fresh_accelerate_state):
    """--dtype bfloat16: the equivalence check builds TRL's bf16 trainer first, then both timed
    sides are built in the same process (it stopped on "AcceleratorState has already been
    initialized"); polmctl trains bf16 weights with float32 adapters, TRL under its bf16 autocast
    (DPO's check stopped on float32 adapters meeting bf16 activations outside it)."""
    import vs_trl
    from accelerate.state import AcceleratorState

    args = SimpleNamespace(
        model="tiny",
        dtype="bfloat16",
        steps=1,
        rounds=2,
        warmup=0,
        grpo_new_tokens=8,
        trl_precompute_ref=False,
        polmctl_plain_forward=False,
        skip_check=False,
        check_only=False,
        no_rss=True,
    )
    result = vs_trl.bench_method(method, args, "installed", peak=1e11)
    assert result["equivalence"]["same_tokens"]
    assert result["equivalence"]["loss_rel_diff"] < 1e-2  # bf16 logits on both sides
    for side in ("polmctl", "trl"):
        assert result[side]["steps_timed"] == 2 and result[side]["median_step_s"] > 0
    assert AcceleratorState().mixed_precision == "bf16"  # TRL's autocast was on while it stepped
    assert result["loss_trajectory_max_rel_diff"] < 1e-2
