"""Every adapter type on the same SFT task and budget: trainable parameters, step time, peak memory and
held-out accuracy, as the table in docs/fine-tuning.md ("The PEFT family").

    python benchmarks/peft_family.py                     # SmolLM2-135M-Instruct, recipe=lora's 60 steps
    python benchmarks/peft_family.py --quick             # model=tiny, 4 steps: checks the script in a minute
    python benchmarks/peft_family.py --only ia3 --only vera     # some rows; finished rows are kept

Each row is one ``polmctl run recipe=lora`` in its own process (so peak memory is that run's alone) into
``<out>/<row>/``, with the row's peft options and learning rate and everything else the recipe's:
builtin:arithmetic, 60 steps of 8 packed rows, held-out exact match on 100 problems before and after.
A row whose summary.json is there is not run again. Then ``<out>/table.md`` (and table.json) is written.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# row -> overrides. Learning rates: each method's usual one for a model of this size (the vector-only
# methods, IA3, VeRA and LN tuning, and the soft prompts need larger steps); the budget is the same.
ROWS: dict[str, list[str]] = {
    "lora": ["peft=lora"],
    "lora rslora": ["peft=lora", "peft.use_rslora=true"],
    "lora pissa": ["peft=lora", "peft.init=pissa_niter_4", "peft.dropout=0"],
    "lora olora": ["peft=lora", "peft.init=olora", "peft.dropout=0"],
    "lora eva": ["peft=lora", "peft.init=eva"],
    "dora": ["peft=dora"],
    "adalora": ["peft=adalora"],
    "loha": ["peft=loha"],
    "lokr": ["peft=lokr"],
    "oft": ["peft=oft"],
    "boft": ["peft=boft"],
    "vera": ["peft=vera", "trainer.lr=1e-2"],
    "ia3": ["peft=ia3", "trainer.lr=3e-3"],
    "ln_tuning": ["peft=ln_tuning", "trainer.lr=3e-3"],
    "prompt_tuning": ["peft=prompt_tuning", "data.packing=false", "trainer.lr=3e-2"],
    "prefix_tuning": ["peft=prefix_tuning", "data.packing=false", "trainer.lr=1e-2"],
}
QUICK = ["model=tiny", "trainer.max_steps=4", "data.max_rows=64", "eval.max_samples=8", "eval.max_new_tokens=16"]


def run_row(name: str, overrides: list[str], out: Path, extra: list[str]) -> Path:
    run_dir = out / name.replace(" ", "_")
    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("status") == "completed":
        return run_dir
    command = [sys.executable, "-m", "polmctl", "run", "recipe=lora", *overrides, *extra, f"hydra.run.dir={run_dir}"]
    print("$", " ".join(command), flush=True)
    # One failing row must not lose the others: its table line says it failed (see its polmctl.log).
    subprocess.run(command, check=False)
    return run_dir


def row(name: str, run_dir: Path) -> dict:
    if not (run_dir / "summary.json").is_file():
        return {"adapter": name, "failed": True, "run_dir": str(run_dir)}
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("status") != "completed" or not summary.get("steps"):
        return {"adapter": name, "failed": True, "status": summary.get("status"), "run_dir": str(run_dir)}
    before = (summary["eval"]["before"] or {}).get("arithmetic", {}).get("accuracy")
    after = (summary["eval"]["after"] or {}).get("arithmetic", {}).get("accuracy")
    return {
        "adapter": name,
        "trainable_params": summary["trainable_params"],
        "trainable_share": summary["trainable_params"] / summary["total_params"],
        "step_time_s": summary["train_time_s"] / summary["steps"],
        "peak_memory_mb": summary["peak_memory_mb"],
        "accuracy_before": before,
        "accuracy_after": after,
        "run_dir": str(run_dir),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| adapter | trainable parameters | step time (s) | peak memory (MB) | held-out accuracy after (before) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("failed"):
            lines.append(f"| {r['adapter']} | failed: see {r['run_dir']}/polmctl.log | | | |")
            continue
        acc = "-" if r["accuracy_after"] is None else f"{r['accuracy_after']:.2f}"
        if r["accuracy_before"] is not None:
            acc += f" ({r['accuracy_before']:.2f})"
        lines.append(
            f"| {r['adapter']} | {r['trainable_params']:,} ({100 * r['trainable_share']:.3f}%) | "
            f"{r['step_time_s']:.2f} | {r['peak_memory_mb']:.0f} | {acc} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/peft_family"))
    parser.add_argument("--quick", action="store_true", help="model=tiny and 4 steps: check the script")
    parser.add_argument("--only", action="append", choices=list(ROWS), help="run only these rows (repeatable)")
    parser.add_argument("overrides", nargs="*", help="more overrides for every row, e.g. trainer.device=cpu")
    args = parser.parse_args()
    extra = (QUICK if args.quick else []) + ["logger.progress=false", *args.overrides]
    rows = [row(name, run_row(name, ROWS[name], args.out, extra)) for name in (args.only or ROWS)]
    table = markdown(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table)
    (args.out / "table.json").write_text(json.dumps({"overrides": extra, "rows": rows}, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
