"""Knowledge distillation: the run's model (the student) learns a teacher's next-token
distributions, on the data's completions (KD) and, with probability lambda per step, on
completions it samples itself, scored by the teacher (on-policy GKD, Agarwal et al., 2024).

    polmctl run recipe=distill method.teacher=outputs/sft/<date>/<time> model.name_or_path=<prune run>/final
    polmctl run recipe=distill method.loss=forward_kl method.temperature=2.0 method.on_policy_fraction=0
    polmctl run recipe=distill method.teacher=HuggingFaceTB/SmolLM2-1.7B-Instruct method.teacher_quantization=nf4

Features and the flag that controls each:
  the teacher                       method.teacher: builtin:<name> | hub id | model dir | polmctl run dir
  a lighter teacher                 method.teacher_dtype, method.teacher_quantization (none | nf4 | fp4 | int8)
  divergence                        method.loss: forward_kl | reverse_kl | jsd (method.beta; 0: forward, 1: reverse)
  softened distributions            method.temperature (the loss is scaled back by T^2)
  the data's own answers too        method.sft_weight (cross-entropy on the data's completion tokens)
  on-policy share of steps          method.on_policy_fraction (GKD's lambda; 0: offline only, as SFT)
  sampling                          method.rollout_temperature, method.top_p, method.max_new_tokens, method.stop
The divergences and their conventions are in distill_losses.py; the batch source that mixes
offline and on-policy steps in polmctl/rollout/distill.py.

Teacher and student must share a tokenizer (the loss compares the two distributions token id
by token id); the run stops before training when they do not. The teacher loads once, when
the runner asks for the batch source, in eval mode with no gradients; its logits are computed
in its own dtype, only at the trained positions, and cut to the tokenizer's length when an LM
head is padded beyond it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from polmctl.config.schema import ConfigError, ModelConfig, _f, one_of, positive
from polmctl.engine.errors import TrainingError
from polmctl.objectives import distill_losses as losses
from polmctl.objectives.base import LossTerms, labelled_logits
from polmctl.objectives.sft import SFTMethod, SFTObjective
from polmctl.rollout.sampling import SamplingOptions

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclass
class DistillMethod(SamplingOptions):
    objective: str = _f("distill", "distill: knowledge distillation from a teacher model (KD, on-policy GKD)")
    teacher: str = _f("builtin:smollm2-135m", "the teacher: builtin:<name>, a hub id, a model dir or a polmctl run "
                                              "dir (its final/); it must share the student's tokenizer")
    teacher_dtype: str = _f("auto", "the teacher's weights dtype: auto (bf16 on GPUs that support it, else fp32) | "
                                    "float32 | bfloat16 | float16")
    teacher_quantization: str = _f("none", "load the teacher quantized with bitsandbytes: none | nf4 | fp4 | int8")
    loss: str = _f("forward_kl", "forward_kl: KL(teacher || student) | reverse_kl: KL(student || teacher) | "
                                 "jsd: generalised Jensen-Shannon with method.beta")
    beta: float = _f(0.5, "jsd: the teacher's weight in the mixture; 0 is forward KL, 1 reverse KL (GKD, TRL)")
    temperature: float = _f(1.0, "T softening both distributions in the loss (scaled back by T^2); also samples "
                                 "the on-policy completions unless method.rollout_temperature is set")
    sft_weight: float = _f(0.0, "weight of a cross-entropy term on the data's completion tokens (offline steps)")
    on_policy_fraction: float = _f(0.0, "lambda: share of steps trained on completions sampled from the student "
                                        "(0: only the data's completions)")
    rollout_temperature: Optional[float] = _f(None, "sampling temperature of the on-policy completions "
                                                    "(None: method.temperature, as TRL's GKD)")

    def check(self, section: str) -> None:
        if not self.teacher:
            raise ConfigError(f"{section}.teacher", "is empty; give builtin:<name>, a hub id, a model dir or a run dir")
        one_of(section, "teacher_dtype", self.teacher_dtype, ("auto", "float32", "bfloat16", "float16"))
        one_of(section, "teacher_quantization", self.teacher_quantization, ("none", "nf4", "fp4", "int8"))
        one_of(section, "loss", self.loss, losses.LOSSES)
        for name in ("beta", "on_policy_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{section}.{name}", f"must be in [0, 1], got {getattr(self, name)!r}")
        positive(section, "sft_weight", self.sft_weight, zero_ok=True)
        if self.rollout_temperature is not None:
            positive(section, "rollout_temperature", self.rollout_temperature)
        self.check_sampling(section)  # temperature > 0, top_p, max_new_tokens, stop, backend


def teacher_model_config(method: DistillMethod, student: ModelConfig) -> ModelConfig:
    """How the teacher loads: its own name, dtype and quantization; the student's model cache."""
    return ModelConfig(name_or_path=method.teacher, dtype=method.teacher_dtype,
                       quantization=method.teacher_quantization, cache_dir=student.cache_dir)


