"""torch's CPU int4 matmul (what recipe=quantize method.scheme=cpu_int4 runs) against a dense Linear,
with float32 and with bfloat16 activations, on SmolLM2-135M's decoder shapes; why cpu_int4 computes
in bfloat16 when method.compute_dtype=auto.

    python benchmarks/int4_cpu_matmul.py                  # one thread, decoding (1 row) and prefill (64 rows)
    python benchmarks/int4_cpu_matmul.py --threads 2 --repeats 50

Each row: microseconds per call of the dense Linear and of the same Linear after torchao's
PrototypeInt4WeightOnlyConfig (group size 64), in the same run, and their ratio (below 1: int4 faster).
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = {"q_proj / o_proj": (576, 576), "gate / up_proj": (576, 1536), "down_proj": (1536, 576)}


def per_call(module: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        module(x)  # warm-up: packing, kernel selection
        start = time.perf_counter()
        for _ in range(repeats):
            module(x)
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    print("| layer (in x out) | rows | activations | dense us | int4 us | int4 / dense |\n|---|---|---|---|---|---|")
    for name, (fan_in, fan_out) in SHAPES.items():
        for rows in (1, 64):
            for dtype in (torch.float32, torch.bfloat16):
                torch.manual_seed(0)
                layer = torch.nn.Sequential(torch.nn.Linear(fan_in, fan_out, bias=False)).to(dtype)
                x = torch.randn(rows, fan_in, dtype=dtype)
                dense = per_call(layer, x, args.repeats)
                quantize_(layer, PrototypeInt4WeightOnlyConfig(group_size=args.group_size, set_inductor_config=False))
                int4 = per_call(layer, x, args.repeats)
                cells = [f"{name} ({fan_in} x {fan_out})", rows, str(dtype).removeprefix("torch.")]
                cells += [f"{dense:.0f}", f"{int4:.0f}", f"{int4 / dense:.2f}x"]
                print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
