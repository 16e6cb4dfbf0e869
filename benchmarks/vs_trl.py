"""polmctl against TRL on the same work: SFT, DPO and GRPO with LoRA, step time, tokens/s,
peak memory and model FLOPs utilisation, after checking that both compute the same loss.

    make bench                                                         # SmolLM2-135M, every method
    .venv/bin/python benchmarks/vs_trl.py --methods sft,dpo,grpo --steps 3 --rounds 3
    .venv/bin/python benchmarks/vs_trl.py --model tiny --steps 2 --rounds 2 --no-rss   # seconds
    .venv/bin/python benchmarks/vs_trl.py --check-only --model tiny                     # equivalence only
    .venv/bin/python benchmarks/vs_trl.py --methods dpo --trl-precompute-ref            # TRL caches refs too

Same work: the same model (builtin SmolLM2-135M-Instruct) and dtype, the same first rows of
the builtin data in the same order, the same max length, micro-batch, accumulation, LoRA
(r, alpha, all linear layers, dropout 0) and, for GRPO, group size and completion budget
(benchmarks/_workload.py). TRL settings off its defaults are listed in _trl_side.py; DPO's
reference is TRL's default (a reference forward every step) unless --trl-precompute-ref.

How it is timed: both sides live in one process and alternate, ``--steps`` optimizer steps
of one then of the other, for ``--rounds`` rounds, the order flipping every round, so
machine drift hits both; each side's first ``--warmup`` steps are dropped. Quoted: the
median step time, tokens/s (non-padding tokens trained per second; GRPO: prompt and
completion of every sample), and the ratio polmctl / TRL of the medians. GRPO also reports
the rollout's generation throughput (new tokens/s, G completions per prompt).

MFU: model FLOPs per step / step time / peak, peak = the best FLOP/s of a [512 x H] @ [H x I]
matmul (the model's MLP shape) in the same dtype and thread count. Model FLOPs (attention's
quadratic term left out, a few % at these lengths): LoRA training 4 N per trained token
(forward 2 N, backward 2 N for activation gradients; the frozen base needs no weight
gradients, the adapters' are negligible), rollout generation 2 N per new token, N = the base
model's parameters; trained tokens include every row's prompt on both sides (also where
polmctl runs a shared prompt once). Reference forwards are not counted as useful work.

Peak memory: a process's peak RSS only grows, so each side's comes from a fresh subprocess
that builds only that side and runs warm-up + ``--steps`` steps (its VmHWM, see peak_rss_mb).

Writes benchmarks/results/<UTC date>.json (--out to change) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _workload import MODELS, default_workload  # noqa: E402

METHODS = ("sft", "dpo", "grpo")
RESULTS = Path(__file__).resolve().parent / "results"


def peak_flops(
    dtype: torch.dtype, hidden: int, intermediate: int, repeats: int = 5, *, rows: int = 512, device: str = "cpu"
) -> float:
    """Best FLOP/s of a [rows, hidden] @ [hidden, intermediate] matmul (the MLP's up-projection) on ``device``."""
    a = torch.randn(rows, hidden, dtype=dtype, device=device)
    b = torch.randn(hidden, intermediate, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)  # CUDA matmuls return before they finish
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        for _ in range(10):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - started) / 10)
    return 2 * rows * hidden * intermediate / best


def base_parameters(model) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return sum(p.numel() for name, p in base.named_parameters() if "lora_" not in name)


def step_flops(n_params: int, step: dict) -> float:
    return 4 * n_params * step["tokens"] + 2 * n_params * step.get("new_tokens", 0.0)


def summarise(steps: list[dict], n_params: int, peak: float) -> dict:
    times = [s["time_s"] for s in steps]
    # Medians throughout; FLOP/s is the median step's FLOPs over its time (one outlier step moves neither).
    out = {
        "median_step_s": statistics.median(times),
        "min_step_s": min(times),
        "max_step_s": max(times),
        "steps_timed": len(steps),
        "tokens_per_s": statistics.median(s["tokens"] / s["time_s"] for s in steps),
        "achieved_gflops": statistics.median(step_flops(n_params, s) / s["time_s"] for s in steps) / 1e9,
        "step_times_s": times,
    }
    out["mfu"] = out["achieved_gflops"] * 1e9 / peak
    if any("rollout_s" in s for s in steps):
        rates = [s["new_tokens"] / s["rollout_s"] for s in steps if s.get("rollout_s")]
        out["generation_new_tokens_per_s"] = statistics.median(rates)
        out["median_rollout_s"] = statistics.median(s["rollout_s"] for s in steps)
    return out


