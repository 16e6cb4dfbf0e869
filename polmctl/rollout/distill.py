"""On-policy distillation's batch source: each step is either the data's completions (as SFT)
or, with probability ``method.on_policy_fraction`` (GKD's lambda), completions sampled from
the student for the same prompts, which the objective then scores with the teacher.

    polmctl run recipe=distill method.on_policy_fraction=1.0 method.max_new_tokens=32

Both kinds of step read the data through one seeded, resumable sampler, so an on-policy step
uses the prompts of the micro-batches it replaces and the data position moves on either way.
Whether step n is on-policy is a function of (run seed, n): the same on every process and
after a resume. A row's prompt is its tokens before the first trained one (prompt/completion
rows: the rendered prompt; messages rows: the conversation up to the first assistant turn);
one completion is sampled per prompt with the method's sampling options.
"""

from __future__ import annotations

import dataclasses
import random
import time

import torch

from polmctl.config.schema import ConfigError
from polmctl.data.preference import IGNORE_INDEX, pad_sequences
from polmctl.engine.batches import OfflineBatches
from polmctl.rollout.backends import make_backend


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


class DistillBatches:
    def __init__(self, examples: list[dict], *, collate, method, tokenizer, trainer_cfg, seed: int, shuffle: bool,
                 accelerator, backend=None):
        without = next((i for i, e in enumerate(examples) if prompt_length(e) == 0), None)
        if without is not None:
            raise ConfigError("method.on_policy_fraction", f"on-policy steps sample completions for the data's "
                              f"prompts, and example {without} has none (text rows, or data.completion_only_loss="
                              "false, train every token); use prompt/completion or messages rows, or set "
                              "method.on_policy_fraction=0")
        self.examples, self.method, self.tokenizer = examples, method, tokenizer
        self.micro_batch_size, self.grad_accum, self.seed = trainer_cfg.micro_batch_size, trainer_cfg.grad_accum, seed
        self.offline = OfflineBatches(examples, collate, trainer_cfg.micro_batch_size, trainer_cfg.grad_accum,
                                      seed=seed, shuffle=shuffle, rank=accelerator.process_index,
                                      world_size=accelerator.num_processes)
        self.sampler = self.offline.sampler  # one data position for both kinds of step
        self.backend = backend or make_backend(method)
        # What backend.sample reads (temperature, top_p, max_new_tokens, stop): the rollout's own temperature.
        self.sampling = method if method.rollout_temperature is None else dataclasses.replace(
            method, temperature=method.rollout_temperature)
        self.steps = 0

    # -- the batch-source interface of engine.Trainer ------------------------------------------
    def next_step(self, model) -> tuple[list[dict], dict[str, float]]:
        self.steps += 1
        if not on_policy_step(self.seed, self.steps, self.method.on_policy_fraction):
            batches, metrics = self.offline.next_step(model)
            return batches, {**metrics, "on_policy": 0.0}
        return self._rollout(model)

    @property
    def progress_epochs(self) -> float:
        return self.sampler.progress_epochs

    def state_dict(self) -> dict:
        return {**self.sampler.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self.steps = state.get("steps", 0)

    # -- an on-policy step ---------------------------------------------------------------------
    def _rollout(self, model) -> tuple[list[dict], dict[str, float]]:
        started = time.perf_counter()
        tok = self.tokenizer
        chosen = [self.examples[i] for _ in range(self.grad_accum) for i in self.sampler.next()]
        # The backend takes text; the prompt ids come back exactly from it (tokenize with
        # add_special_tokens=False is how the data encoded them), and the sequence trains on those.
        texts = [tok.decode(e["input_ids"][: prompt_length(e)], skip_special_tokens=False,
                            clean_up_tokenization_spaces=False) for e in chosen]
        completions = self.backend.sample(model, tok, texts, 1, self.sampling)
        sequences, labels = [], []
        for text, completion in zip(texts, completions):
            prompt = tok(text, add_special_tokens=False)["input_ids"]
            completion = completion or [tok.eos_token_id]  # an empty sample still has a token to score
            sequences.append(prompt + completion)
            labels.append([IGNORE_INDEX] * len(prompt) + completion)
        batches = []
        for start in range(0, len(sequences), self.micro_batch_size):
            batch = pad_sequences(sequences[start : start + self.micro_batch_size],
                                  labels[start : start + self.micro_batch_size], tok.pad_token_id)
            batch["on_policy"] = torch.ones(batch["input_ids"].size(0), dtype=torch.bool)
            batches.append(batch)
        lengths = [len(c) for c in completions]
        return batches, {"on_policy": 1.0, "completion_length": sum(lengths) / len(lengths),
                         "rollout_time_s": time.perf_counter() - started}
