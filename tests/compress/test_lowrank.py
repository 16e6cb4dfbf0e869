"""polmctl.compress.lowrank: rank selection, truncation error, the activation-aware variant, and the
factored model dir (models/replaced.py) that reloads to the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from polmctl.compress import lowrank as L
from polmctl.compress.prune import calibrate, count_parameters, prunable_linears
from polmctl.config.schema import ModelConfig
from polmctl.models import load_model, load_tokenizer, save_model
from polmctl.models.replaced import LAYERS_FILE, LowRankLinear

pytestmark = pytest.mark.unit
TINY = ModelConfig(name_or_path="builtin:tiny")
IDS = torch.tensor([[5, 60, 7, 80, 9, 100, 33, 12, 40]])


def matrix_with(singular_values: list[float], out: int = 6, inp: int = 5, seed: int = 0) -> torch.Tensor:
    """U diag(s) V^T with random orthonormal U [out, k] and V [inp, k]."""
    gen = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(out, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, k, generator=gen, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ v.T


def test_energy_rank_on_a_hand_made_matrix():
    """s = 4, 2, 1, 0.5: squared 16, 4, 1, 0.25 of 21.25, cumulative 0.7529, 0.9412, 0.9882, 1."""
    w = matrix_with([4.0, 2.0, 1.0, 0.5])
    s = torch.linalg.svdvals(w)
    assert [L.energy_rank(s, e) for e in (0.5, 0.75, 0.7529, 0.753, 0.94, 0.95, 0.99, 1.0)] == [1, 1, 1, 2, 2, 3, 4, 4]
    factors = L.factorize(w, energy=0.9)
    assert factors.down.shape == (2, 5) and factors.up.shape == (6, 2)
    assert factors.energy_kept == pytest.approx(20 / 21.25)


def test_param_ratio_rank_and_break_even():
    assert L.break_even_rank(64, 64) == 32 and L.break_even_rank(128, 64) == 42
    assert L.param_ratio_rank(64, 64, 0.5) == 16  # 16 * (64 + 64) = half of 64 * 64
    assert L.param_ratio_rank(1536, 576, 0.8) == 335
    with pytest.raises(ValueError):
        L.param_ratio_rank(64, 64, 1.0)


def test_reconstruction_error_falls_with_rank_as_eckart_young_says():
    """The rank-r truncation's relative Frobenius error is sqrt(sum of the dropped s^2 / sum of s^2)."""
    sv = [5.0, 3.0, 2.0, 1.0, 0.5]
    w = matrix_with(sv, out=7, inp=6)
    errors = [L.relative_error(w, L.factorize(w, rank=r)) for r in range(1, 6)]
    total = sum(x * x for x in sv)
    expected = [(sum(x * x for x in sv[r:]) / total) ** 0.5 for r in range(1, 6)]
    assert errors == pytest.approx(expected, abs=1e-9)
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-12


def test_activation_aware_beats_plain_svd_when_input_columns_have_skewed_norms():
    """Inputs whose channels differ 100x in scale: at the same rank, scaling W's columns by the
    activation norms before the SVD (ASVD) leaves a smaller error on the layer's outputs."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(48, 32, generator=gen, dtype=torch.float64)
    channel_scale = torch.logspace(-1, 1, 32, dtype=torch.float64)  # 0.1 .. 10
    x = torch.randn(500, 32, generator=gen, dtype=torch.float64) * channel_scale
    norms = x.norm(dim=0)
    for rank in (4, 8, 16):
        plain = L.output_error(w, L.factorize(w, rank=rank), x)
        aware = L.output_error(w, L.factorize(w, rank=rank, column_scale=L.activation_scales(norms, 1.0)), x)
        asvd = L.output_error(w, L.factorize(w, rank=rank, column_scale=L.activation_scales(norms, 0.5)), x)
        assert aware < asvd < plain, (rank, aware, asvd, plain)
    # and the weight error is what plain SVD minimises
    assert L.relative_error(w, L.factorize(w, rank=8)) < L.relative_error(
        w, L.factorize(w, rank=8, column_scale=L.activation_scales(norms, 0.5))
    )


def test_activation_scales_keep_dead_channels_invertible():
    s = L.activation_scales(torch.tensor([4.0, 0.0, 9.0]), 0.5)
    assert s.tolist() == [2.0, 2.0, 3.0]


def factored_tiny(tmp_path, **kw):
    model = load_model(TINY, for_training=False)
    tok = load_tokenizer(TINY)
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": IDS}
    linears = prunable_linears(model)
    norms = calibrate(model, [batch], linears=linears).act_norms
    report = L.compress_linears(model, linears, act_norms=norms, **kw)
    return model, tok, report


def test_factored_model_saves_and_reloads_to_the_same_logits(tmp_path):
    model, tok, report = factored_tiny(tmp_path, rank_by="params", param_ratio=0.5)
    assert all(not e["kept_dense"] and e["rank"] <= e["break_even_rank"] // 2 + 1 for e in report.values())
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LowRankLinear) and q.down.weight.shape == (16, 64) and q.up.weight.shape == (64, 16)
    before = count_parameters(load_model(TINY, for_training=False))
    assert count_parameters(model) < before
    final = save_model(model, tok, tmp_path / "final")
    spec = json.loads((final / LAYERS_FILE).read_text())
    assert spec["layers"]["model.layers.0.self_attn.q_proj"] == {
        "kind": "lowrank",
        "in_features": 64,
        "out_features": 64,
        "rank": 16,
        "bias": False,
    }
    assert spec["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert not (final / "model.safetensors").exists()
    reloaded = load_model(ModelConfig(name_or_path=str(final)), for_training=False)
    assert count_parameters(reloaded) == count_parameters(model)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=0, atol=0)


def test_transformers_alone_refuses_the_factored_dir_rather_than_loading_random_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok, _ = factored_tiny(tmp_path, rank_by="params", param_ratio=0.5)
    final = save_model(model, tok, tmp_path / "final")
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(final)


def test_dense_form_is_a_standard_model_with_the_factored_outputs(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok, _ = factored_tiny(tmp_path, rank_by="energy", energy=0.8)
    with torch.no_grad():
        factored = model(input_ids=IDS).logits
    assert L.densify(model) > 0
    final = save_model(model, tok, tmp_path / "dense")
    reloaded = AutoModelForCausalLM.from_pretrained(final).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, factored, rtol=1e-5, atol=1e-5)


def test_a_layer_whose_energy_rank_saves_nothing_stays_dense(tmp_path):
    model, _, report = factored_tiny(tmp_path, rank_by="energy", energy=1.0)
    assert report and all(e["kept_dense"] and e["rank"] >= e["break_even_rank"] for e in report.values())
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