def with_peak(result: dict, peak: float) -> dict:
    """MFU of every side against ``peak`` (FLOP/s)."""
    for name in ("polmctl", "trl"):
        if name in result:
            result[name]["mfu"] = result[name]["achieved_gflops"] * 1e9 / peak
    return result


def rss_probe(side_name: str, method: str, args) -> float:
    """Peak RSS (MiB) of a fresh process that builds one side and runs warm-up + steps."""
    command = [
        sys.executable,
        __file__,
        "--rss-probe",
        side_name,
        "--methods",
        method,
        "--model",
        args.model,
        "--dtype",
        args.dtype,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--grpo-new-tokens",
        str(args.grpo_new_tokens),
    ]
    command += [
        flag
        for flag, on in (
            ("--trl-precompute-ref", args.trl_precompute_ref),
            ("--polmctl-plain-forward", args.polmctl_plain_forward),
        )
        if on
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    for line in reversed(done.stdout.splitlines()):
        if line.startswith('{"peak_rss_mb"'):
            return json.loads(line)["peak_rss_mb"]
    raise RuntimeError(f"the {side_name} {method} memory probe failed: {done.stderr.strip().splitlines()[-1:]}")


def workload(method: str, args, steps: int):
    return default_workload(
        method,
        model=args.model,
        dtype=args.dtype,
        steps=steps,
        max_new_tokens=args.grpo_new_tokens,
        trl_precompute_ref=args.trl_precompute_ref,
    )


def build(side_name: str, w):
    if side_name == "polmctl":
        from _polmctl_side import PolmctlSide

        return PolmctlSide(w)
    from _trl_side import TRLSide

    return TRLSide(w)


def run_probe(args) -> None:
    method = args.methods.split(",")[0]
    side = build(args.rss_probe, workload(method, args, args.warmup + args.steps))
    for _ in range(args.warmup + args.steps):
        side.step()
    side.close()
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak RSS. Linux's ru_maxrss survives fork + exec (a child started by a
    big parent reports the parent's peak), so read VmHWM, which belongs to this address space."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_method(method: str, args, trl_version: str | None, peak: float) -> dict:
    result: dict = {}
    if trl_version and not args.skip_check:
        from _equivalence import check

        eq = check(workload(method, args, 2))
        result["equivalence"] = eq.as_dict()
        print(
            f"[{method}] equivalence: same tokens {eq.same_tokens}, loss polmctl {eq.polmctl_loss:.6g} "
            f"TRL {eq.trl_loss:.6g} (rel {eq.loss_rel_diff:.1e}), gradient rel diff {eq.grad_rel_diff:.1e} "
            f"-> {'OK' if eq.ok else 'DIFFERENT'}",
            flush=True,
        )
        if args.check_only:
            return result
    total = args.warmup + args.steps * args.rounds
    sides = {"polmctl": build("polmctl", workload(method, args, total))}
    if trl_version:
        sides["trl"] = build("trl", workload(method, args, total))
    n_params = base_parameters(sides["polmctl"].model)
    steps: dict[str, list[dict]] = {name: [] for name in sides}
    try:
        for name, side in sides.items():
            for _ in range(args.warmup):
                side.step()
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                for _ in range(args.steps):
                    steps[name].append(sides[name].step())
                    print(
                        f"[{method}] round {r + 1}/{args.rounds} {name}: {steps[name][-1]['time_s']:.2f} s", flush=True
                    )
    finally:
        for side in sides.values():
            side.close()
    for name, side in sides.items():
        result[name] = summarise(steps[name], n_params, peak)
        result[name]["setup_s"] = side.setup_s
        if not args.no_rss:
            result[name]["peak_rss_mb"] = rss_probe(name, method, args)
    result["polmctl"]["losses"] = [s["loss"] for s in steps["polmctl"]]
    if "trl" in sides:
        result["trl"]["losses"] = sides["trl"].losses()[args.warmup :]
        if method != "grpo":  # same rows, same order, same LoRA init seed: the same trajectory
            pairs = list(zip(result["polmctl"]["losses"], result["trl"]["losses"]))
            result["loss_trajectory_max_rel_diff"] = max(abs(p - t) / max(abs(t), 1e-8) for p, t in pairs)
        result["ratio_polmctl_over_trl"] = result["polmctl"]["median_step_s"] / result["trl"]["median_step_s"]
        result["speedup"] = 1 / result["ratio_polmctl_over_trl"]
        # One-time work (polmctl: DPO's reference scoring; TRL: dataset preparation, and its
        # reference scoring with --trl-precompute-ref) spread over this run's steps.
        amortised = {name: result[name]["median_step_s"] + result[name]["setup_s"] / total for name in sides}
        result["speedup_with_setup_amortised"] = amortised["trl"] / amortised["polmctl"]
    w = workload(method, args, total)
    result["workload"] = {k: v for k, v in vars(w).items() if k != "steps"} | {"model_params": n_params}
    return result


def print_table(results: dict, peak: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"polmctl vs TRL (medians; matmul peak {peak / 1e9:.1f} GFLOP/s)")
    for column in (
        "method",
        "side",
        "step s",
        "tokens/s",
        "GFLOP/s",
        "MFU",
        "peak RSS MiB",
        "gen tok/s",
        "setup s",
        "polmctl/TRL",
    ):
        table.add_column(column, justify="right" if column not in ("method", "side") else "left")
    for method, r in results.items():
        for name in ("polmctl", "trl"):
            if name not in r:
                continue
            s = r[name]
            ratio = (
                f"{r['ratio_polmctl_over_trl']:.2f} ({r['speedup']:.2f}x; {r['speedup_with_setup_amortised']:.2f}x "
                "with setup)"
                if name == "polmctl" and "speedup" in r
                else ""
            )
            table.add_row(
                method,
                name,
                f"{s['median_step_s']:.3f}",
                f"{s['tokens_per_s']:.0f}",
                f"{s['achieved_gflops']:.1f}",
                f"{100 * s['mfu']:.1f}%",
                f"{s['peak_rss_mb']:.0f}" if "peak_rss_mb" in s else "-",
                f"{s['generation_new_tokens_per_s']:.0f}" if "generation_new_tokens_per_s" in s else "-",
                f"{s['setup_s']:.1f}",
                ratio,
            )
    Console(width=200).print(table)


def machine() -> dict:
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    import peft
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: sft,dpo,grpo")
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per side per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (order flips every round)")
    parser.add_argument("--warmup", type=int, default=1, help="steps per side run first and not timed")
    parser.add_argument("--grpo-new-tokens", type=int, default=48, help="GRPO completion budget")
    parser.add_argument("--trl-precompute-ref", action="store_true", help="DPO: TRL precomputes reference log-probs")
    parser.add_argument(
        "--polmctl-plain-forward",
        action="store_true",
        help="polmctl without its shared-prompt forward (to measure what that lever gains)",
    )
    parser.add_argument("--check-only", action="store_true", help="only the first-batch equivalence check")
    parser.add_argument("--skip-check", action="store_true", help="no equivalence check")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", type=Path, default=None, help="result file (default benchmarks/results/<date>.json)")
    parser.add_argument("--rss-probe", choices=("polmctl", "trl"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.polmctl_plain_forward:
        import polmctl.models.shared_prompt as shared_prompt

        shared_prompt.shared_prompt_logps = lambda *a, **k: None  # policy_forward then takes its plain path
    if args.rss_probe:
        return run_probe(args)

    from _trl_side import trl_available

    trl_version = trl_available()
    if trl_version is None:
        print("TRL is not installed (pip install 'polmctl[bench]'): timing polmctl alone, no equivalence check.")
    from transformers import AutoConfig

    from polmctl.models.load import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(MODELS[args.model]))
    dtype = getattr(torch, args.dtype)
    # On a shared machine one matmul timing can land in a busy moment: measure before every
    # method and at the end, and take the best as the machine's peak (MFU is then conservative).
    peaks = [peak_flops(dtype, config.hidden_size, config.intermediate_size)]
    raw = {}
    for m in methods:
        peaks.append(peak_flops(dtype, config.hidden_size, config.intermediate_size))
        raw[m] = bench_method(m, args, trl_version, peaks[-1])
    peaks.append(peak_flops(dtype, config.hidden_size, config.intermediate_size))
    peak = max(peaks)
    results = {m: with_peak(r, peak) for m, r in raw.items()}
    report = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "trl": trl_version,
        "machine": machine(),
        "matmul_peak_gflops": peak / 1e9,
        "matmul_peak_measurements_gflops": [p / 1e9 for p in peaks],
        "dtype": args.dtype,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "rss_probe")},
        "methods": results,
    }
    if args.check_only:
        print(json.dumps({m: r.get("equivalence") for m, r in results.items()}, indent=2))
        if not all(r.get("equivalence", {}).get("ok", True) for r in results.values()):
            sys.exit(1)
        return
    print_table(results, peak)
    out = args.out or RESULTS / f"{datetime.now(timezone.utc).date().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
