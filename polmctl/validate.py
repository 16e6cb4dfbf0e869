"""Turn a composed DictConfig into a checked ``RunConfig`` or one clear ``ConfigError``.

Hydra already rejects unknown keys and wrong types of the typed sections while
composing (the schema is the first entry of the defaults list). This adds what Hydra
cannot know: the per-method ``method`` schema (polmctl/methods/registry.py) and semantic
checks (ranges, choices), each error naming the full key path and what is allowed.

    polmctl show recipe=dpo method.beta=0.2      # composes, then validates, then prints
"""

from __future__ import annotations

import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from polmctl.config.schema import SECTIONS, RunConfig, help_for
from polmctl.errors import ConfigError
from polmctl.evals import check_tasks_fit
from polmctl.evals.lm_eval import check_lm_eval_task, is_lm_eval_task
from polmctl.methods.registry import method_spec
from polmctl.models.peft_variants import check_peft_fits
from polmctl.rollout.cache import check_generation_fits
from polmctl.targets import check_config_targets


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


RENAMED = {
    "method.objective": "method.name (the method's name; a recipe sets it, e.g. recipe=dpo)",
    "runner": "nothing: the runner follows from the method (polmctl/methods/registry.py); drop it",
}


def check_overrides(overrides: list[str]) -> None:
    """Command-line overrides of keys that no longer exist get a one-line error naming what replaced
    them, before Hydra composes (which would only say the key is not in the schema)."""
    for text in overrides:
        key = text.split("=", 1)[0].lstrip("+~")
        if key in RENAMED:
            raise ConfigError(key, f"was renamed or removed; use {RENAMED[key]}")


def upgrade_recorded(cfg: DictConfig) -> DictConfig:
    """A run dir's recorded config (.hydra/config.yaml) as today's schema reads it: runs recorded
    before method.objective became method.name (and before the runner followed from the method)
    still resume, export and evaluate."""
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("runner", None)
    method = tree.get("method")
    if isinstance(method, dict) and "objective" in method:
        method.setdefault("name", method.pop("objective"))
    return OmegaConf.create(tree)


def validate(cfg: DictConfig) -> RunConfig:
    """Return the typed, checked config of a run, or raise ConfigError."""
    if not isinstance(cfg, DictConfig):
        raise ConfigError("<root>", "expected a mapping")
    # A plain container, so the merge below is strict (unknown keys fail) whatever flags
    # Hydra left on the composed tree; interpolations stay unresolved until to_object.
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra", None)
    for key, instead in RENAMED.items():
        parent, _, leaf = key.rpartition(".")
        node = tree.get(parent) if parent else tree
        if isinstance(node, dict) and leaf in node:
            raise ConfigError(key, f"was renamed or removed; use {instead}")
    method_node = tree.pop("method", None) or {"name": "sft"}
    spec = method_spec(method_node.get("name", "sft"))

    for name in tree:
        if name not in {f.name for f in fields(RunConfig)}:
            raise ConfigError(
                str(name), f"unknown key; valid top-level keys: {', '.join(f.name for f in fields(RunConfig))}"
            )
    run: RunConfig = _typed(tree, RunConfig, "")
    run.method = _typed(method_node, spec.schema, "method")
    check_config_targets(run)  # a _target_ anywhere names allowed code, before anything imports it

    for section in SECTIONS:
        getattr(run, section).check(section)
    for i, task in enumerate(run.eval.tasks):
        if is_lm_eval_task(task):
            check_lm_eval_task(task, f"eval.tasks[{i}]")
    check = getattr(run.method, "check", None)
    if check:
        check("method")
    if spec.runner == "train":
        head = spec.objective(run.method).model_head
        check_tasks_fit(run.eval.tasks, head, f"what method={run.method.name} trains")
    if run.data.packing and run.peft.method in ("prompt_tuning", "prefix_tuning"):
        # A packed micro-batch is one sequence: the soft prompt or prefix would precede only its first row.
        raise ConfigError(
            "data.packing",
            f"cannot pack rows with peft.method={run.peft.method} (the virtual "
            "tokens would precede only the first row of each pack); set "
            "data.packing=false",
        )
    check_peft_fits(run)  # the adapter against the model, the device and resume
    check_generation_fits(run)  # a quantized KV cache: its backend installed, a cache to quantize
    if run.resume not in (None, "auto") and not run.resume:
        raise ConfigError("resume", "use auto or a checkpoint path")
    return run


def runner_of(run: RunConfig) -> str:
    """The name of the runner that executes ``run`` (polmctl.runners.RUNNERS)."""
    method = run.method
    return method_spec(method.get("name", "sft") if isinstance(method, dict) else method.name).runner


def require_method(run: RunConfig, name: str) -> None:
    """A runner that owns a method (prune, quantize, merge, vlm, pipeline) reads only that method;
    each such runner calls this, for configs built without validate()."""
    got = getattr(run.method, "name", None)
    if got != name:
        raise ConfigError(
            "method.name", f"the {name} runner reads method={name}, got {got!r}; use recipe={recipe_for_method(name)}"
        )


def recipe_for_method(name: str) -> str:
    """The recipe file that picks method ``name`` (vlm -> vlm_adapter), for error messages."""
    recipes = Path(__file__).parent / "conf" / "recipe"
    for path in sorted(recipes.glob("*.yaml")):
        if re.search(rf"^\s*- override /method: {re.escape(name)}\s*$", path.read_text(), re.MULTILINE):
            return path.stem
    return name