def check_same_tokenizer(student_tokenizer, teacher_tokenizer, *, student: str, teacher: str) -> None:
    """Raise one ConfigError line naming both models unless their tokenizers agree: the same
    token -> id map and the same special tokens (the pad token aside: padding is masked, and
    polmctl fills a missing one with eos)."""
    difference = tokenizer_difference(student_tokenizer, teacher_tokenizer)
    if difference:
        raise ConfigError("method.teacher", f"the teacher {teacher} and the student {student} have different "
                          f"tokenizers ({difference}); distillation compares their next-token distributions id by id, "
                          "so pick a teacher of the student's model family (or a student made from the teacher, e.g. "
                          "model.name_or_path=<prune run>/final)")


def tokenizer_difference(student_tokenizer, teacher_tokenizer) -> str | None:
    """What first differs between two tokenizers, as 'student vs teacher'; None if nothing."""
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if len(s_vocab) != len(t_vocab):
        return f"vocab size {len(s_vocab)} vs {len(t_vocab)}"
    if s_vocab != t_vocab:
        token = next(t for t in sorted(s_vocab) if s_vocab[t] != t_vocab.get(t))
        where = f"id {t_vocab[token]}" if token in t_vocab else "absent"
        return f"token {token!r} is id {s_vocab[token]} vs {where}"
    s_special, t_special = _special_tokens(student_tokenizer), _special_tokens(teacher_tokenizer)
    for name in sorted(set(s_special) | set(t_special)):
        if s_special.get(name) != t_special.get(name):
            return f"{name} {s_special.get(name)!r} vs {t_special.get(name)!r}"
    return None


