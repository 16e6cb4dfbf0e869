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
The divergences and their conventions are in polmctl/losses/distill.py.

Teacher and student must share a tokenizer (the loss compares the two distributions token id
by token id); the run stops before training when they do not. The teacher loads once, when
the runner asks for the batch source, in eval mode with no gradients; its logits are computed
in its own dtype, only at the trained positions, and cut to the tokenizer's length when an LM
head is padded beyond it.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from polmctl.config.schema import ModelConfig, one_of, option, positive
from polmctl.data.prompts import completion_batches
from polmctl.engine.batches import BatchSource, OfflineBatches
from polmctl.engine.contract import LossTerms, Objective
from polmctl.errors import ConfigError, TrainingError
from polmctl.losses import IGNORE_INDEX
from polmctl.losses import distill as losses
from polmctl.methods.sft import SFTObjective
from polmctl.models.forward import labelled_logits
from polmctl.rollout.backends import make_backend
from polmctl.rollout.sampling import SamplingOptions

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclass
class DistillMethod(SamplingOptions):
    name: str = option("distill", "distill: knowledge distillation from a teacher model (KD, on-policy GKD)")
    teacher: str = option(
        "builtin:smollm2-135m",
        "the teacher: builtin:<name>, a hub id, a model dir or a polmctl run "
        "dir (its final/); it must share the student's tokenizer",
    )
    teacher_dtype: str = option(
        "auto_gpu",
        "the teacher's weights dtype: auto_gpu (bf16 on CUDA GPUs of compute capability >= 8.0, else fp32) | "
        "auto (also bf16 on CPUs with AVX512-BF16 or AMX-BF16) | float32 | bfloat16 | float16",
    )
    teacher_quantization: str = option("none", "load the teacher quantized with bitsandbytes: none | nf4 | fp4 | int8")
    loss: str = option(
        "forward_kl",
        "forward_kl: KL(teacher || student) | reverse_kl: KL(student || teacher) | "
        "jsd: generalised Jensen-Shannon with method.beta",
    )
    beta: float = option(0.5, "jsd: the teacher's weight in the mixture; 0 is forward KL, 1 reverse KL (GKD, TRL)")
    temperature: float = option(
        1.0,
        "T softening both distributions in the loss (scaled back by T^2); also samples "
        "the on-policy completions unless method.rollout_temperature is set",
    )
    sft_weight: float = option(0.0, "weight of a cross-entropy term on the data's completion tokens (offline steps)")
    on_policy_fraction: float = option(
        0.0, "lambda: share of steps trained on completions sampled from the student (0: only the data's completions)"
    )
    rollout_temperature: Optional[float] = option(
        None, "sampling temperature of the on-policy completions (None: method.temperature, as TRL's GKD)"
    )

    def check(self, section: str) -> None:
        if not self.teacher:
            raise ConfigError(f"{section}.teacher", "is empty; give builtin:<name>, a hub id, a model dir or a run dir")
        one_of(section, "teacher_dtype", self.teacher_dtype, ("auto_gpu", "auto", "float32", "bfloat16", "float16"))
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
    return ModelConfig(
        name_or_path=method.teacher,
        dtype=method.teacher_dtype,
        quantization=method.teacher_quantization,
        cache_dir=student.cache_dir,
    )


def check_same_tokenizer(student_tokenizer, teacher_tokenizer, *, student: str, teacher: str) -> None:
    """Raise one ConfigError line naming both models unless their tokenizers agree: the same
    token -> id map and the same special tokens (the pad token aside: padding is masked, and
    polmctl fills a missing one with eos)."""
    difference = tokenizer_difference(student_tokenizer, teacher_tokenizer)
    if difference:
        raise ConfigError(
            "method.teacher",
            f"the teacher {teacher} and the student {student} have different "
            f"tokenizers ({difference}); distillation compares their next-token distributions id by id, "
            "so pick a teacher of the student's model family (or a student made from the teacher, e.g. "
            "model.name_or_path=<prune run>/final)",
        )


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


