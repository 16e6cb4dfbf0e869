"""``polmctl data inspect | filter | raft``: look at a data set, screen it before SFT, build RAFT rows.

    polmctl data inspect builtin:instructions
    polmctl data filter rows.jsonl --out kept.jsonl --dedup --near-dedup 0.8 --max-tokens 1024
    polmctl data filter rows.jsonl --out kept.jsonl --ifd-max 1 --ifd-top 0.5 --model builtin:smollm2-135m
    polmctl data raft qa.jsonl docs.jsonl --out raft.jsonl --distractors 3 --p-oracle 0.8

The commands are registered on the ``data`` sub-app in polmctl/cli.py; the work is in polmctl/curation/.
Only typer, rich and the standard library load with this module (the CLI imports it at start).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

out = Console()
SOURCE_HELP = "builtin:<name>, a .jsonl/.json/.csv/.parquet file or a hub dataset name"
MODEL_HELP = "tokenizer for token lengths and the causal LM for IFD: builtin:<name>, a hub id, a model or run dir"


def _fail(message: str) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _errors() -> tuple[type[BaseException], ...]:
    from polmctl.errors import CommandError, ConfigError, DataError, ModelError

    return CommandError, ConfigError, DataError, ModelError


def _options(pairs: list[str]) -> dict[str, Any] | None:
    """``--option n=200 --option seed=1`` -> a builtin generator's options (values read as YAML)."""
    import yaml

    from polmctl.errors import CommandError

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CommandError(f"--option {pair!r}: write KEY=VALUE, e.g. --option n=200")
        options[key] = yaml.safe_load(value)
    return options or None


def _load(source: str, split: str, max_rows: int | None, option: list[str], hub_config: str | None, fmt: str):
    from polmctl.data import detect_format, load_rows
    from polmctl.errors import DataError

    rows = load_rows(source, split, max_rows=max_rows, options=_options(option), hub_config=hub_config)
    detected = detect_format(rows[0], source) if fmt == "auto" else fmt
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{source}: row {i} is a {type(row).__name__}, not a row with named columns")
    return rows, detected


def _tokenizer(model: str):
    from polmctl.config.schema import ModelConfig
    from polmctl.models import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=model))


def _device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def _default_plot(source: str) -> Path:
    path = Path(source)
    name = path.stem if path.suffix else re.sub(r"[^\w.-]+", "_", source)
    return Path(f"{name}-lengths.png")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def inspect_source(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    split: str = typer.Option("train", "--split", help="the split of a builtin or hub source"),
    model: str = typer.Option("builtin:smollm2-135m", "--model", help="whose tokenizer counts the tokens"),
    fmt: str = typer.Option("auto", "--format", help="auto | text | messages | prompt_completion | preference"),
    near_dedup: float = typer.Option(0.8, "--near-dedup", help="Jaccard similarity that counts as a near duplicate"),
    no_near: bool = typer.Option(False, "--no-near", help="skip near-duplicate detection"),
    max_length: int = typer.Option(
        512, "--max-length", min=2, help="count the rows longer than this (data.max_length)"
    ),
    plot: Optional[Path] = typer.Option(
        None, "--plot", help="the PNG of length histograms (default: <name>-lengths.png)"
    ),
    no_plot: bool = typer.Option(False, "--no-plot", help="write no PNG"),
    max_rows: Optional[int] = typer.Option(None, "--max-rows", min=1, help="the first N rows only"),
    option: List[str] = typer.Option([], "--option", help="a builtin generator's option KEY=VALUE; repeat"),
    hub_config: Optional[str] = typer.Option(None, "--hub-config", help="a hub dataset's config name"),
    as_json: bool = typer.Option(False, "--json", help="print the statistics as JSON"),
) -> None:
    """Inspect a data set: rows, format, token lengths (PNG histograms), exact and near duplicates.

    Lengths count the tokens training sees (chat template, end-of-turn marker); near duplicates are
    found by MinHash LSH on character 5-grams (datasketch).

    [bold]Examples[/]

      polmctl data inspect builtin:instructions\n
      polmctl data inspect rows.jsonl --near-dedup 0.7 --plot rows.png\n
      polmctl data inspect HuggingFaceH4/no_robots --split train --max-rows 2000
    """
    from polmctl.curation.summary import inspect_rows, plot_lengths
    from polmctl.entry import quiet_libraries

    quiet_libraries()
    try:
        rows, detected = _load(source, split, max_rows, option, hub_config, fmt)
        stats = inspect_rows(
            rows,
            detected,
            _tokenizer(model),
            source=source,
            near_threshold=None if no_near else near_dedup,
            max_length=max_length,
        )
        png = None if no_plot else plot_lengths(stats, plot or _default_plot(source))
    except _errors() as err:
        _fail(str(err))
    stats.pop("lengths")
    stats["plot"] = str(png) if png else None
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
        return
    out.print(inspect_table(stats, model))
    if png:
        out.print(f"plot: {png}", highlight=False, soft_wrap=True)