def _special_tokens(tokenizer) -> dict[str, Any]:
    tokens = {k: v for k, v in tokenizer.special_tokens_map.items() if k != "pad_token"}
    return {k: sorted(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for k, v in tokens.items()}


def _head_size(model) -> int | None:
    """Rows of the LM head (out_features: a bitsandbytes 4-bit weight is stored flattened)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(head, "out_features", None):
        return int(head.out_features)
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None


class DistillObjective:
    """Divergence to the teacher per trained token (+ sft_weight x cross-entropy on the data's
    completion tokens), normalised by the step's trained tokens as SFT is.

    Batches are SFT's (same encode and collate); an on-policy batch (polmctl/rollout/distill.py)
    holds the student's own completions as its labels and ``on_policy`` [B], and gets no SFT term.
    Metrics, per-token means: ``loss/distill`` (the trained divergence, T^2 included),
    ``loss/sft`` (the data's cross-entropy, offline steps only) and ``kl_to_teacher``
    (KL(teacher || student) at T = 1, whatever the loss: comparable across runs).
    """

    def __init__(self, method: DistillMethod):
        self.method = method
        self.sft = SFTObjective(SFTMethod())
        self.teacher: torch.nn.Module | None = None
        self.vocab_size: int | None = None  # the shared tokenizer's length: logits are cut to it

    # -- data: exactly SFT's -------------------------------------------------------------------
    def encode(self, rows: list[dict], tokenizer, data) -> tuple[list[dict], Any]:
        return self.sft.encode(rows, tokenizer, data)

    def collate(self, examples: list[dict]) -> dict:
        return self.sft.collate(examples)

    def weight(self, batch: dict) -> int:
        return self.sft.weight(batch)

    # -- the teacher ---------------------------------------------------------------------------
    def make_batches(self, examples: list[dict], *, model, tokenizer, cfg, accelerator):
        """Load the teacher (once), then the trainer's batch source: None (the runner's offline
        batches, as SFT) when method.on_policy_fraction is 0, else one that mixes offline and
        on-policy steps."""
        self.load_teacher(cfg.model, tokenizer, device=accelerator.device, student=model)
        if self.method.on_policy_fraction == 0:
            return None
        from polmctl.rollout.distill import DistillBatches

        return DistillBatches(examples, collate=self.collate, method=self.method, tokenizer=tokenizer,
                              trainer_cfg=cfg.trainer, seed=cfg.seed, shuffle=cfg.data.shuffle, accelerator=accelerator)

    def load_teacher(self, student_cfg: ModelConfig, tokenizer, *, device, student=None) -> None:
        """Check the tokenizers (before any teacher weights load), then load the teacher for
        inference. Nothing happens if a teacher is already set."""
        if self.teacher is not None:
            return
        from polmctl.models import load_model, load_tokenizer, model_head, resolve_model_path

        teacher_cfg = teacher_model_config(self.method, student_cfg)
        check_same_tokenizer(tokenizer, load_tokenizer(teacher_cfg), student=student_cfg.name_or_path,
                             teacher=self.method.teacher)
        if model_head(resolve_model_path(teacher_cfg.name_or_path, teacher_cfg.cache_dir)) == "reward":
            raise ConfigError("method.teacher", f"{self.method.teacher} is a reward model (a score head, no "
                              "next-token distribution); give a causal LM or a run dir of an LM recipe")
        vocab = len(tokenizer)
        size = _head_size(student) if student is not None else None
        if size is not None and size < vocab:
            raise ConfigError("model.name_or_path", f"the student {student_cfg.name_or_path} has an LM head of {size} "
                              f"tokens, fewer than its tokenizer's {vocab}; use a model whose head covers it")
        teacher = load_model(teacher_cfg, device=device, for_training=False, head="causal_lm")
        size = _head_size(teacher)
        if size is not None and size < vocab:
            raise ConfigError("method.teacher", f"the teacher {self.method.teacher} has an LM head of {size} tokens, "
                              f"fewer than the shared tokenizer's {vocab}; use a teacher whose head covers it")
        self.set_teacher(teacher, vocab)

    def set_teacher(self, teacher: torch.nn.Module, vocab_size: int | None = None) -> None:
        """Use ``teacher`` (frozen, eval mode); logits are cut to ``vocab_size`` (None: as they come)."""
        self.teacher = teacher.eval().requires_grad_(False)
        self.vocab_size = vocab_size

    @torch.no_grad()
    def teacher_logits(self, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            raise TrainingError("distill: no teacher is loaded (make_batches loads it before training)")
        self.teacher.eval()
        return labelled_logits(self.teacher, inputs, labels).logits

    # -- the step ------------------------------------------------------------------------------
    def __call__(self, model: torch.nn.Module, batch: dict) -> LossTerms:
        m = self.method
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        # Both heads run on the trained positions only: [n, V] each, row-major over the same mask.
        head = labelled_logits(model, inputs, batch["labels"])
        student, teacher, targets = head.logits, self.teacher_logits(inputs, batch["labels"]), head.targets
        vocab = self.vocab_size or min(student.size(-1), teacher.size(-1))
        # Only the tokenizer's ids (a head may be padded past it).
        student, teacher = student[..., :vocab].float(), teacher[..., :vocab].float()
        distill = losses.divergence(student, teacher, loss=m.loss, beta=m.beta, temperature=m.temperature).sum()
        on_policy = bool(batch["on_policy"].any()) if "on_policy" in batch else False
        tokens = head.mask.sum()
        if on_policy:  # the labels are the student's own samples: no cross-entropy on them
            nll, sft_tokens = distill.new_zeros(()), tokens.new_zeros(())
        else:
            nll, sft_tokens = F.cross_entropy(student, targets, reduction="sum"), tokens
        loss_sum = distill + m.sft_weight * nll if m.sft_weight and not on_policy else distill
        with torch.no_grad():
            kl_to_teacher = losses.kl(losses.softened_log_probs(teacher), losses.softened_log_probs(student)).sum()
        metrics = {"loss/distill": distill.detach(), "loss/sft": (nll.detach(), sft_tokens),
                   "kl_to_teacher": kl_to_teacher}
        return LossTerms(loss_sum=loss_sum, weight=tokens, metrics=metrics)