class DistillObjective(Objective):
    """Divergence to the teacher per trained token (+ sft_weight x cross-entropy on the data's
    completion tokens), normalised by the step's trained tokens as SFT is.

    Batches are SFT's (same encode and collate); an on-policy batch (``DistillBatches`` below)
    holds the student's own completions as its labels and ``on_policy`` [B], and gets no SFT term.
    Metrics, per-token means: ``loss/distill`` (the trained divergence, T^2 included),
    ``loss/sft`` (the data's cross-entropy, offline steps only) and ``kl_to_teacher``
    (KL(teacher || student) at T = 1, whatever the loss: comparable across runs).
    """

    def __init__(self, method: DistillMethod):
        self.method = method
        self.sft = SFTObjective()
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
    def make_batches(self, examples: list[dict], *, model, tokenizer, cfg, accelerator) -> DistillBatches | None:
        """Load the teacher (once), then the trainer's batch source: None (the runner's offline
        batches, as SFT) when method.on_policy_fraction is 0, else one that mixes offline and
        on-policy steps."""
        self.load_teacher(cfg.model, tokenizer, device=accelerator.device, student=model)
        if self.method.on_policy_fraction == 0:
            return None
        return DistillBatches(
            examples,
            collate=self.collate,
            method=self.method,
            tokenizer=tokenizer,
            trainer_cfg=cfg.trainer,
            seed=cfg.seed,
            shuffle=cfg.data.shuffle,
            accelerator=accelerator,
        )

    def load_teacher(self, student_cfg: ModelConfig, tokenizer, *, device, student=None) -> None:
        """Check the tokenizers (before any teacher weights load), then load the teacher for
        inference. Nothing happens if a teacher is already set."""
        if self.teacher is not None:
            return
        from polmctl.models import load_model, load_tokenizer, model_head, resolve_model_path

        teacher_cfg = teacher_model_config(self.method, student_cfg)
        check_same_tokenizer(
            tokenizer, load_tokenizer(teacher_cfg), student=student_cfg.name_or_path, teacher=self.method.teacher
        )
        if model_head(resolve_model_path(teacher_cfg.name_or_path, teacher_cfg.cache_dir)) == "reward":
            raise ConfigError(
                "method.teacher",
                f"{self.method.teacher} is a reward model (a score head, no "
                "next-token distribution); give a causal LM or a run dir of an LM recipe",
            )
        vocab = len(tokenizer)
        size = _head_size(student) if student is not None else None
        if size is not None and size < vocab:
            raise ConfigError(
                "model.name_or_path",
                f"the student {student_cfg.name_or_path} has an LM head of {size} "
                f"tokens, fewer than its tokenizer's {vocab}; use a model whose head covers it",
            )
        teacher = load_model(teacher_cfg, device=device, for_training=False, head="causal_lm")
        size = _head_size(teacher)
        if size is not None and size < vocab:
            raise ConfigError(
                "method.teacher",
                f"the teacher {self.method.teacher} has an LM head of {size} tokens, "
                f"fewer than the shared tokenizer's {vocab}; use a teacher whose head covers it",
            )
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
        metrics = {
            "loss/distill": distill.detach(),
            "loss/sft": (nll.detach(), sft_tokens),
            "kl_to_teacher": kl_to_teacher,
        }
        return LossTerms(loss_sum=loss_sum, weight=tokens, metrics=metrics)


# -- on-policy steps ---------------------------------------------------------------------------
# Each step is either the data's completions (as SFT) or, with probability method.on_policy_fraction
# (GKD's lambda), completions sampled from the student for the same prompts, which the objective
# then scores with the teacher. Both kinds read the data through one seeded, resumable sampler, so an
# on-policy step uses the prompts of the micro-batches it replaces and the data position moves on
# either way. Whether step n is on-policy is a function of (run seed, n): the same on every process
# and after a resume. A row's prompt is its tokens before the first trained one; one completion is
# sampled per prompt with the method's sampling options.


def on_policy_step(seed: int, step: int, fraction: float) -> bool:
    """Whether optimizer step ``step`` (1-based) samples from the student: a seeded coin with
    P(heads) = ``fraction``, independent of any other RNG."""
    if fraction >= 1:
        return True
    if fraction <= 0:
        return False
    return random.Random(seed * 1_000_003 + step).random() < fraction


def prompt_length(example: dict) -> int:
    """Tokens before the example's first trained token (0: the row has no prompt)."""
    return next((i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX), len(example["labels"]))


class DistillBatches(BatchSource):
    counters = ("steps",)

    def __init__(
        self,
        examples: list[dict],
        *,
        collate,
        method,
        tokenizer,
        trainer_cfg,
        seed: int,
        shuffle: bool,
        accelerator,
        backend=None,
    ):
        without = next((i for i, e in enumerate(examples) if prompt_length(e) == 0), None)
        if without is not None:
            raise ConfigError(
                "method.on_policy_fraction",
                f"on-policy steps sample completions for the data's "
                f"prompts, and example {without} has none (text rows, or data.completion_only_loss="
                "false, train every token); use prompt/completion or messages rows, or set "
                "method.on_policy_fraction=0",
            )
        self.examples, self.method, self.tokenizer = examples, method, tokenizer
        self.micro_batch_size, self.grad_accum, self.seed = trainer_cfg.micro_batch_size, trainer_cfg.grad_accum, seed
        self.offline = OfflineBatches(
            examples,
            collate,
            trainer_cfg.micro_batch_size,
            trainer_cfg.grad_accum,
            seed=seed,
            shuffle=shuffle,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )
        self.sampler = self.offline.sampler  # one data position for both kinds of step
        self.backend = backend or make_backend(method)
        # What backend.sample reads (temperature, top_p, max_new_tokens, stop): the rollout's own temperature.
        self.sampling = (
            method
            if method.rollout_temperature is None
            else dataclasses.replace(method, temperature=method.rollout_temperature)
        )
        self.steps = 0

    def next_step(self, model) -> tuple[list[dict], dict[str, float]]:
        self.steps += 1
        if not on_policy_step(self.seed, self.steps, self.method.on_policy_fraction):
            batches, metrics = self.offline.next_step(model)
            return batches, {**metrics, "on_policy": 0.0}
        return self._rollout(model)

    def _rollout(self, model) -> tuple[list[dict], dict[str, float]]:
        started = time.perf_counter()
        tok = self.tokenizer
        chosen = [self.examples[i] for _ in range(self.grad_accum) for i in self.sampler.next()]
        # The backend takes text; the prompt ids come back exactly from it (tokenize with
        # add_special_tokens=False is how the data encoded them), and the sequence trains on those.
        texts = [
            tok.decode(
                e["input_ids"][: prompt_length(e)], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            for e in chosen
        ]
        completions = self.backend.sample(model, tok, texts, 1, self.sampling)
        prompts = [tok(text, add_special_tokens=False)["input_ids"] for text in texts]
        batches = completion_batches(
            prompts,
            completions,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            micro_batch_size=self.micro_batch_size,
            on_policy=torch.ones(len(prompts), dtype=torch.bool),
        )
        lengths = [len(c) for c in completions]
        return batches, {
            "on_policy": 1.0,
            "completion_length": sum(lengths) / len(lengths),
            "rollout_time_s": time.perf_counter() - started,
        }
