"""A LoRA fine-tune kept at 4 bits the QLoRA way: the base model's decoder Linears quantized with torchao's
CPU int4 (as recipe=quantize method.scheme=cpu_int4), the trained adapter left unmerged in bf16 beside them.
Not a recipe yet (recipe=quantize quantizes a merged model); this measures the path (docs/efficiency.md).

    polmctl run recipe=lora model.dtype=bfloat16          # an unmerged adapter in <run dir>/final
    python benchmarks/int4_base_with_adapter.py <run dir>/final
    python benchmarks/int4_base_with_adapter.py <run dir>/final --groups 32 --max-samples 20

Prints held-out arithmetic exact match and perplexity of the adapter on the dense bf16 base and on the
base quantized at each group size, and the parameter memory of each.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("adapter", help="a recipe=lora final/ (adapter_config.json, not merged)")
    parser.add_argument("--base", default="builtin:smollm2-135m")
    parser.add_argument("--groups", type=int, nargs="*", default=[32, 64])
    parser.add_argument("--max-samples", type=int, default=100)
    args = parser.parse_args()
    from peft import PeftModel
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    from polmctl.compress.quantize import parameter_bytes
    from polmctl.config.schema import DataConfig, EvalConfig, ModelConfig
    from polmctl.evals import run_evals
    from polmctl.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=args.base))
    evals = EvalConfig(tasks=["arithmetic", "perplexity"], max_samples=args.max_samples)
    print("| base weights | parameter memory (MB) | exact match | perplexity | eval time (s) |\n|---|---|---|---|---|")
    for group in [None, *args.groups]:
        base = load_model(ModelConfig(name_or_path=args.base, dtype="bfloat16"), for_training=False)
        model = PeftModel.from_pretrained(base, args.adapter).eval()
        if group:  # every decoder Linear's own weight: LoRA's base_layer and the Linears LoRA does not wrap
            names = {
                n
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and ".layers." in n and "lora_" not in n
            }
            config = PrototypeInt4WeightOnlyConfig(group_size=group, set_inductor_config=False)
            quantize_(model, config, filter_fn=lambda module, fqn: fqn in names)
        start = time.perf_counter()
        with torch.no_grad():
            results = run_evals(model, tokenizer, evals, DataConfig(source="builtin:arithmetic"))
        what = f"cpu_int4, group {group}" if group else "bf16 (dense)"
        cells = [what, f"{parameter_bytes(model) / 2**20:.0f}", results["arithmetic"]["accuracy"]]
        cells += [f"{results['perplexity']['perplexity']:.2f}", f"{time.perf_counter() - start:.0f}"]
        print("| " + " | ".join(map(str, cells)) + " |", flush=True)


if __name__ == "__main__":
    main()
