"""``polmctl survey``: one representative recipe per paradigm on one model, as one pipeline, then its
table and its page.

    polmctl survey                          # the builtin SmolLM2-135M-Instruct; writes survey/
    polmctl survey --quick                  # model=tiny, tiny step counts: the same chain in about a minute
    polmctl survey --resume                 # go on after a failure or a kill: finished stages are skipped
    polmctl survey --out survey-2 "method.common=['trainer.device=cpu']"    # overrides go to the pipeline
    make survey                             # = polmctl survey (SURVEY_ARGS="--quick" to pass options)

It is ``polmctl run recipe=survey hydra.run.dir=<out> [overrides]`` (the stages, their step counts
and what feeds what: polmctl/conf/recipe/survey.yaml), followed by, in ``<out>``:

    table.md       one row per stage and eval task: paradigm, recipe, metric and its held-out set,
                   before -> after, training time, wall time, peak memory, model size (stage_table.py)
    table.json     the same rows, with the command, the date, the commit and the machine
    report.html    the page of ``polmctl report <out>``: the table, then every stage with its curves
    <N>-<name>/    every stage's run dir (summary.json, metrics.jsonl, eval/, final/, .hydra/)

The table and the page are written whatever happens, also after a failed or interrupted stage (the
stages done so far), so a killed survey still shows where it got to; ``--resume`` then goes on.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
from pathlib import Path
from typing import Sequence

from polmctl.commands.report import write_report
from polmctl.commands.stage_table import is_pipeline, markdown, read_json, stage_rows
from polmctl.errors import CommandError

RECIPE = "survey"
DEFAULT_OUT = Path("survey")
DEFAULT_QUICK_OUT = Path("survey-quick")
# --quick: the same chain on the tiny random model, every stage cut to a few steps and held-out rows.
QUICK_STEPS = [
    "trainer.max_steps=4",
    "trainer.warmup_ratio=0",
    "data.max_rows=64",
    "eval.max_samples=8",
    "eval.max_new_tokens=16",
]
QUICK = ["model=tiny", "method.common=[" + ",".join(f"'{o}'" for o in QUICK_STEPS) + "]"]
STAGE_DIR = re.compile(r"^\d+-[A-Za-z0-9_-]+$")  # <N>-<name>: polmctl/methods/pipeline.py stage_dir
# Keys the survey sets itself; on its command line they are an error naming the option to use.
OWN = {
    "recipe": "the survey is recipe=survey; run another pipeline with polmctl run recipe=NAME",
    "hydra.run.dir": "choose the survey's run dir with --out DIR",
    "output_dir": "choose the survey's run dir with --out DIR",
    "resume": "go on with --resume",
}


def check_request(out: Path, resume: bool, overrides: Sequence[str]) -> None:
    """Refuse, before anything runs, what would fail later or overwrite an earlier survey."""
    for text in overrides:
        if text.startswith("-"):
            raise CommandError(
                f"{text}: polmctl survey takes --quick, --out, --resume and Hydra overrides (key=value); "
                "sweeps and Hydra flags belong to polmctl run"
            )
        key = text.split("=", 1)[0].lstrip("+~")
        if "=" not in text:
            raise CommandError(f"{text}: write an override as key=value, e.g. model.name_or_path=<a model dir>")
        if key in OWN:
            raise CommandError(f"{text}: {OWN[key]}")
    for module, extra in (("matplotlib", "polmctl[plot]"), ("jinja2", "jinja2")):
        try:
            __import__(module)
        except ImportError:
            raise CommandError(
                f"the survey's page needs {module}, which is not installed: pip install '{extra}' "
                "(checked now, before the survey's stages run)"
            ) from None
    summary = read_json(out / "summary.json")
    # A survey has started once a stage has a dir (a run refused before its first stage leaves only .hydra/).
    started = summary is not None or any(p.is_dir() and STAGE_DIR.match(p.name) for p in _entries(out))
    if resume and not started:
        raise CommandError(f"--resume: {out} holds no survey to go on with; run polmctl survey without --resume")
    if started and not resume:
        state = f"status {summary.get('status')}" if summary else "files in it"
        raise CommandError(
            f"{out} holds a survey already ({state}); go on with --resume (finished stages are skipped), "
            "or choose another --out"
        )
    if summary is not None and not is_pipeline(summary):
        raise CommandError(f"{out} is a run dir of recipe={summary.get('recipe')}, not a survey; choose another --out")


def _entries(path: Path) -> list[Path]:
    return list(path.iterdir()) if path.is_dir() else []


def survey_arguments(out: Path, quick: bool, resume: bool, overrides: Sequence[str]) -> list[str]:
    """The ``polmctl run`` arguments of the survey (later overrides win: yours after --quick's)."""
    return [
        f"recipe={RECIPE}",
        f"hydra.run.dir={out}",
        *(QUICK if quick else []),
        *(["resume=auto"] if resume else []),
        *overrides,
    ]


def run_survey(out: Path | None, quick: bool, resume: bool, overrides: Sequence[str]) -> tuple[int, dict[str, Path]]:
    """Run the survey pipeline (in this process, as polmctl run does), then write its table and page:
    (exit code, {what: path})."""
    out = out or (DEFAULT_QUICK_OUT if quick else DEFAULT_OUT)
    check_request(out, resume, overrides)
    from polmctl.entry import main as polmctl_run

    code = 0
    try:
        polmctl_run(survey_arguments(out, quick, resume, overrides))
    except SystemExit as exit_:  # polmctl run's one-line errors (a failed stage, a bad override) exit
        code = exit_.code if isinstance(exit_.code, int) else 1
    except KeyboardInterrupt:
        code = 130
    if not is_pipeline(read_json(out / "summary.json")):
        return code or 1, {}
    return code, write_outputs(
        out, ["polmctl", "survey", *(["--quick"] if quick else []), "--out", str(out), *overrides]
    )


def write_outputs(out: Path, command: Sequence[str]) -> dict[str, Path]:
    """table.md, table.json and report.html of the survey in ``out``."""
    summary = read_json(out / "summary.json") or {}
    rows = stage_rows(out)
    provenance = {
        "command": shlex.join(command),
        "date": dt.date.today().isoformat(),
        "commit": _commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}",
    }
    title = f"polmctl survey: {summary.get('model', '?')}, {provenance['date']}, commit {provenance['commit']}"
    # A resumed survey's own wall time leaves out the stages an earlier run did: add the stages' up.
    stages_wall = sum({r["stage"]: r["wall_time_s"] or 0 for r in rows}.values())
    intro = (
        f"`{provenance['command']}` on {provenance['machine']}: status {summary.get('status')}, "
        f"the stages' wall times add up to {stages_wall / 60:.1f} min. Every stage's run dir is beside this "
        "file; report.html has their curves and generations."
    )
    paths = {"table": out / "table.md", "json": out / "table.json"}
    paths["table"].write_text(markdown(rows, title, intro))
    data = {
        **provenance,
        "model": summary.get("model"),
        "status": summary.get("status"),
        "failed_stage": summary.get("failed_stage"),
        "wall_time_s": summary.get("wall_time_s"),  # of the last run of the pipeline (a resumed one: the rest)
        "stages_wall_time_s": stages_wall,
        "rows": rows,
    }
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    paths["page"] = write_report(out, out / "report.html", heading=title)
    return paths


def _commit() -> str:
    """The polmctl checkout's commit (with "+changes" when its tree differs from it); "unknown" outside git."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
