"""Every adapter type of the peft family on recipe=lora, model=tiny: its parameters train, the loss falls,
final/ reloads to the same outputs, and merged final/ is a plain model with those outputs."""

from __future__ import annotations

import json

import pytest
import torch

from polmctl.config.schema import ModelConfig
from polmctl.engine.metrics import read_metrics
from polmctl.models import load_model

pytestmark = pytest.mark.recipes

# peft=<option> (or LoRA options) -> a learning rate that moves the tiny model in a few steps.
ADAPTERS = {
    "ia3": ["peft=ia3", "trainer.lr=3e-1"],
    "vera": ["peft=vera", "trainer.lr=1e-1"],
    "loha": ["peft=loha", "trainer.lr=3e-2"],
    "lokr": ["peft=lokr", "trainer.lr=3e-2"],
    "oft": ["peft=oft", "trainer.lr=3e-2"],
    "boft": ["peft=boft", "trainer.lr=3e-2"],
    "adalora": ["peft=adalora", "trainer.lr=3e-2"],
    "ln_tuning": ["peft=ln_tuning", "trainer.lr=1e-1"],
    "pissa": ["peft.init=pissa", "trainer.lr=1e-2"],
    "olora": ["peft.init=olora", "trainer.lr=1e-2"],
    "eva": ["peft.init=eva", "trainer.lr=3e-2"],
    "rank_pattern": ["peft.r=4", "+peft.rank_pattern={q_proj: 2, down_proj: 8}", "trainer.lr=3e-2"],
}
REPEATED_BATCH = [
    "data.max_rows=4",
    "trainer.micro_batch_size=4",
    "trainer.grad_accum=1",
    "trainer.max_steps=8",
    "peft.dropout=0",
    "trainer.max_grad_norm=0",
    "trainer.scheduler=constant",
]
IDS = torch.tensor([[5, 60, 7, 80, 9, 100, 33, 12]])


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def pruned_whole(model) -> set[str]:
    """AdaLoRA's singular values (lora_E, starting at zero) of the layers its budget cut to rank 0:
    masked from the start of pruning, they never move."""
    pattern = model.peft_config["default"].rank_pattern or {}
    return {f"base_model.model.{name}.default" for name, mask in pattern.items() if not any(mask)}


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_adapter_trains_lowers_the_loss_and_reloads(train_recipe, adapter):
    run = train_recipe("lora", *ADAPTERS[adapter], *REPEATED_BATCH)
    unchanged = set(run.unchanged_parameters()) - (pruned_whole(run.model) if adapter == "adalora" else set())
    assert run.initial and not unchanged, sorted(unchanged)[:3]
    losses = run.losses
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.05, losses
    reloaded = load_model(ModelConfig(name_or_path=str(run.dir)), for_training=False)
    torch.testing.assert_close(logits(reloaded), logits(run.model), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("adapter", ["ia3", "vera", "loha", "lokr", "oft", "boft", "adalora", "ln_tuning", "pissa"])
def test_merged_final_is_a_plain_model_with_the_same_outputs(train_recipe, adapter):
    run = train_recipe("lora", *ADAPTERS[adapter], "peft.merge_on_save=true", "trainer.max_steps=3", "data.max_rows=8")
    final = run.dir / "final"
    assert (final / "config.json").exists() and not (final / "adapter_config.json").exists()
    reloaded = load_model(ModelConfig(name_or_path=str(final)), for_training=False)
    assert not hasattr(reloaded, "peft_config")
    torch.testing.assert_close(logits(reloaded), logits(run.model), rtol=1e-4, atol=1e-4)


def test_adalora_moves_its_rank_budget_with_the_engine_steps(train_recipe):
    """r=12 everywhere at the start; after the schedule the adapter config holds a per-layer rank
    pattern, pruned ranks have zero singular values, and final/ saves that pattern."""
    run = train_recipe("lora", *ADAPTERS["adalora"], *REPEATED_BATCH)
    config = run.model.peft_config["default"]
    assert config.total_step == 8 and config.rank_pattern
    kept = {name: sum(mask) for name, mask in config.rank_pattern.items()}
    assert max(kept.values()) <= 12 and sum(kept.values()) < 12 * len(kept)
    zeros = [int((p == 0).sum()) for n, p in run.model.named_parameters() if "lora_E" in n]
    assert sum(zeros) == 12 * len(kept) - sum(kept.values())
    saved = json.loads((run.dir / "final" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["rank_pattern"]


def orthogonality(named: dict[str, torch.Tensor]) -> float:
    """mean ||P P^T - I||_F, ||Q^T Q - I||_F over the AdaLoRA matrices (weight 1)."""
    norms = []
    for name, p in named.items():
        if "lora_A" in name or "lora_B" in name:
            p = p.detach()
            cov = p @ p.T if "lora_A" in name else p.T @ p
            norms.append(float(torch.linalg.matrix_norm(cov - torch.eye(len(cov)))))
    return sum(norms) / len(norms)


def test_adalora_orthogonality_penalty_is_logged_and_trained(train_recipe):
    """peft's orthogonality penalty (weight 0.5) reaches the gradient: P and Q end closer to orthonormal
    than in the same run without it, and loss/adalora_orth logs it every step."""
    on = train_recipe("lora", *ADAPTERS["adalora"], *REPEATED_BATCH)
    start = orthogonality(on.initial)
    logged = [m["loss/adalora_orth"] for m in read_metrics(on.dir / "metrics.jsonl")]
    assert len(logged) == 8 and logged[0] == pytest.approx(0.5 * start, rel=1e-4)
    off = train_recipe("lora", *ADAPTERS["adalora"], *REPEATED_BATCH, "peft.adalora_orth_reg_weight=0")
    assert "loss/adalora_orth" not in read_metrics(off.dir / "metrics.jsonl")[0]
    trained = {name: orthogonality(dict(run.model.named_parameters())) for name, run in (("on", on), ("off", off))}
    assert trained["on"] < 0.9 * trained["off"], (start, trained)


def test_pissa_final_is_a_plain_lora_on_the_original_base(train_recipe):
    """PiSSA moves W's top singular directions into the adapter; final/ holds the plain LoRA update
    (rank 2r) that takes the untouched base to the trained model."""
    run = train_recipe("lora", *ADAPTERS["pissa"], "peft.r=4", "trainer.max_steps=3", "data.max_rows=8")
    saved = json.loads((run.dir / "final" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    base = load_model(ModelConfig(name_or_path="builtin:tiny"), for_training=False)
    reloaded = load_model(ModelConfig(name_or_path=str(run.dir)), for_training=False)
    torch.testing.assert_close(logits(reloaded), logits(run.model), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits(reloaded), logits(base), atol=1e-3)


def test_eva_starts_from_the_data_and_redistributes_ranks(train_recipe):
    """EVA's A rows are principal directions of the layer inputs (unit vectors, unlike peft's default
    init), and the rank budget (r per layer in total) is spread by explained variance."""
    run = train_recipe("lora", *ADAPTERS["eva"], "trainer.max_steps=2", "data.max_rows=32")
    config = run.model.peft_config["default"]
    a = {n: p for n, p in run.initial.items() if "lora_A" in n}
    assert a and all(torch.allclose(p.norm(dim=1), torch.ones(p.shape[0]), atol=1e-4) for p in a.values())
    ranks = [p.shape[0] for p in a.values()]
    assert config.rank_pattern and len(set(ranks)) > 1 and sum(ranks) == config.r * len(ranks)
    saved = json.loads((run.dir / "final" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == dict(config.rank_pattern)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="peft's LoftQ quantizes W on CUDA only (peft/utils/loftq_utils.py); no GPU"
)
def test_loftq_trains_on_cuda_and_final_is_the_merged_model(train_recipe):
    """LoftQ replaces W by its 4-bit round trip and starts A, B from the SVD of the error; the run
    trains, and final/ (merged: the adapter alone fits no plain base) gives the trained outputs."""
    base = load_model(ModelConfig(name_or_path="builtin:tiny"), for_training=False)
    run = train_recipe(
        "lora", "peft.init=loftq", "peft.merge_on_save=true", "trainer.device=cuda", "trainer.lr=1e-2", *REPEATED_BATCH
    )
    assert run.initial and not run.unchanged_parameters()
    assert run.losses[-1] < run.losses[0] - 0.05, run.losses
    final = run.dir / "final"
    assert (final / "config.json").exists() and not (final / "adapter_config.json").exists()
    reloaded = load_model(ModelConfig(name_or_path=str(final)), for_training=False)
    torch.testing.assert_close(logits(reloaded), logits(run.model.cpu()), rtol=1e-3, atol=1e-3)
    assert not torch.allclose(logits(reloaded), logits(base), atol=1e-3)
