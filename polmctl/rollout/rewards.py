"""Reward functions for online RL (GRPO, RLOO, PPO, rejection sampling).

A reward function is a plain callable

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]

where ``columns`` are the dataset's other columns, each a list aligned with ``prompts``
(``answer=[...]`` for builtin:arithmetic). A recipe lists its rewards by registry name or
by ``_target_``, each with an optional weight:

    rewards:
      - math_answer                              # weight 1
      - {name: format, weight: 0.2}
      - {name: length_penalty, weight: 0.1, kwargs: {target: 300}}
      - {name: reward_model, path: outputs/reward_model/2026-11-25/10-00-00}
      - {name: prm, path: outputs/prm/2026-12-03/10-00-00, kwargs: {aggregate: product}}
      - {_target_: mypkg.rewards.my_reward, weight: 0.5}

``kwargs`` are passed to the reward function on every call; the spec's other keys
(``path`` above) build it: a registry factory, or a ``_target_`` class or factory, is
called with them once. ``CombinedReward`` sums the weighted rewards of a batch, keeps each
function's raw values for logging, and turns any misbehaving function into a one-line
``RewardError`` that names it and the batch.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import re
from typing import Any, Callable, Sequence

import torch

from polmctl.data.builtin.answers import extract_answer
from polmctl.data.formats import format_completion, format_prompt
from polmctl.data.preference import pad_sequences
from polmctl.errors import RewardError
from polmctl.rollout.math_check import same_answer
from polmctl.rollout.process_reward import load_prm_scorer
from polmctl.targets import resolve_target

RewardFn = Callable[..., Sequence[float]]


# --- verifiable rewards ------------------------------------------------------------------

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# One think block, then one answer block, and nothing else but whitespace.
R1_FORMAT = re.compile(r"\s*<think>(?:(?!</?think>).)*</think>\s*<answer>(?:(?!</?answer>).)*</answer>\s*", re.DOTALL)


def last_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` in ``text``, nested braces included
    (``\boxed{\frac{1}{2}}`` -> ``\frac{1}{2}``); None if there is none or it is unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start + len("\\boxed{") - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + len("\\boxed{") : i]
    return None


def _held_answer(completion: str) -> str | None:
    r"""The last ``<answer>`` tag's content (or the ``\boxed{}`` inside it), else the last ``\boxed{}``."""
    tagged = ANSWER_TAG.findall(completion)
    text = tagged[-1] if tagged else completion
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    return text.strip() if tagged else None


def final_answer(completion: str) -> str | None:
    r"""The answer a completion gives: the last ``<answer>`` tag's content (or the ``\boxed{}``
    inside it), else the last ``\boxed{}``, else ``extract_answer`` ("The answer is N", else
    the last number); None when there is none."""
    held = _held_answer(completion)
    return held if held is not None else extract_answer(completion)


# What follows the last "The answer is", up to the end of its sentence (a full stop before a space
# or the end, not a decimal point) or line.
ANSWER_IS_TEXT = re.compile(r"answer is\s*[:=]?\s*([^\n]+?)\s*(?:\.(?=\s|$)|\n|$)", re.IGNORECASE)


def answer_text(completion: str) -> str | None:
    r"""The text a completion gives as its answer, whatever it is (``\frac{1}{2}``, ``1/2``, ``x = 3``,
    ``[1, 2)``): the tag or box ``final_answer`` reads, else all that follows the last "The answer
    is"; None when it states none."""
    held = _held_answer(completion)
    if held is not None:
        return held
    stated = ANSWER_IS_TEXT.findall(completion)
    return stated[-1].strip() if stated else None


def math_answer(prompts: list[str], completions: list[str], answer: list, **_) -> list[float]:
    r"""1.0 where the completion answers the ground-truth ``answer`` column, else 0.0: plain numbers
    compare as numbers (``final_answer``), LaTeX, fractions, expressions, sets, intervals and
    equations by math-verify (``answer_text`` against the reference), short text answers as text
    (polmctl/rollout/math_check.py)."""
    return [float(same_answer(truth, final_answer(c), answer_text(c), c)) for c, truth in zip(completions, answer)]


