"""polmctl's own step time in float32 against bfloat16, for the shipped recipes, on whatever device the
run picks (a GPU where there is one): issue 18's "bf16 >= 1.6x float32" check, written to be the one
prepared command of a short session on a lent GPU machine.

    python benchmarks/dtype_speed.py --build 1b                 # a random 1.07B Llama, LoRA and DPO, on CUDA
    python benchmarks/dtype_speed.py --model builtin:smollm2-135m --methods lora --steps 20
    python benchmarks/dtype_speed.py --build tiny --steps 4 --rounds 1     # checks the script in a minute

Each run is ``python -m polmctl run recipe=<method> model.dtype=<dtype> eval=none`` in a fresh process,
so a run's warm-up and memory are its own. The dtypes alternate (float32, bf16, bf16, float32, ...)
over ``--rounds`` rounds, so drift on a shared machine hits both; quoted are the median step time
of each run after its first quarter of steps (warm-up: kernel selection, the allocator), the
median over runs, tokens/s and the run's peak memory (summary.json). The load average before each
run is recorded: figures taken while something else ran are not a comparison (2026-12-04's first
try on an H200 was: the killed test suite's workers were still running).

MFU: 4 N per trained token (LoRA: forward and backward through the frozen base), N the base
model's parameters, against the best bf16 / float32 matmul of the model's MLP shape on the same
device (measured here). ``--build 1b`` needs the tokenizer of the builtin model (``--tokenizer``,
default the builtin cache's smollm2-135m; copy its tokenizer files there on a machine without it).
Writes benchmarks/results/<UTC date>-dtype-speed.json (--out to change).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_trl import peak_flops  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
# Shapes of random Llamas to time (TinyLlama-1.1B's for 1b), vocabulary and tokenizer from SmolLM2.
SHAPES = {
    "1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
}
DTYPES = ("float32", "bfloat16")


def build_random_llama(shape: str, tokenizer_dir: Path, out: Path, device: str) -> Path:
    """A Llama of ``SHAPES[shape]`` with random weights (saved in bf16) and ``tokenizer_dir``'s tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        head_dim=64 if shape == "1b" else 16,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SHAPES[shape],
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialising 1B parameters on a GPU takes seconds, on a CPU minutes
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def one_run(model: str, method: str, dtype: str, steps: int, run_dir: Path, extra: list[str]) -> dict:
    load = os.getloadavg()[0]
    command = [sys.executable, "-m", "polmctl", "run", f"recipe={method}", f"model.name_or_path={model}"]
    command += [f"model.dtype={dtype}", "eval=none", "logger.progress=false", "trainer.log_every=1"]
    command += ["trainer.save_every=0", f"trainer.max_steps={steps}", f"hydra.run.dir={run_dir}", *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = rows[len(rows) // 4 :]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "dtype": dtype,
        "load_before": round(load, 2),
        "step_s": statistics.median(r["step_time_s"] for r in timed),
        "tokens_per_step": statistics.median(r["tokens"] for r in timed),
        "first_loss": rows[0]["loss"],
        "last_loss": rows[-1]["loss"],
        "peak_memory_mb": summary.get("peak_memory_mb"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--build", choices=sorted(SHAPES), help="time a random Llama of this shape")
    which.add_argument("--model", help="time this model (a dir, builtin:<name> or a hub id)")
    parser.add_argument("--tokenizer", type=Path, help="--build: tokenizer dir (default: the builtin smollm2-135m)")
    parser.add_argument("--methods", default="lora,dpo", help="comma-separated recipes")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per dtype (alternating)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dtype_speed"), help="model and run dirs")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("extra", nargs="*", help="overrides for every run, e.g. trainer.micro_batch_size=32")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    from transformers import AutoConfig

    from polmctl.models.builtin import materialise_builtin

    model = args.model
    if args.build:
        tokenizer = args.tokenizer or materialise_builtin("smollm2-135m")
        model = str(build_random_llama(args.build, tokenizer, args.work / f"llama-{args.build}", device))
    elif model.startswith("builtin:"):
        model = str(materialise_builtin(model.removeprefix("builtin:")))
    config = AutoConfig.from_pretrained(model) if Path(model).is_dir() else None  # a hub id: no MFU
    hidden, inter = (config.hidden_size, config.intermediate_size) if config else (576, 1536)
    peaks = {d: peak_flops(getattr(torch, d), hidden, inter, 8, rows=4096, device=device) for d in DTYPES}

    result = {"date": datetime.now(timezone.utc).isoformat(timespec="minutes"), "device": device, "model": model}
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    result.update(torch=torch.__version__, peak_flops=peaks, steps=args.steps, methods={})
    for method in args.methods.split(","):
        runs = []
        for r in range(args.rounds):
            for dtype in DTYPES if r % 2 == 0 else DTYPES[::-1]:
                run = one_run(model, method, dtype, args.steps, args.work / f"{method}-{dtype}-{r}", args.extra)
                runs.append(run)
                print(f"{method} {dtype} round {r}: {run['step_s']:.3f} s/step (load {run['load_before']})", flush=True)
        result["methods"][method] = {"runs": runs}
    _summarise(result, model)
    out = args.out or RESULTS / f"{datetime.now(timezone.utc):%Y-%m-%d}-dtype-speed.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


def _summarise(result: dict, model: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    n = None
    if Path(model).is_dir():
        with torch.device("meta"):
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).parameters())
    print(f"\n{'method':<8} {'float32 s/step':>15} {'bf16 s/step':>12} {'bf16 speed-up':>14} {'MFU fp32 / bf16':>16}")
    for method, entry in result["methods"].items():
        step = {d: statistics.median(r["step_s"] for r in entry["runs"] if r["dtype"] == d) for d in DTYPES}
        tokens = statistics.median(r["tokens_per_step"] for r in entry["runs"])
        entry["median_step_s"] = step
        entry["bf16_speedup"] = step["float32"] / step["bfloat16"]
        mfu = ""
        if n:
            entry["mfu"] = {d: 4 * n * tokens / step[d] / result["peak_flops"][d] for d in DTYPES}
            mfu = f"{entry['mfu']['float32']:.1%} / {entry['mfu']['bfloat16']:.1%}"
        print(
            f"{method:<8} {step['float32']:>15.3f} {step['bfloat16']:>12.3f} {entry['bf16_speedup']:>13.2f}x {mfu:>16}"
        )


if __name__ == "__main__":
    main()