def inspect_table(stats: dict[str, Any], model: str) -> Table:
    table = Table(title=f"{stats['source']}  (tokens: {model})", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("rows", _fmt(stats["rows"]))
    table.add_row("format", stats["format"])
    table.add_row("columns", ", ".join(stats["columns"]))
    for part, s in stats["tokens"].items():
        table.add_row(f"{part} tokens", "  ".join(f"{k} {_fmt(v)}" for k, v in s.items()))
    table.add_row("tokens in all", f"{_fmt(stats['total_tokens'])} ({_fmt(stats['answer_tokens'])} answer)")
    over = stats["over_max_length"]
    table.add_row(f"rows over {over['max_length']} tokens", _fmt(over["rows"]))
    exact = stats["exact_duplicates"]
    groups = "; ".join(",".join(map(str, g)) for g in exact["groups"][:5])
    table.add_row("exact duplicate rows", f"{exact['rows']}" + (f"  (groups: {groups})" if groups else ""))
    near = stats.get("near_duplicates")
    if near:
        pairs = "; ".join(f"{a}~{b} ({s:.2f})" for a, b, s in near["pairs"][:5])
        table.add_row(
            f"near duplicates (>= {near['threshold']})", f"{near['rows']}" + (f"  ({pairs})" if pairs else "")
        )
    return table


def filter_source(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    out_path: Path = typer.Option(..., "--out", "-o", help="the kept rows, same columns (.jsonl)"),
    report_path: Optional[Path] = typer.Option(None, "--report", help="the JSON report (default: <out>.report.json)"),
    dedup: bool = typer.Option(False, "--dedup", help="drop exact duplicates (whitespace collapsed)"),
    near_dedup: Optional[float] = typer.Option(None, "--near-dedup", help="drop near duplicates at this Jaccard"),
    min_tokens: Optional[int] = typer.Option(None, "--min-tokens", help="drop rows under this many tokens"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="drop rows over this many tokens"),
    min_answer_tokens: Optional[int] = typer.Option(None, "--min-answer-tokens", help="... answer tokens"),
    max_answer_tokens: Optional[int] = typer.Option(None, "--max-answer-tokens", help="... answer tokens"),
    ifd_max: Optional[float] = typer.Option(None, "--ifd-max", help="drop rows with IFD above this (the paper: 1)"),
    ifd_top: Optional[float] = typer.Option(None, "--ifd-top", help="then keep this fraction, highest IFD first"),
    model: str = typer.Option("builtin:smollm2-135m", "--model", help=MODEL_HELP),
    reward_model: Optional[str] = typer.Option(None, "--reward-model", help="a recipe=reward_model run dir"),
    min_reward: Optional[float] = typer.Option(None, "--min-reward", help="drop rows the reward model scores below"),
    split: str = typer.Option("train", "--split", help="the split of a builtin or hub source"),
    fmt: str = typer.Option("auto", "--format", help="auto | text | messages | prompt_completion | preference"),
    max_rows: Optional[int] = typer.Option(None, "--max-rows", min=1, help="the first N rows only"),
    option: List[str] = typer.Option([], "--option", help="a builtin generator's option KEY=VALUE; repeat"),
    hub_config: Optional[str] = typer.Option(None, "--hub-config", help="a hub dataset's config name"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="rows per scoring forward pass"),
    max_length: int = typer.Option(1024, "--max-length", min=4, help="IFD: tokens per scored row"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
) -> None:
    """Screen a data set before SFT: length bounds, dedup, IFD, a reward-model threshold.

    Writes the kept rows as they were (JSON lines) and a report naming every dropped row and why.
    IFD (instruction-following difficulty, Li et al. 2024) = the model's loss on the answer after
    the instruction / after no instruction; --ifd-max 1 drops rows the instruction does not help.

    [bold]Examples[/]

      polmctl data filter rows.jsonl --out kept.jsonl --dedup --near-dedup 0.8 --max-tokens 1024\n
      polmctl data filter builtin:instructions --out kept.jsonl --ifd-max 1 --ifd-top 0.5\n
      polmctl data filter rows.jsonl --out kept.jsonl --reward-model outputs/reward_model/... --min-reward 0\n
      polmctl run recipe=sft data.source=kept.jsonl
    """
    from polmctl.curation.screen import Filters, report, screen, write_jsonl
    from polmctl.engine.metrics import write_json
    from polmctl.entry import quiet_libraries
    from polmctl.errors import CommandError

    quiet_libraries()
    filters = Filters(
        dedup=dedup,
        near_dedup=near_dedup,
        min_tokens=min_tokens,
        max_tokens=max_tokens,
        min_answer_tokens=min_answer_tokens,
        max_answer_tokens=max_answer_tokens,
        ifd_max=ifd_max,
        ifd_top=ifd_top,
        min_reward=min_reward,
    )
    report_path = report_path or out_path.with_name(f"{out_path.stem}.report.json")
    try:
        filters.check()
        if (reward_model is None) != (min_reward is None):
            raise CommandError("--reward-model and --min-reward go together: the model scores, the bound drops")
        if out_path.suffix.lower() != ".jsonl":
            raise CommandError(f"--out {out_path}: write the kept rows to a .jsonl file")
        rows, detected = _load(source, split, max_rows, option, hub_config, fmt)
        tokenizer = _tokenizer(model) if (filters.needs_lengths or filters.needs_ifd) else None
        result = screen(
            rows,
            detected,
            filters,
            source=source,
            tokenizer=tokenizer,
            ifd=_ifd_scorer(model, tokenizer, batch_size, max_length, device) if filters.needs_ifd else None,
            reward=_reward_scorer(reward_model, batch_size, device) if reward_model else None,
        )
        write_jsonl([rows[i] for i in result.kept], out_path)
    except _errors() as err:
        _fail(str(err))
    summary = report(result, source=source, split=split, fmt=detected, out=out_path, filters=filters)
    write_json(report_path, summary)
    out.print(filter_table(summary))
    out.print(f"kept rows: {out_path}\nreport: {report_path}", highlight=False, soft_wrap=True)


def _ifd_scorer(model: str, tokenizer, batch_size: int, max_length: int, device: str):
    def score(pairs):
        from polmctl.config.schema import ModelConfig
        from polmctl.console import console
        from polmctl.curation.scores import ifd_scores
        from polmctl.models import load_model

        lm = load_model(ModelConfig(name_or_path=model), device=_device(device), for_training=False, head="causal_lm")
        with console.status(f"IFD of {len(pairs)} rows with {model}"):
            return ifd_scores(lm, tokenizer, pairs, batch_size=batch_size, max_length=max_length)

    return score


def _reward_scorer(path: str, batch_size: int, device: str):
    def score(pairs):
        from polmctl.console import console
        from polmctl.curation.scores import reward_scores

        with console.status(f"reward scores of {len(pairs)} rows"):
            return reward_scores(path, pairs, device=_device(device), batch_size=batch_size)

    return score


def filter_table(summary: dict[str, Any]) -> Table:
    table = Table(
        title=f"{summary['source']}: kept {summary['kept']:,} of {summary['rows']:,} rows", title_justify="left"
    )
    for col in ("dropped because", "rows", "first rows (reason)"):
        table.add_column(col, overflow="fold")
    by_reason: dict[str, list[dict]] = {}
    for d in summary["dropped"]:
        by_reason.setdefault(d["reason"], []).append(d)
    for reason, drops in by_reason.items():
        table.add_row(reason, f"{len(drops):,}", "; ".join(f"{d['row']} ({d['detail']})" for d in drops[:3]))
    if not by_reason:
        table.add_row("(nothing dropped)", "0", "")
    return table


def raft_rows(
    qa: str = typer.Argument(..., help=f"question/answer rows naming their oracle document: {SOURCE_HELP}"),
    docs: str = typer.Argument(..., help="the documents, {id, text} rows (a .jsonl file, or any source)"),
    out_path: Path = typer.Option(..., "--out", "-o", help="the SFT rows {prompt, completion, ...} (.jsonl)"),
    distractors: int = typer.Option(3, "--distractors", min=1, help="documents beside the oracle in each prompt"),
    p_oracle: float = typer.Option(0.8, "--p-oracle", min=0.0, max=1.0, help="fraction of rows that hold the oracle"),
    seed: int = typer.Option(0, "--seed", help="seeds which rows hold the oracle, the distractors and the order"),
    question_column: str = typer.Option("question", "--question-column", help="the QA rows' question column"),
    answer_column: str = typer.Option("answer", "--answer-column", help="the QA rows' answer column"),
    oracle_column: str = typer.Option("doc_id", "--oracle-column", help="the QA rows' oracle document id column"),
    instruction: Optional[str] = typer.Option(None, "--instruction", help="the line before the documents"),
    split: str = typer.Option("train", "--split", help="the split of a builtin or hub QA source"),
) -> None:
    """Build RAFT rows: each question with its oracle document among sampled distractors.

    A (1 - p-oracle) fraction of the rows hold distractors only (Zhang et al. 2024); the rows are
    prompt/completion rows recipe=sft and recipe=lora train on.

    [bold]Examples[/]

      polmctl data raft qa.jsonl docs.jsonl --out raft.jsonl --distractors 3 --p-oracle 0.8\n
      polmctl run recipe=lora data.source=raft.jsonl data.max_length=1024
    """
    from polmctl.curation.raft import INSTRUCTION, build_raft, documents
    from polmctl.curation.screen import write_jsonl
    from polmctl.data import load_rows

    try:
        if out_path.suffix.lower() != ".jsonl":
            from polmctl.errors import CommandError

            raise CommandError(f"--out {out_path}: write the RAFT rows to a .jsonl file")
        rows = build_raft(
            load_rows(qa, split),
            documents(load_rows(docs), docs),
            distractors=distractors,
            p_oracle=p_oracle,
            seed=seed,
            source=qa,
            question_column=question_column,
            answer_column=answer_column,
            oracle_column=oracle_column,
            instruction=instruction or INSTRUCTION,
        )
        write_jsonl(rows, out_path)
    except _errors() as err:
        _fail(str(err))
    with_oracle = sum(r["oracle_in_context"] for r in rows)
    out.print(
        f"{len(rows)} RAFT rows ({with_oracle} with their oracle document, {len(rows) - with_oracle} with "
        f"distractors only; {distractors + 1} documents each) -> {out_path}",
        highlight=False,
        soft_wrap=True,
    )
