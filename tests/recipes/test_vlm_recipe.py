"""recipe=vlm_adapter on the tiny LM: stage 1 trains only the projector, stage 2 also LoRA;
final/ reloads, and `polmctl eval <run dir>` re-scores it through the vlm runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import polmctl.runners.vlm as vlm_runner
from polmctl.cli import _run_eval_overrides
from polmctl.compose import compose_config
from polmctl.engine.metrics import read_metrics
from polmctl.validate import validate

pytestmark = pytest.mark.recipes

FAST = [
    "model=tiny",
    "logger.progress=false",
    "trainer.warmup_ratio=0",
    "trainer.micro_batch_size=4",
    "data.max_rows=64",
    "eval.max_samples=4",
    "eval.batch_size=4",
    "eval.max_new_tokens=2",
]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before: dict[str, torch.Tensor], model) -> set[str]:
    now = dict(model.named_parameters())
    return {n for n, p in before.items() if not torch.equal(p, now[n].detach())}


def run(out: Path, monkeypatch, *overrides: str) -> tuple[dict, dict]:
    """Run the recipe; returns the summary and what the test hooks saw."""
    seen: dict = {}
    build, add = vlm_runner.build_vlm, vlm_runner.add_lm_adapters

    def capturing_build(*args, **kwargs):
        model, processor = build(*args, **kwargs)
        seen.update(model=model, initial=snapshot(model))
        return model, processor

    def capturing_add(model, peft):
        wrapped = add(model, peft)
        seen.update(peft_model=wrapped, before_stage2=snapshot(wrapped))
        return wrapped

    monkeypatch.setattr(vlm_runner, "build_vlm", capturing_build)
    monkeypatch.setattr(vlm_runner, "add_lm_adapters", capturing_add)
    composed = compose_config(["recipe=vlm_adapter", *FAST, *overrides, f"output_dir={out}"])
    (out / ".hydra").mkdir(parents=True)
    OmegaConf.save(composed, out / ".hydra" / "config.yaml")  # what a Hydra run dir holds
    cfg = validate(composed)
    summary = vlm_runner.run_vlm(cfg)
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    return summary, seen


def test_stage1_trains_only_the_projector(tmp_path, monkeypatch):
    summary, seen = run(tmp_path, monkeypatch, "trainer.max_steps=3", "method.stage1_fraction=1.0")
    moved = changed(seen["initial"], seen["model"])
    projector = {n for n in seen["initial"] if "multi_modal_projector" in n}
    assert moved == projector  # LM and vision encoder frozen, every projector tensor updated
    assert "peft_model" not in seen and [s["stage"] for s in summary["stages"]] == [1]
    assert len(read_metrics(tmp_path / "stage1" / "metrics.jsonl")) == 3
    assert set(summary["eval"]["before"]["vqa"]) == {"accuracy", "n", "chance"}


def test_two_stages_train_projector_then_lora_and_final_reloads(tmp_path, monkeypatch):
    summary, seen = run(tmp_path, monkeypatch, "trainer.max_steps=4", "peft.r=4")
    assert [(s["stage"], s["steps"]) for s in summary["stages"]] == [(1, 2), (2, 2)]
    assert summary["stages"][1]["trainable_params"] > summary["stages"][0]["trainable_params"]
    moved = changed(seen["before_stage2"], seen["peft_model"])
    assert any("lora_B" in n for n in moved) and any("multi_modal_projector" in n for n in moved)
    assert all("lora_" in n or "multi_modal_projector" in n for n in moved)

    # final/ is the LLaVA model with the LoRA update merged: its LM differs from the start,
    # its vision encoder does not.
    from transformers import LlavaForConditionalGeneration

    final = LlavaForConditionalGeneration.from_pretrained(tmp_path / "final")
    saved = dict(final.named_parameters())
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(saved[q_proj], seen["initial"][q_proj])
    for name in (n for n in seen["initial"] if "vision_tower" in n):
        assert torch.equal(saved[name], seen["initial"][name])
    samples = [json.loads(l) for l in (tmp_path / "eval" / "vqa-after.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"prompt", "completion", "predicted", "answer", "correct"} <= set(samples[0])

    # `polmctl eval <run dir>` composes these overrides (a vlm run dir brings recipe=vlm_adapter).
    overrides = [
        "eval.before=false",
        f"model.name_or_path={tmp_path}",
        *_run_eval_overrides(tmp_path),
        "eval.max_samples=4",
        "eval.max_new_tokens=2",
    ]
    again = vlm_runner.run_vlm(validate(compose_config([*overrides, f"output_dir={tmp_path / 'reeval'}"])))
    assert again["eval"]["vqa"] == summary["eval"]["after"]["vqa"]
    reeval = [json.loads(l) for l in (tmp_path / "reeval" / "eval" / "vqa.jsonl").read_text().splitlines()]
    assert [s["completion"] for s in reeval] == [s["completion"] for s in samples]