def format_reward(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1.0 where the whole completion is ``<think>...</think> <answer>...</answer>`` (DeepSeek-R1 style), else 0.0."""
    return [float(R1_FORMAT.fullmatch(c) is not None) for c in completions]


def length_penalty(prompts: list[str], completions: list[str], *, target: int = 200, **_) -> list[float]:
    """0 for completions up to ``target`` characters, then -(length - target) / target, floored at -1."""
    if target < 1:
        raise ValueError(f"target must be a positive number of characters, got {target}")
    return [max(-1.0, min(0.0, -(len(c) - target) / target)) for c in completions]


# --- a trained reward model ----------------------------------------------------------------


class RewardModelScorer:
    """A reward model trained by ``recipe=reward_model`` as a reward function: it scores each
    (prompt, completion) on exactly the token ids training built (``format_prompt`` +
    ``format_completion``, right-padded), so scores match ``polmctl eval`` on the same pairs."""

    def __init__(self, path: str, *, device: str = "cpu", batch_size: int = 8):
        from pathlib import Path

        from polmctl.config.schema import ModelConfig
        from polmctl.errors import ModelError
        from polmctl.models import load_model, load_tokenizer, model_head, resolve_model_path

        cfg = ModelConfig(name_or_path=path)
        resolved = resolve_model_path(path)
        # A causal LM would load with a fresh, random score head: refuse it rather than train on noise.
        # (Hub ids cannot be checked without downloading, so only local dirs are.)
        if Path(resolved).is_dir() and model_head(resolved) != "reward":
            raise ModelError(
                f"{path} holds a causal LM, not a reward model; point the reward_model reward at the "
                "final/ (or run dir) of a recipe=reward_model run"
            )
        self.tokenizer = load_tokenizer(cfg)
        self.model = load_model(
            cfg, device=device, for_training=False, head="reward", pad_token_id=self.tokenizer.pad_token_id
        )
        self.device = next(self.model.parameters()).device
        self.batch_size = batch_size

    def encode(self, prompt, completion) -> list[int]:
        """The ids training scores for this pair: the rendered prompt, then the completion with its
        end-of-turn marker."""
        tok = self.tokenizer
        prompt_ids = tok(format_prompt(prompt, tok), add_special_tokens=False)["input_ids"]
        return prompt_ids + tok(format_completion(prompt, completion, tok), add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **_) -> list[float]:
        ids = [self.encode(p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for i in range(0, len(ids), self.batch_size):
            chunk = ids[i : i + self.batch_size]
            batch = pad_sequences(chunk, chunk, self.tokenizer.pad_token_id)
            out = self.model(
                input_ids=batch["input_ids"].to(self.device),
                attention_mask=batch["attention_mask"].to(self.device),
                use_cache=False,
            )
            scores += out.logits[:, 0].float().tolist()
        return scores


def reward_model(path: str, **options) -> RewardModelScorer:
    """The ``reward_model`` registry entry: ``{name: reward_model, path: ..., device: cuda, batch_size: 16}``."""
    return RewardModelScorer(path, **options)


# --- registry and resolution ---------------------------------------------------------------

REWARD_FUNCTIONS: dict[str, RewardFn] = {
    "math_answer": math_answer,
    "format": format_reward,
    "length_penalty": length_penalty,
}
# Called once with the spec's build arguments; each returns a reward function.
REWARD_FACTORIES: dict[str, Callable[..., RewardFn]] = {"reward_model": reward_model, "prm": load_prm_scorer}
SPEC_KEYS = ("name", "weight", "kwargs", "_target_")


def _as_dict(spec: Any) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(spec, DictConfig):
        return OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, dict):
        return dict(spec)
    raise ValueError(
        f"a reward is a registry name or a mapping with name or _target_, got {type(spec).__name__} {spec!r:.80}"
    )


def _unknown(name: Any) -> ValueError:
    known = ", ".join(sorted({**REWARD_FUNCTIONS, **REWARD_FACTORIES}))
    return ValueError(
        f"unknown reward {name!r}; known rewards: {known}; or give your own function as "
        "_target_: package.module.function"
    )


def _build(name: str, factory: Callable, build_args: dict) -> RewardFn:
    try:
        built = factory(**build_args)
    except TypeError as err:
        args = ", ".join(f"{k}={v!r}" for k, v in build_args.items())
        raise ValueError(
            f"cannot build reward {name!r} as {getattr(factory, '__name__', factory)}({args}): {err}; "
            "a reward function's own keyword arguments go under kwargs:"
        ) from None
    if not callable(built):
        raise ValueError(f"reward {name!r}: its factory returned a {type(built).__name__}, not a callable")
    return built


def resolve_reward(spec: Any, key: str = "method.rewards") -> tuple[str, RewardFn]:
    """``(name, reward function)`` for a registry name, or a mapping (dict or DictConfig) with
    ``name`` or ``_target_``, optional ``kwargs`` bound to every call, and build arguments for a
    factory or class. ``weight`` is read by ``CombinedReward``, not here. A ``_target_`` goes through
    polmctl/targets.py's allow-list; ``key`` (e.g. method.rewards[1]) names the spec in its errors."""
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = _as_dict(spec)
    build_args = {k: v for k, v in spec.items() if k not in SPEC_KEYS}
    if "_target_" in spec:
        target = spec["_target_"]
        obj = resolve_target(target, f"{key}._target_")
        name = spec.get("name") or target.rsplit(".", 1)[-1]
        if inspect.isclass(obj) or build_args:
            fn = _build(name, obj, build_args)
        elif callable(obj):
            fn = obj
        else:
            raise ValueError(f"reward _target_ {target!r} is a {type(obj).__name__}, not a function")
    elif "name" in spec:
        name = spec["name"]
        if name in REWARD_FACTORIES:
            fn = _build(name, REWARD_FACTORIES[name], build_args)
        elif name in REWARD_FUNCTIONS:
            if build_args:
                raise ValueError(
                    f"reward {name!r} takes no build arguments ({', '.join(build_args)}); pass its "
                    "keyword arguments under kwargs:, e.g. {name: length_penalty, kwargs: {target: 100}}"
                )
            fn = REWARD_FUNCTIONS[name]
        else:
            raise _unknown(name)
    else:
        raise ValueError(f"a reward mapping needs name or _target_, got keys {sorted(spec)}")
    if spec.get("kwargs"):
        fn = functools.partial(fn, **spec["kwargs"])
    return name, fn


def _weight(spec: Any) -> float:
    weight = spec.get("weight", 1.0) if not isinstance(spec, str) else 1.0
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
        raise ValueError(f"reward weight must be a finite number, got {weight!r}")
    return float(weight)


# --- combining rewards ----------------------------------------------------------------------


def _missing_columns(fn: RewardFn, columns: dict) -> list[str]:
    """The parameters ``fn`` requires after (prompts, completions) that ``columns`` does not supply."""
    try:
        params = list(inspect.signature(fn).parameters.values())[2:]
    except (TypeError, ValueError):  # some callables have no signature
        return []
    return [
        p.name
        for p in params
        if p.default is p.empty and p.name not in columns and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


class CombinedReward:
    """The weighted sum of several reward functions, with strict checks on what each returns."""

    def __init__(self, rewards: Sequence[tuple[str, RewardFn, float]]):
        if not rewards:
            raise ValueError("no reward functions given")
        names = [name for name, _, _ in rewards]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:  # per-function values are logged by name
            raise ValueError(
                f"reward names must be unique; {', '.join(duplicated)} appears more than once. Give "
                "one another name: {_target_: polmctl.rollout.rewards.<function>, name: <new name>}"
            )
        self.rewards = list(rewards)

    @classmethod
    def from_specs(cls, specs: Sequence[Any], section: str = "method.rewards") -> CombinedReward:
        """Resolve each spec with ``resolve_reward`` (errors name ``section[i]``); its ``weight`` defaults to 1."""
        return cls([(*resolve_reward(spec, f"{section}[{i}]"), _weight(spec)) for i, spec in enumerate(specs)])

    def _values(self, name: str, fn: RewardFn, prompts, completions, columns: dict, batch_index: int) -> torch.Tensor:
        where = f"reward {name!r} on batch {batch_index}"
        try:
            values = fn(prompts, completions, **columns)
        except Exception as err:
            missing = _missing_columns(fn, columns) if isinstance(err, TypeError) else []
            if missing:
                raise RewardError(
                    f"{where} needs the column {missing[0]!r}, which the data lacks (columns: "
                    f"{', '.join(sorted(columns)) or 'none'})"
                ) from err
            first_line = (str(err).strip().splitlines() or [""])[0]
            raise RewardError(f"{where} raised {type(err).__name__}: {first_line}") from err
        if hasattr(values, "tolist"):  # a tensor or numpy array
            values = values.tolist()
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise RewardError(f"{where} returned a {type(values).__name__}, not a list of numbers")
        if len(values) != len(completions):
            raise RewardError(f"{where} returned {len(values)} values for {len(completions)} completions")
        for i, v in enumerate(values):
            if not isinstance(v, numbers.Real):
                raise RewardError(f"{where} returned a non-number at index {i}: {type(v).__name__} {v!r:.40}")
            if not math.isfinite(v):
                raise RewardError(f"{where} returned {v} at index {i}; rewards must be finite")
        return torch.tensor([float(v) for v in values], dtype=torch.float32)

    def __call__(
        self, prompts: list[str], completions: list[str], columns: dict[str, list] | None = None, batch_index: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, per_function)``: the weighted sum per completion, and each function's raw
        (unweighted) values, for logging."""
        per_function = {
            name: self._values(name, fn, prompts, completions, columns or {}, batch_index)
            for name, fn, _ in self.rewards
        }
        total = sum(weight * per_function[name] for name, _, weight in self.rewards)
        return total, per_function
