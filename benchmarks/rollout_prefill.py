"""Rollout sampling with and without a shared prefill: G samples of each prompt either run one
prefill of it and share its KV cache (TransformersBackend's default) or prefill G copies.

    .venv/bin/python benchmarks/rollout_prefill.py                      # model=tiny (seconds, CPU)
    .venv/bin/python benchmarks/rollout_prefill.py --model smollm2      # builtin:smollm2-135m
    .venv/bin/python benchmarks/rollout_prefill.py --prompts 8 --prompt-words 300 --new-tokens 64 --device cuda

Both variants run in the same process on the same prompts, alternating, with the same seed
before each call (so they sample the same tokens); the figure is the ratio of their median
times, shared / unshared (below 1: sharing is faster). The gain grows with prompt length and
G and shrinks with the number of new tokens, which the shared prefill does not touch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from polmctl.config.schema import ModelConfig
from polmctl.data import format_prompt
from polmctl.models import load_model, load_tokenizer
from polmctl.rollout.backends import TransformersBackend

MODELS = {"tiny": "builtin:tiny", "smollm2": "builtin:smollm2-135m"}
WORDS = (
    "the train leaves the station at nine and arrives at noon while a second train starts two hours "
    "later from the other end of the line at twice the speed so where do they meet and when"
).split()


def long_prompts(n: int, words: int) -> list[str]:
    """``n`` distinct word problems of about ``words`` words each."""
    return [
        f"Problem {i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words)) + ". Answer briefly."
        for i in range(n)
    ]


def timed(backend, model, tok, prompts, G, options, seed) -> tuple[float, float]:
    """Seconds for one sampling call, and the mean completion length."""
    torch.manual_seed(seed)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    ids = backend.sample(model, tok, prompts, G, options)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, sum(map(len, ids)) / len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=4, help="distinct prompts per call")
    parser.add_argument("--prompt-words", type=int, default=120, help="words per prompt")
    parser.add_argument("-G", "--samples", type=int, default=8, help="samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    cfg = ModelConfig(name_or_path=MODELS[args.model])
    tok = load_tokenizer(cfg)
    model = load_model(cfg, device=args.device, for_training=False).eval()
    prompts = [format_prompt(p, tok) for p in long_prompts(args.prompts, args.prompt_words)]
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    options = SimpleNamespace(temperature=1.0, top_p=1.0, max_new_tokens=args.new_tokens, stop=[])
    backends = {"shared": TransformersBackend(share_prefill=True), "unshared": TransformersBackend(share_prefill=False)}

    for backend in backends.values():  # warm-up
        timed(backend, model, tok, prompts[:1], 2, options, seed=0)
    times: dict[str, list[float]] = {name: [] for name in backends}
    new_tokens: dict[str, list[float]] = {name: [] for name in backends}
    for r in range(args.repeats):
        order = list(backends) if r % 2 == 0 else list(reversed(backends))
        for name in order:
            seconds, length = timed(backends[name], model, tok, prompts, args.samples, options, seed=r)
            times[name].append(seconds)
            new_tokens[name].append(length)

    print(
        f"model={args.model} device={args.device} threads={torch.get_num_threads()} prompts={args.prompts} "
        f"prompt_tokens={min(lengths)}-{max(lengths)} G={args.samples} max_new_tokens={args.new_tokens} "
        f"repeats={args.repeats}"
    )
    for name in backends:
        print(
            f"  {name:9s} median {statistics.median(times[name]):.3f} s   "
            f"(min {min(times[name]):.3f}, max {max(times[name]):.3f}; "
            f"mean completion {statistics.mean(new_tokens[name]):.1f} tokens)"
        )
    ratio = statistics.median(times["shared"]) / statistics.median(times["unshared"])
    print(f"  shared / unshared = {ratio:.2f}")


if __name__ == "__main__":
    main()
