"""Before timing: do polmctl and TRL compute the same loss on the same first batch?

    .venv/bin/python benchmarks/vs_trl.py --check-only --model tiny          # every method, seconds
    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/benchmarks/test_vs_trl.py

One LoRA model serves both sides, its adapters' B matrices set to seeded random values (at
init B = 0, the policy equals its reference and DPO's loss is log 2 whatever the code does).
Each side makes its first micro-batch from the same rows with its own data pipeline; the
check compares the token ids and trained-token masks, the loss, and the LoRA gradient
(relative L2 distance), which exercises every per-token log-prob the loss depends on.

GRPO samples, so both sides cannot draw the same completions: polmctl runs one rollout and
TRL's ``_compute_loss`` gets those completions, rewards' advantages and all, in its own
layout (left-padded prompt ids, right-padded completion ids). On-policy the loss value is
-mean(advantage) for both whatever the log-probs, so there the gradient is the real check.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch
from _polmctl_side import PolmctlSide, first_batch
from _trl_side import build_trainer
from _workload import Workload

IGNORE_INDEX = -100
LOSS_RTOL = 1e-3  # float32 sums in a different order, and a fused (chunked) LM head on TRL's side
GRAD_RTOL = 1e-2  # ||g_polmctl - g_trl|| / ||g_trl||


@dataclass
class Equivalence:
    method: str
    same_tokens: bool
    polmctl_loss: float
    trl_loss: float
    grad_rel_diff: float
    note: str = ""

    @property
    def loss_rel_diff(self) -> float:
        return abs(self.polmctl_loss - self.trl_loss) / max(abs(self.trl_loss), 1e-8)

    @property
    def ok(self) -> bool:
        loss_ok = self.loss_rel_diff <= LOSS_RTOL or abs(self.polmctl_loss - self.trl_loss) <= 1e-6
        return self.same_tokens and loss_ok and self.grad_rel_diff <= GRAD_RTOL

    def as_dict(self) -> dict:
        return {
            "same_tokens": self.same_tokens,
            "polmctl_loss": self.polmctl_loss,
            "trl_loss": self.trl_loss,
            "loss_rel_diff": self.loss_rel_diff,
            "grad_rel_diff": self.grad_rel_diff,
            "ok": self.ok,
            "loss_rtol": LOSS_RTOL,
            "grad_rtol": GRAD_RTOL,
            "note": self.note,
        }


def perturb_adapters(model: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.default" in name:  # not TRL's frozen "ref" copy of the starting adapter
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _loss_and_grad(model, compute) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    grad = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.requires_grad and p.grad is not None])
    model.zero_grad(set_to_none=True)
    return loss.item(), grad


def _rows_of(ids: torch.Tensor, keep: torch.Tensor) -> list[list[int]]:
    return [row[mask].tolist() for row, mask in zip(ids, keep.bool())]


def _unpacked(batch: dict) -> dict:
    """A padding-free packed batch (one row, positions restarting per example) as right-padded rows."""
    if "position_ids" not in batch:
        return batch
    positions = batch["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist() + [positions.numel()]
    spans = list(zip(starts[:-1], starts[1:]))
    width = max(b - a for a, b in spans)
    out = {
        "input_ids": torch.zeros(len(spans), width, dtype=torch.long),
        "attention_mask": torch.zeros(len(spans), width, dtype=torch.long),
        "labels": torch.full((len(spans), width), IGNORE_INDEX),
    }
    for i, (a, b) in enumerate(spans):
        out["input_ids"][i, : b - a] = batch["input_ids"][0, a:b]
        out["attention_mask"][i, : b - a] = 1
        out["labels"][i, : b - a] = batch["labels"][0, a:b]
    return out


def check(w: Workload) -> Equivalence:
    side = PolmctlSide(w)
    model = side.model
    # Given a model that already carries an adapter, TRL's DPO keeps a copy of it as the
    # reference ("ref"): build the trainer first, so that copy is the starting (B = 0) adapter.
    trainer = build_trainer(w, tempfile.mkdtemp(prefix=f"bench-equiv-{w.method}-"), model=model)
    perturb_adapters(model, w.seed)
    model.train()
    trainer.model.train()
    if w.method == "grpo":
        return _check_grpo(side, trainer)

    batch = first_batch(side)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    # Same data and masking: every row's real tokens, and which of them are trained.
    trl_trained = (
        inputs["labels"]
        if "labels" in inputs
        else inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
    )
    rows = _unpacked(batch)  # polmctl's SFT packs its micro-batch (data.packing=true); TRL pads it
    same = _rows_of(rows["input_ids"], rows["attention_mask"]) == _rows_of(
        inputs["input_ids"], inputs["attention_mask"]
    ) and _rows_of(rows["labels"], rows["labels"] != IGNORE_INDEX) == _rows_of(trl_trained, trl_trained != IGNORE_INDEX)

    def polmctl_loss():
        return side.objective(model, batch).loss_sum / side.objective.weight(batch)

    p_loss, p_grad = _loss_and_grad(model, polmctl_loss)

    def trl_loss():
        with trainer.accelerator.autocast():  # TRL's bf16: its training step runs compute_loss under it
            return trainer.compute_loss(trainer.model, dict(inputs))

    t_loss, t_grad = _loss_and_grad(model, trl_loss)
    note = "DPO: polmctl's reference log-probs precomputed, TRL's by a reference forward" if w.method == "dpo" else ""
    return Equivalence(w.method, same, p_loss, t_loss, ((p_grad - t_grad).norm() / t_grad.norm()).item(), note)


def _trl_grpo_inputs(batch: dict, pad_id: int) -> dict:
    """polmctl's rollout micro-batch (prompt + completion rows, labels on the completion) in
    the layout of TRL's GRPO ``_compute_loss``."""
    prompts, completions = [], []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        real = ids[mask.bool()]
        start = int((labels != IGNORE_INDEX).nonzero()[0])
        prompts.append(real[:start])
        completions.append(real[start:])
    width_p, width_c = max(map(len, prompts)), max(map(len, completions))
    n = len(prompts)
    out = {
        "prompt_ids": torch.full((n, width_p), pad_id),
        "prompt_mask": torch.zeros(n, width_p, dtype=torch.long),
        "completion_ids": torch.full((n, width_c), pad_id),
        "completion_mask": torch.zeros(n, width_c, dtype=torch.long),
        "advantages": batch["advantages"].float(),
    }
    for i, (p, c) in enumerate(zip(prompts, completions)):
        out["prompt_ids"][i, width_p - len(p) :], out["prompt_mask"][i, width_p - len(p) :] = p, 1
        out["completion_ids"][i, : len(c)], out["completion_mask"][i, : len(c)] = c, 1
    out["num_items_in_batch"] = out["completion_mask"].sum()
    return out


def _check_grpo(side: PolmctlSide, trainer) -> Equivalence:
    model = side.model
    batches, _ = side.trainer.batches.next_step(model)
    batch = batches[0]
    inputs = _trl_grpo_inputs(batch, side.tokenizer.pad_token_id)
    trainer.current_gradient_accumulation_steps = 1  # set by TRL's train loop; one micro-batch here

    def polmctl_loss():
        return side.objective(model, batch).loss_sum / side.objective.weight(batch)

    p_loss, p_grad = _loss_and_grad(model, polmctl_loss)

    def trl_loss():
        with trainer.accelerator.autocast():
            return trainer._compute_loss(trainer.model, inputs)

    t_loss, t_grad = _loss_and_grad(model, trl_loss)
    note = (
        "GRPO: TRL scored polmctl's sampled completions (same rows); on-policy the loss is -mean(A), "
        "the gradient carries the log-probs"
    )
    return Equivalence(
        "grpo", True, p_loss, t_loss, ((p_grad - t_grad).norm() / t_grad.norm().clamp(min=1e-12)).item(), note
    )
