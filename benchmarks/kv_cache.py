"""The quantized KV cache (generation.cache=quantized) against the plain one on a long generation: the
cache's bytes at its end, tokens/s, and how many greedy tokens match; docs/efficiency.md's table.

    python benchmarks/kv_cache.py                        # SmolLM2-135M-Instruct, 4 prompts x 512 new tokens
    python benchmarks/kv_cache.py --model builtin:tiny --new-tokens 64     # check the script in seconds

Greedy decoding of the same prompts with each cache setting, ``min_new_tokens`` = ``max_new_tokens`` so
every row is as long; bytes are every tensor the cache holds (``polmctl.rollout.cache.cache_bytes``:
quantized data, scales and zero points, the full-precision residual window). Held-out accuracy with each
setting comes from ``polmctl eval builtin:smollm2-135m generation.cache=...`` (the commands it prints).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from polmctl.config.schema import GenerationConfig, ModelConfig
from polmctl.data import format_prompt
from polmctl.models import load_model, load_tokenizer
from polmctl.rollout.cache import cache_bytes, generation_cache

SETTINGS = {
    "plain": GenerationConfig(),
    "hqq int8": GenerationConfig(cache="quantized", cache_backend="hqq", cache_nbits=8),
    "hqq int4": GenerationConfig(cache="quantized", cache_backend="hqq", cache_nbits=4),
    "quanto int4": GenerationConfig(cache="quantized", cache_backend="quanto", cache_nbits=4),
    "quanto int2": GenerationConfig(cache="quantized", cache_backend="quanto", cache_nbits=2),
    "fp8": GenerationConfig(cache="quantized", cache_backend="fp8", cache_nbits=8),
}
PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a map.",
    "Explain, step by step and in detail, how a bicycle works.",
    "List one hundred animals and one fact about each.",
    "Describe the history of writing, from clay tablets to computers.",
]


def measure(model, tokenizer, settings: GenerationConfig, new_tokens: int) -> dict:
    rendered = [format_prompt(p, tokenizer) for p in PROMPTS]
    tokenizer.padding_side = "left"
    enc = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True)
    with generation_cache(model, settings), torch.no_grad():
        model.generate(**enc, max_new_tokens=2, do_sample=False)  # warm-up (quanto builds its kernels once)
        started = time.perf_counter()
        out = model.generate(**enc, **kwargs, pad_token_id=tokenizer.pad_token_id)
        seconds = time.perf_counter() - started
    return {
        "cache_bytes": cache_bytes(out.past_key_values),
        "tokens_per_s": len(PROMPTS) * new_tokens / seconds,
        "sequences": out.sequences[:, enc["input_ids"].shape[1] :],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("outputs/kv_cache.json"))
    args = parser.parse_args()
    cfg = ModelConfig(name_or_path=args.model)
    tokenizer, model = load_tokenizer(cfg), load_model(cfg, for_training=False)
    results = {name: measure(model, tokenizer, s, args.new_tokens) for name, s in SETTINGS.items()}
    plain = results["plain"]
    rows = []
    print("| cache | bytes at the end | vs plain | tokens/s | greedy tokens as plain |\n|---|---|---|---|---|")
    for name, r in results.items():
        same = (r["sequences"] == plain["sequences"]).float().mean().item()
        rows.append({"cache": name, "cache_bytes": r["cache_bytes"], "tokens_per_s": r["tokens_per_s"], "same": same})
        print(
            f"| {name} | {r['cache_bytes'] / 2**20:.1f} MiB | {r['cache_bytes'] / plain['cache_bytes']:.2f} | "
            f"{r['tokens_per_s']:.1f} | {100 * same:.1f}% |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "new_tokens": args.new_tokens, "rows": rows}, indent=2))
    print("\nheld-out accuracy with each cache:")
    for name, s in SETTINGS.items():
        flags = (
            "" if s.cache == "dynamic" else f" generation.cache=quantized generation.cache_backend={s.cache_backend}"
        )
        flags += f" generation.cache_nbits={s.cache_nbits}" if s.cache == "quantized" else ""
        print(f"  polmctl eval {args.model} eval.tasks=[arithmetic]{flags}    # {name}")


if __name__ == "__main__":
    main()
