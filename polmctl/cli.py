"""The ``polmctl`` command. Typer owns the command surface; Hydra owns configuration.

    polmctl run recipe=lora trainer.lr=1e-4        # train (any Hydra override, -m sweeps)
    polmctl recipes                                # every recipe, by paradigm
    polmctl show recipe=dpo method.beta=0.2        # the composed, validated config
    polmctl eval outputs/lora/2026-11-24/10-00-00  # evaluate a run or a model
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

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
    for col in ("recipe", "paradigm", "method", "summary"):
        table.add_column(col, overflow="fold")
    for row in sorted(recipe_infos(), key=lambda r: (PARADIGM_ORDER.get(r["paradigm"], 9), r["name"])):
        table.add_row(row["name"], row["paradigm"], row["method"], row["summary"])
    out.print(table)


PARADIGM_ORDER = {"fine-tuning": 0, "alignment": 1, "reasoning": 2, "efficiency": 3, "integration": 4}


def recipe_infos() -> list[dict]:
    """The ``recipe:`` block of each file in conf/recipe (read as YAML, no composition)."""
    infos = []
    for path in sorted((CONF_DIR / "recipe").glob("*.yaml")):
        info = (yaml.safe_load(path.read_text()) or {}).get("recipe", {})
        infos.append({"file": path.stem, "name": info.get("name", path.stem), "paradigm": info.get("paradigm", "?"),
                      "method": info.get("method", ""), "summary": info.get("summary", "")})
    return infos


@app.command(context_settings=PASS_THROUGH)
def show(ctx: typer.Context) -> None:
    """Print the composed, validated config of a run as YAML (nothing is loaded or run).

    Example: polmctl show recipe=lora trainer.lr=1e-4 model=tiny
    """
    from polmctl.config.compose import compose_validated

    try:
        _, text = compose_validated(ctx.args)
    except ValueError as err:
        _fail(str(err))
    out.print(text, highlight=False, markup=False)


@app.command(name="eval", context_settings=PASS_THROUGH)
def eval_(ctx: typer.Context, model: Optional[str] = typer.Argument(
        None, help="a run dir, a model dir, builtin:<name> or a hub id")) -> None:
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
    overrides = ["runner=evaluate", "eval.before=false", "hydra.run.dir=outputs/eval/${now:%Y-%m-%d}/${now:%H-%M-%S}"]
    if model is not None:
        overrides += [f"model.name_or_path={model}", *_run_eval_overrides(Path(model))]
    entry_main([*overrides, *args])


def _run_eval_overrides(run_dir: Path) -> list[str]:
    """A run dir is evaluated on its own eval tasks and held-out source (overrides after it win)."""
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        return []
    from omegaconf import OmegaConf

    run_eval = OmegaConf.load(saved).get("eval") or {}
    out = []
    if run_eval.get("tasks"):
        out.append(f"eval.tasks=[{','.join(run_eval.tasks)}]")
    if run_eval.get("source"):
        out.append(f"eval.source={run_eval.source}")
    return out


def _fail(message: str) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
