"""Turn a composed DictConfig into a checked ``RunConfig`` or one clear ``ConfigError``.

Hydra already rejects unknown keys and wrong types of the typed sections while
composing (the schema is the first entry of the defaults list). This adds what Hydra
cannot know: the per-objective ``method`` schema and semantic checks (ranges, choices),
each error naming the full key path and what is allowed.
"""

from __future__ import annotations

import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from polmctl.config.schema import SECTIONS, ConfigError, RunConfig, help_for


def _schema_at(schema: type, path: list[str]) -> type:
    """The dataclass that holds the key at ``path`` (e.g. TrainerConfig for trainer.foo)."""
    for part in path[:-1]:
        hints = get_type_hints(schema)
        if part not in hints or not is_dataclass(hints[part]):
            break
        schema = hints[part]
    return schema


def _structured_error(err: OmegaConfBaseException, prefix: str, schema: type) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    key = f"{prefix}.{key}" if prefix and key else (key or prefix)
    msg = str(getattr(err, "msg", err)).splitlines()[0]
    if "not in" in msg:
        holder = _schema_at(schema, (getattr(err, "full_key", "") or "").split("."))
        return ConfigError(key, f"unknown key; valid keys here: {', '.join(help_for(holder))}")
    return ConfigError(key, msg)


def _typed(node: Any, schema: type, prefix: str) -> Any:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            key = f"{prefix}.{missing[0]}" if prefix else missing[0]
            raise ConfigError(key, f"needs a value; set it on the command line, e.g. {key}=...")
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _structured_error(err, prefix, schema) from None


def validate(cfg: DictConfig) -> RunConfig:
    """Return the typed, checked config of a run, or raise ConfigError."""
    from polmctl.objectives import METHOD_SCHEMAS, OBJECTIVES  # here, not at the top: objectives import the schema

    if not isinstance(cfg, DictConfig):
        raise ConfigError("<root>", "expected a mapping")
    # A plain container, so the merge below is strict (unknown keys fail) whatever flags
    # Hydra left on the composed tree; interpolations stay unresolved until to_object.
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra", None)
    method_node = tree.pop("method", None) or {"objective": "sft"}
    objective = method_node.get("objective", "sft")
    if objective not in METHOD_SCHEMAS:
        raise ConfigError("method.objective", f"got {objective!r}; allowed: {', '.join(METHOD_SCHEMAS)}")

    for name in tree:
        if name not in {f.name for f in fields(RunConfig)}:
            raise ConfigError(str(name), f"unknown key; valid top-level keys: {', '.join(f.name for f in fields(RunConfig))}")
    run: RunConfig = _typed(tree, RunConfig, "")
    run.method = _typed(method_node, METHOD_SCHEMAS[objective], "method")

    for section in SECTIONS:
        getattr(run, section).check(section)
    check = getattr(run.method, "check", None)
    if check:
        check("method")
    if run.runner == "train" and objective not in OBJECTIVES:
        raise ConfigError("method.objective", f"{objective!r} trains nothing: it runs with runner={objective} "
                                              "(set it, or use a recipe that does, e.g. recipe=prune)")
    if run.runner in METHOD_SCHEMAS:  # prune, quantize, merge, ...: the method is the runner's
        require_method(run, run.runner)
    if run.runner == "train":
        _check_eval_fits_model(run, objective)
    if run.data.packing and run.peft.method in ("prompt_tuning", "prefix_tuning"):
        # A packed micro-batch is one sequence: the soft prompt or prefix would precede only its first row.
        raise ConfigError("data.packing", f"cannot pack rows with peft.method={run.peft.method} (the virtual "
                                          "tokens would precede only the first row of each pack); set "
                                          "data.packing=false")
    if run.resume not in (None, "auto") and not run.resume:
        raise ConfigError("resume", "use auto or a checkpoint path")
    return run


def _check_eval_fits_model(run: RunConfig, objective: str) -> None:
    from polmctl.evals import check_tasks_fit

    check_tasks_fit(run.eval.tasks, objective == "reward_model", f"what method.objective={objective} trains")


def require_method(run: RunConfig, runner: str) -> None:
    """A runner that owns a method (prune, quantize, merge, vlm, pipeline) reads only that method;
    validate() calls this, and each such runner too, for configs built without validate()."""
    objective = getattr(run.method, "objective", None)
    if objective != runner:
        raise ConfigError("method.objective", f"runner={runner} reads method={runner}, got {objective!r}; "
                                              f"use recipe={_recipe_for_runner(runner)}")


def _recipe_for_runner(runner: str) -> str:
    """The recipe file that sets ``runner: <runner>`` (vlm -> vlm_adapter), for error messages."""
    recipes = Path(__file__).parent.parent / "conf" / "recipe"
    for path in sorted(recipes.glob("*.yaml")):
        if re.search(rf"^runner:\s*{re.escape(runner)}\s*$", path.read_text(), re.MULTILINE):
            return path.stem
    return runner
