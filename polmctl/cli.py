"""The ``polmctl`` command. Typer owns the command surface; Hydra owns configuration.

polmctl run recipe=lora trainer.lr=1e-4        # train (any Hydra override, -m sweeps)
polmctl recipes                                # every recipe, by paradigm
polmctl show recipe=dpo method.beta=0.2        # the composed, validated config
polmctl eval outputs/lora/2026-11-24/10-00-00  # evaluate a run or a model
polmctl runs                                   # every run, newest first (--json)
polmctl compare multirun/2026-11-25/10-00-00   # a sweep's metrics table and a PNG of loss over steps
polmctl report outputs/lora/2026-11-24/10-00-00 # a run's self-contained HTML page (curves, generations)
polmctl survey                                 # one recipe per paradigm on SmolLM2: survey/ (table, page)
polmctl chat outputs/lora/2026-11-24/10-00-00  # talk to a run's model (--prompt for one reply)
polmctl rollout-server builtin:smollm2-135m    # serve rollouts over HTTP (method.vllm_mode=server)
polmctl doctor                                 # versions, devices, bitsandbytes, builtin models, caches
polmctl data critique builtin:instructions --out cai.jsonl   # critique-and-revise SFT and preference rows
polmctl data inspect rows.jsonl                 # rows, token lengths (PNG), exact and near duplicates
polmctl data filter rows.jsonl --out kept.jsonl --dedup --near-dedup 0.8   # screen before SFT, with a report
polmctl data raft qa.jsonl docs.jsonl --out raft.jsonl   # RAFT rows: oracle document among distractors
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from polmctl.commands import data_screen

app = typer.Typer(
    name="polmctl",
    help="Post-train language models from the command line: one Hydra recipe per method.\n\n"
    "Example: [bold]polmctl run recipe=lora trainer.max_steps=100[/]",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
)
out = Console()
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}
CONF_DIR = Path(__file__).parent / "conf"


@app.command(context_settings=PASS_THROUGH)
def run(ctx: typer.Context) -> None:
    """Run a recipe. Every argument goes to Hydra unchanged.

    [bold]Examples[/]

      polmctl run recipe=lora\n
      polmctl run recipe=sft model=tiny debug=quick\n
      polmctl run -m recipe=lora trainer.lr=1e-4,3e-4     [dim]# a sweep: one run per value[/]\n
      polmctl run recipe=lora --cfg job                     [dim]# print the config, don't run[/]\n
      polmctl run recipe=lora resume=auto hydra.run.dir=outputs/lora/my-run

    Hydra's own help: polmctl run --hydra-help
    """
    from polmctl.entry import main as entry_main

    entry_main(ctx.args)


@app.command()
def recipes() -> None:
    """List every recipe: name, paradigm, method and what it does.

    Example: polmctl recipes
    """
    table = Table(title="polmctl recipes  (run one with: polmctl run recipe=NAME)", title_justify="left")
    infos = recipe_infos()
    # Names are what people type: never cut or wrapped; the method and summary wrap into what is left.
    table.add_column("recipe", no_wrap=True, min_width=max(len(r["name"]) for r in infos))
    table.add_column("paradigm", no_wrap=True)
    table.add_column("method", overflow="fold")
    table.add_column("summary", overflow="fold")
    for row in sorted(infos, key=lambda r: (PARADIGM_ORDER.get(r["paradigm"], 9), r["name"])):
        table.add_row(row["name"], row["paradigm"], row["method"], row["summary"])
    out.print(table)


PARADIGM_ORDER = {"fine-tuning": 0, "alignment": 1, "reasoning": 2, "efficiency": 3, "integration": 4}


def recipe_infos() -> list[dict]:
    """The ``recipe:`` block of each file in conf/recipe (read as YAML, no composition)."""
    infos = []
    for path in sorted((CONF_DIR / "recipe").glob("*.yaml")):
        info = (yaml.safe_load(path.read_text()) or {}).get("recipe", {})
        infos.append(
            {
                "file": path.stem,
                "name": info.get("name", path.stem),
                "paradigm": info.get("paradigm", "?"),
                "method": info.get("method", ""),
                "summary": info.get("summary", ""),
            }
        )
    return infos


@app.command(context_settings=PASS_THROUGH)
def show(ctx: typer.Context) -> None:
    """Print the composed, validated config of a run as YAML (nothing is loaded or run).

    Example: polmctl show recipe=lora trainer.lr=1e-4 model=tiny
    """
    from polmctl.compose import compose_validated

    try:
        _, text = compose_validated(ctx.args)
    except ValueError as err:
        _fail(str(err))
    out.print(text, highlight=False, markup=False)


@app.command(name="eval", context_settings=PASS_THROUGH)
def eval_(
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(None, help="a run dir, a model dir, builtin:<name> or a hub id"),
) -> None:
    """Evaluate a model or a finished run (its final/) on the eval tasks.

    [bold]Examples[/]

      polmctl eval outputs/lora/2026-11-24/10-00-00\n
      polmctl eval builtin:smollm2-135m eval.tasks=[arithmetic,perplexity] eval.max_samples=200
    """
    from polmctl.entry import main as entry_main

    args: List[str] = list(ctx.args)
    if model is not None and "=" in model:  # `polmctl eval model=tiny ...`: an override, not a path
        args.insert(0, model)
        model = None
    if model is not None:
        from polmctl.models.load import checkpoint_hint

        hint = checkpoint_hint(Path(model))
        if hint:  # before Hydra makes a run dir for an evaluation that cannot load
            _fail(hint)
    overrides = ["eval.before=false", "hydra.run.dir=outputs/eval/${now:%Y-%m-%d}/${now:%H-%M-%S}"]
    own = _run_eval_overrides(Path(model)) if model is not None else []
    if not any(o.startswith("recipe=") for o in own):
        overrides.insert(0, "method=evaluate")
    if model is not None:
        overrides += [f"model.name_or_path={model}", *own]
    entry_main([*overrides, *args])


def _run_eval_overrides(run_dir: Path) -> list[str]:
    """A run dir is evaluated on its own eval tasks and held-out source (overrides after it win)."""
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        return []
    from omegaconf import OmegaConf

    run = OmegaConf.load(saved)
    run_eval = run.get("eval") or {}
    out = []
    method = run.get("method") or {}
    if "vlm" in (run.get("runner"), method.get("name"), method.get("objective")):
        # a vision-language run is scored by its own runner, on its own data
        out += ["recipe=vlm_adapter", "method.train=false", f"data.source={run.data.source}"]
    if run_eval.get("tasks"):
        out.append(f"eval.tasks=[{','.join(run_eval.tasks)}]")
    if run_eval.get("source"):
        out.append(f"eval.source={run_eval.source}")
    return out


# -- runs, compare, chat, doctor ------------------------------------------------------------


@app.command()
def runs(
    dirs: Optional[List[Path]] = typer.Argument(None, help="dirs to search (default: ./outputs and ./multirun)"),
    as_json: bool = typer.Option(False, "--json", help="print the rows as JSON"),
) -> None:
    """List runs, newest first: recipe, model, key overrides, status, steps, wall time, final metrics.

    [bold]Examples[/]

      polmctl runs\n
      polmctl runs multirun/2026-11-25/10-00-00 --json
    """
    from polmctl.commands.runs import collect_runs, run_roots, runs_json, runs_table
    from polmctl.errors import CommandError

    try:
        roots = run_roots(dirs)
    except CommandError as err:
        _fail(str(err))
    found = collect_runs(roots)
    if as_json:
        typer.echo(runs_json(found))
    elif not found:
        out.print(f"no runs under {', '.join(map(str, roots))} (a run dir holds .hydra/config.yaml)", highlight=False)
    else:
        out.print(runs_table(found, f"{len(found)} runs under {', '.join(map(str, roots))}  (newest first)"))


@app.command()
def compare(
    paths: List[Path] = typer.Argument(..., help="run dirs, or a sweep dir (every job in it)"),
    metric: List[str] = typer.Option(["loss"], "--metric", "-m", help="a metrics.jsonl key to plot; repeat"),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="the PNG file (or dir) to write"),
) -> None:
    """Compare runs: a metrics table and a PNG plot of metrics over steps (its path is printed).

    [bold]Examples[/]

      polmctl compare multirun/2026-11-25/10-00-00\n
      polmctl compare outputs/sft/2026-11-25/10-00-00 outputs/lora/2026-11-25/11-00-00 --metric loss --metric grad_norm
    """
    from polmctl.commands.compare import compare as compare_runs
    from polmctl.errors import CommandError

    try:
        table, png = compare_runs(paths, metric, out_path)
    except CommandError as err:
        _fail(str(err))
    out.print(table)
    out.print(f"plot: {png}", highlight=False, soft_wrap=True)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="a run dir (a pipeline's too: every stage gets its section)"),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="the HTML file (default: <run dir>/report.html)"),
    samples: int = typer.Option(8, "--samples", min=0, help="generations shown per eval task, before and after"),
) -> None:
    """Write a self-contained HTML page of a run: numbers, eval before/after, curves, generations, config.

    Nothing on the page is fetched from the network (plots are inline PNG images).

    [bold]Examples[/]

      polmctl report outputs/lora/2026-11-24/10-00-00\n
      polmctl report outputs/compress/2026-11-25/10-00-00 --out compress.html --samples 12
    """
    from polmctl.commands.report import write_report
    from polmctl.errors import CommandError

    try:
        path = write_report(run_dir, out_path, samples)
    except CommandError as err:
        _fail(str(err))
    out.print(f"report: {path}", highlight=False, soft_wrap=True)


@app.command(context_settings=PASS_THROUGH)
def survey(
    ctx: typer.Context,
    quick: bool = typer.Option(False, "--quick", help="model=tiny and a few steps per stage: the chain in a minute"),
    out_dir: Optional[Path] = typer.Option(
        None, "--out", "-o", help="the survey's run dir (default: survey/; with --quick: survey-quick/)"
    ),
    resume: bool = typer.Option(False, "--resume", help="go on in --out: finished stages are skipped"),
) -> None:
    """Run one recipe per paradigm on one model (recipe=survey, a pipeline), then write its table
    (table.md, table.json) and its page (report.html) into the run dir. Extra arguments are Hydra
    overrides of the pipeline.

    [bold]Examples[/]

      polmctl survey                  [dim]# SmolLM2-135M-Instruct, into survey/[/]\n
      polmctl survey --quick          [dim]# model=tiny, tiny step counts, into survey-quick/[/]\n
      polmctl survey --resume         [dim]# after a failure or a kill: finished stages are skipped[/]
    """
    from polmctl.commands.survey import run_survey
    from polmctl.errors import CommandError

    try:
        code, paths = run_survey(out_dir, quick, resume, list(ctx.args))
    except CommandError as err:
        _fail(str(err))
    for what, path in paths.items():
        out.print(f"{what}: {path}", highlight=False, soft_wrap=True)
    if code:
        raise typer.Exit(code)


@app.command()
def chat(
    model: str = typer.Argument(..., help="a run dir, a model dir, builtin:<name> or a hub id"),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="send one message, print the reply, exit"),
    system: Optional[str] = typer.Option(None, "--system", help="a system message that opens the conversation"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="longest reply, in tokens"),
    temperature: float = typer.Option(0.7, "--temperature", min=0.0, help="sampling temperature; 0 is greedy"),
    top_p: float = typer.Option(0.9, "--top-p", min=0.0, max=1.0, help="nucleus sampling mass"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed the sampler (repeatable replies)"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    cache: str = typer.Option("dynamic", "--cache", help="KV cache: dynamic | quantized (generation.cache)"),
    cache_backend: str = typer.Option("hqq", "--cache-backend", help="quantized cache: hqq | quanto | fp8"),
    cache_nbits: int = typer.Option(4, "--cache-nbits", help="quantized cache: bits per key/value"),
    cache_group_size: int = typer.Option(64, "--cache-group-size", help="quantized cache: numbers per scale"),
    cache_residual_length: int = typer.Option(
        128, "--cache-residual-length", help="quantized cache: newest tokens kept in full precision"
    ),
) -> None:
    """Chat with a model or a finished run through its chat template, streaming the reply.

    Type /reset to clear the conversation, /exit or Ctrl-D to quit.

    [bold]Examples[/]

      polmctl chat outputs/lora/2026-11-24/10-00-00\n
      polmctl chat builtin:smollm2-135m --prompt "What is 12+7?" --temperature 0
    """
    from polmctl.commands.chat import ChatSettings, run_chat
    from polmctl.config.schema import GenerationConfig
    from polmctl.errors import CommandError, DataError, ModelError

    generation = GenerationConfig(cache, cache_backend, cache_nbits, cache_group_size, cache_residual_length)
    settings = ChatSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        system=system,
        device=device,
        seed=seed,
        generation=generation,
    )
    note = Console(stderr=True).print
    try:
        run_chat(
            model,
            settings,
            prompt,
            read=input,
            write=lambda text: typer.echo(text, nl=False),
            note=lambda text: note(text, style="dim", highlight=False, markup=False),
        )
    except (CommandError, DataError, ModelError) as err:
        _fail(str(err))


@app.command(name="rollout-server")
def rollout_server(
    model: str = typer.Argument(..., help="a run dir, a model dir, builtin:<name> or a hub id"),
    host: str = typer.Option("127.0.0.1", "--host", help="interface to listen on (loopback unless you say)"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="port to listen on; 0: a free one (printed)"),
    engine: str = typer.Option(
        "auto", "--engine", help="auto (vLLM with CUDA, else transformers) | vllm | transformers"
    ),
    device: str = typer.Option("auto", "--device", help="transformers engine: auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option(
        "auto_gpu", "--dtype", help="as model.dtype: auto_gpu (its default) | auto | float32 | bfloat16 | float16"
    ),
    gpu_memory_utilization: float = typer.Option(
        0.9, "--gpu-memory-utilization", min=0.01, max=1.0, help="vLLM: share of the GPU it takes"
    ),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", min=1, help="vLLM: longest sequence"),
    max_lora_rank: int = typer.Option(0, "--max-lora-rank", min=0, help="vLLM: largest LoRA rank pushed; 0: no LoRA"),
    idle_timeout: float = typer.Option(
        0.0, "--idle-timeout", min=0.0, help="stop after this many idle seconds; 0: never"
    ),
    verbose: bool = typer.Option(False, "--verbose", help="log every request"),
) -> None:
    """Serve a model for rollouts over HTTP; the trainer pushes its weights to it as it trains.

    [bold]Examples[/]

      polmctl rollout-server builtin:smollm2-135m --port 8000\n
      polmctl run recipe=grpo method.generation_backend=vllm method.vllm_mode=server method.vllm_server_url=http://127.0.0.1:8000
    """
    from polmctl.entry import quiet_libraries
    from polmctl.errors import CommandError, ModelError

    quiet_libraries()  # before transformers loads and logs
    from polmctl.rollout.server import serve

    try:
        serve(
            model,
            host=host,
            port=port,
            engine=engine,
            idle_timeout=idle_timeout,
            verbose=verbose,
            say=lambda line: out.print(line, highlight=False, soft_wrap=True, markup=False),
            device=device,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            max_lora_rank=max_lora_rank,
        )
    except (CommandError, ModelError) as err:
        _fail(str(err))


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="print the checks as JSON")) -> None:
    """Check the installation: library versions, devices, bitsandbytes, builtin models, caches.

    Each check says OK, note or PROBLEM and how to fix it; only a PROBLEM exits non-zero.

    [bold]Examples[/]

      polmctl doctor

      polmctl doctor --json
    """
    from polmctl.commands.doctor import PROBLEM, checks_json, doctor_table, run_checks

    checks = run_checks()
    problems = [c for c in checks if c.status == PROBLEM]
    if as_json:
        typer.echo(checks_json(checks))
    else:
        out.print(doctor_table(checks))
    if problems:
        _fail(f"{len(problems)} problem(s): " + "; ".join(f"{c.name}: {c.fix or c.detail}" for c in problems))


# -- export, plan ------------------------------------------------------------------------------


@app.command()
def export(
    source: str = typer.Argument(
        ..., help="a run dir, a checkpoints/step-N dir, a model dir, builtin:<name> or a hub id"
    ),
    out_path: Path = typer.Option(..., "--out", "-o", help="the model dir to write (a .gguf file for --format gguf)"),
    fmt: str = typer.Option("hf", "--format", help="hf (safetensors model dir) | gguf (llama.cpp)"),
    merge: bool = typer.Option(False, "--merge-adapters", help="merge a LoRA/DoRA adapter into the weights"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: float32)"),
    gguf_type: str = typer.Option("f16", "--gguf-type", help="GGUF weights: f32 | f16 | bf16 | q8_0"),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="also upload to this hub repo"),
) -> None:
    """Export a run, a checkpoint or a model as a standalone model dir (safetensors + tokenizer + chat template) or
    a GGUF file.

    [bold]Examples[/]

      polmctl export outputs/lora/2026-11-24/10-00-00 --merge-adapters --dtype bfloat16 --out exported/lora\n
      polmctl export outputs/lora/2026-11-24/10-00-00/checkpoints/step-40 --merge-adapters --out exported/step-40\n
      polmctl export outputs/lora/2026-11-24/10-00-00 --merge-adapters --format gguf --gguf-type q8_0 --out lora.gguf
    """
    from polmctl.commands.export import EXPORT_ERRORS
    from polmctl.commands.export import export as export_model
    from polmctl.entry import quiet_libraries

    quiet_libraries()
    try:
        result = export_model(
            source, out_path, fmt=fmt, merge=merge, dtype=dtype, gguf_type=gguf_type, push_to_hub=push_to_hub
        )
    except EXPORT_ERRORS as err:
        _fail(str(err))
    table = Table(title=f"exported {source}", title_justify="left", show_header=False)
    for key, value in result.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    out.print(table)


@app.command(context_settings=PASS_THROUGH)
def plan(ctx: typer.Context) -> None:
    """Dry-run a recipe: compose and validate the config, load the tokenizer and data, and estimate memory per
    process (weights, gradients, optimizer state, activations) against the device's free memory. Ends with FITS,
    TIGHT or DOES NOT FIT (exit code 1); nothing trains.

    [bold]Examples[/]

      polmctl plan recipe=lora\n
      polmctl plan recipe=sft model=tiny trainer.micro_batch_size=32 data.max_length=1024
    """
    from polmctl.commands.plan import PLAN_ERRORS, make_plan, plan_table
    from polmctl.entry import quiet_libraries

    quiet_libraries()
    try:
        result = make_plan(ctx.args)
    except PLAN_ERRORS as err:
        _fail(str(err))
    out.print(plan_table(result))
    out.print(f"[bold]{result['verdict']}[/]: {result['verdict_reason']}", highlight=False, soft_wrap=True)
    if result["verdict"] == "DOES NOT FIT":
        raise typer.Exit(1)


# -- data ---------------------------------------------------------------------------------------

data_app = typer.Typer(help="Make, inspect and screen training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
# inspect, filter, raft: their options and work are in polmctl/commands/data_screen.py (typer and rich only)
data_app.command(name="inspect")(data_screen.inspect_source)
data_app.command(name="filter")(data_screen.filter_source)
data_app.command(name="raft")(data_screen.raft_rows)


@data_app.command()
def critique(
    source: str = typer.Argument(..., help="rows with a prompt: builtin:<name>, a .jsonl/.json/.csv/.parquet file"),
    out_path: Path = typer.Option(..., "--out", "-o", help="the SFT rows {prompt, completion} (.jsonl)"),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="the preference rows (default: <out>.pairs.jsonl)"),
    principles: Optional[Path] = typer.Option(None, "--principles", help="a YAML list or text file of principles"),
    model: str = typer.Option("builtin:smollm2-135m", "--model", help="who drafts, critiques and revises"),
    rounds: int = typer.Option(1, "--rounds", min=1, help="critique-and-revise rounds per prompt"),
    max_rows: Optional[int] = typer.Option(None, "--max-rows", min=1, help="use the first N rows of SOURCE"),
    split: str = typer.Option("train", "--split", help="the split of a builtin or hub source"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="longest draft, critique or revision"),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy"),
    seed: int = typer.Option(0, "--seed", help="seeds the principle drawn per row and round, and sampling"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="prompts generated together"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option(
        "auto_gpu", "--dtype", help="as model.dtype: auto_gpu (its default) | auto | float32 | bfloat16 | float16"
    ),
) -> None:
    """Critique-and-revise data (Constitutional AI): the model drafts an answer to each prompt,
    critiques it against a principle and revises it; writes SFT rows (the revision) and preference
    rows (revision over draft) that recipe=sft and recipe=dpo train on.

    [bold]Examples[/]

      polmctl data critique builtin:instructions --max-rows 200 --out cai.jsonl\n
      polmctl data critique prompts.jsonl --principles mine.yaml --rounds 2 --out cai.jsonl\n
      polmctl data critique builtin:instructions --model <run dir> --dtype bfloat16 --out cai.jsonl\n
      polmctl run recipe=sft data.source=cai.jsonl;  polmctl run recipe=dpo data.source=cai.pairs.jsonl
    """
    from rich.progress import Progress

    from polmctl.commands.chat import load_for_chat, pick_device
    from polmctl.commands.critique import check_outputs, critique_and_revise, load_principles, pairs_path, write_jsonl
    from polmctl.data import load_rows
    from polmctl.data.prompts import prompt_rows
    from polmctl.errors import CommandError, DataError, ModelError
    from polmctl.models.precision import check_dtype_flag

    pairs = pairs or pairs_path(out_path)
    try:
        check_outputs(out_path, pairs)
        check_dtype_flag(dtype)
        rules = load_principles(principles)
        rows, _ = prompt_rows(load_rows(source, split, max_rows=max_rows), source)
        if temperature > 0:
            from transformers import set_seed

            set_seed(seed)
        lm, tokenizer = load_for_chat(model, pick_device(device), dtype)
        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(f"critique and revise ({len(rules)} principles)", total=len(rows))
            sft_rows, pair_rows, stats = critique_and_revise(
                lm,
                tokenizer,
                rows,
                rules,
                rounds=rounds,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=seed,
                batch_size=batch_size,
                advance=lambda n: bar.advance(task, n),
            )
    except (CommandError, DataError, ModelError) as err:
        _fail(str(err))
    if not sft_rows:
        _fail(
            f"{model} revised none of the {stats.rows} prompts into a non-empty answer; nothing written. Raise "
            "--max-new-tokens, sample (--temperature 0.7), or use a model that follows instructions"
        )
    write_jsonl(out_path, sft_rows)
    write_jsonl(pairs, pair_rows)
    out.print(
        f"{stats.rows} prompts: {stats.sft_rows} SFT rows -> {out_path}, {stats.pairs} preference rows -> {pairs} "
        f"({stats.empty_revisions} empty revisions dropped, {stats.unchanged} revisions equal to their draft)",
        highlight=False,
        soft_wrap=True,
    )


def _fail(message: str) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
