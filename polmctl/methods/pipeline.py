"""Multi-stage pipelines: the ``method`` node and stage references.

A pipeline is a recipe whose ``method`` lists stages; each stage is another recipe with its own
command-line-style overrides, run in-process by ``polmctl.runners.pipeline`` into
``<pipeline run dir>/<N>-<name>/`` (N counts from 1)::

    method:
      name: pipeline
      stages:
        - {name: sft, recipe: lora, overrides: [peft.merge_on_save=true]}
        - {name: rm, recipe: reward_model}
        - name: ppo
          recipe: ppo
          overrides:
            - model.name_or_path=${stage:sft.final}
            - "method.rewards=[{name: reward_model, path: ${stage:rm.dir}}]"

    polmctl run recipe=instructgpt model=tiny "method.common=['trainer.max_steps=2','eval.tasks=[]']"

Stage references: ``${stage:NAME.KEY}``, an OmegaConf resolver registered here, so it is written
like any interpolation and survives composition (a plain ``${stages.sft.final}`` would make
OmegaConf look for a top-level ``stages`` key and fail, and escaping it as ``\\${...}`` is easy to
forget). The resolver returns its own text unchanged: composing and validating the pipeline keeps
``${stage:sft.final}`` as a literal string (``polmctl show`` prints it), and the pipeline runner
replaces it with the real path when it composes the stage. KEY is one of

    dir     the stage's run dir, <pipeline run dir>/<N>-<NAME> (a run dir also works as a model:
            polmctl loads its final/)
    final   its final/ model dir
    model   the model the stage started from (its model.name_or_path), e.g. the pipeline's input
            model for a first stage: compress uses it as the distillation teacher

A reference may only name an earlier stage; anything else is a one-line ConfigError naming the
config key (``method.stages.N.overrides.M``) and the stage, raised while validating, so
``polmctl show`` catches it before anything runs.

What each stage gets, in this order (later overrides of the same key win, as on a command line):

    recipe=<stage.recipe>
    model.name_or_path=<the pipeline's model.name_or_path>   the pipeline's input model: every stage
                                                             starts from it unless its own
                                                             overrides set model.name_or_path
    <stage.overrides>                                        references resolved
    <method.common>                                          every stage, after its own overrides
    output_dir=<pipeline run dir>/<N>-<name>
    resume=auto                                              only for the first unfinished stage of a
                                                             resumed pipeline (resume=auto)

So on the command line ``model=tiny`` (or ``model.name_or_path=...``) picks the pipeline's input
model and ``method.common`` carries anything else to every stage, winning over the recipe's
per-stage values: ``"method.common=['trainer.max_steps=2','eval.tasks=[]']"`` (quote each item:
Hydra's list syntax does not take a bare ``=``). Setting ``method.common`` replaces the recipe's
list; shipped recipes leave it empty. Every item must fit every stage (``method.*`` keys differ
between stages: give those to one stage, e.g. ``"method.stages.0.overrides=[...]"``, which replaces
that stage's list). ``method.common`` may not set the model (that is the pipeline's own
``model``) nor a key that a stage takes from a reference. Other pipeline-level
overrides (``trainer.max_steps=2`` without method.common) reach no stage; the runner refuses them
when it can see the command line (under ``polmctl run``).

The pipeline runner (polmctl/runners/pipeline.py) runs the stages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping

from omegaconf import OmegaConf

from polmctl.config.schema import option
from polmctl.errors import ConfigError

REF = re.compile(r"\$\{stage:([^}]*)\}")
KEYS = {"dir": "the stage's run dir", "final": "its final/ model dir", "model": "the model the stage started from"}
NAME = re.compile(r"^[A-Za-z0-9_-]+$")
RESERVED = {
    "recipe": "the stage's recipe is method.stages.N.recipe",
    "output_dir": "the pipeline puts every stage in <run dir>/<N>-<name>",
    "resume": "resume the whole pipeline with resume=auto",
    "hydra": "stages are composed in-process, without a Hydra run of their own",
}
SAFE_VALUE = re.compile(r"^[\w./:@+~-]+$")


def _keep(*parts: Any) -> str:
    """The ``stage`` resolver: a reference stays as it is until the pipeline runner fills it in."""
    return "${stage:" + ".".join(str(p) for p in parts) + "}"


OmegaConf.register_new_resolver("stage", _keep, replace=True)


@dataclass
class Stage:
    name: str = option(
        "",
        "the stage's name: its run dir is <pipeline run dir>/<N>-<name>; later stages refer "
        "to it as ${stage:<name>.dir|final|model}",
    )
    recipe: str = option("", "the recipe the stage runs (a name in conf/recipe, as recipe=...)")
    overrides: List[str] = option(
        [],
        "the stage's own command-line overrides, e.g. "
        "['model.name_or_path=${stage:sft.final}', 'trainer.max_steps=20']",
    )


@dataclass
class PipelineMethod:
    name: str = option("pipeline", "pipeline: run recipes one after another, each in its own run dir")
    stages: List[Stage] = option([], "the stages, in order: {name, recipe, overrides}")
    common: List[str] = option(
        [], "overrides for every stage, applied after each stage's own, e.g. ['trainer.max_steps=2', 'eval.tasks=[]']"
    )

    def check(self, section: str) -> None:
        if not self.stages:
            raise ConfigError(f"{section}.stages", "is empty; list the stages as {name, recipe, overrides}")
        seen: list[str] = []
        for i, stage in enumerate(self.stages):
            key = f"{section}.stages.{i}"
            if not NAME.match(stage.name or ""):
                raise ConfigError(
                    f"{key}.name",
                    f"got {stage.name!r}; use letters, digits, _ and - (it names the "
                    "stage's run dir and its references)",
                )
            if stage.name in seen:
                raise ConfigError(f"{key}.name", f"{stage.name!r} names two stages; stage names must be unique")
            if not stage.recipe:
                raise ConfigError(f"{key}.recipe", f"stage {stage.name!r} has no recipe; set one, e.g. recipe: sft")
            for j, text in enumerate(stage.overrides):
                _check_override(f"{key}.overrides.{j}", text, stage.name)
                for ref_name, ref_key in references(text):
                    check_reference(ref_name, ref_key, [s.name for s in self.stages], i, f"{key}.overrides.{j}")
            seen.append(stage.name)
        referenced = {override_key(t): (s.name, t) for s in self.stages for t in s.overrides if REF.search(t)}
        for j, text in enumerate(self.common):
            ckey = f"{section}.common.{j}"
            _check_override(ckey, text, None)
            if REF.search(text):
                raise ConfigError(
                    ckey,
                    f"{text}: a stage reference belongs in the overrides of the stage that "
                    "uses it (method.common reaches every stage, the first one too)",
                )
            target = override_key(text)
            if target in ("model", "model.name_or_path"):
                raise ConfigError(
                    ckey,
                    f"{text}: the pipeline's input model is the pipeline's own model; set it "
                    "on the command line (model=tiny or model.name_or_path=...), not in "
                    "method.common",
                )
            if target in referenced:
                name, ref = referenced[target]
                raise ConfigError(
                    ckey,
                    f"{text}: stage {name!r} sets {target} from a stage reference ({ref}); "
                    "method.common would replace it",
                )


def _check_override(key: str, text: str, stage: str | None) -> None:
    if not isinstance(text, str) or ("=" not in text and not text.startswith("~")):
        raise ConfigError(key, f"got {text!r}; write an override as key=value, as on the command line")
    target = override_key(text)
    top = target.split(".")[0].split("/")[0]
    if top in RESERVED:
        where = f"stage {stage!r}" if stage else "method.common"
        raise ConfigError(key, f"{text}: {where} cannot set {target}; {RESERVED[top]}")


def override_key(text: str) -> str:
    """The key an override sets: ``+a.b=1`` -> ``a.b``; ``model=tiny`` -> ``model``."""
    return text.split("=", 1)[0].lstrip("+~").strip()


def references(text: str) -> list[tuple[str, str]]:
    """The ``(stage, key)`` of each ``${stage:NAME.KEY}`` in ``text`` (KEY is "" when missing)."""
    out = []
    for match in REF.finditer(text):
        name, _, key = match.group(1).strip().rpartition(".")
        out.append((name, key) if name else (key, ""))
    return out


def check_reference(name: str, key: str, order: list[str], index: int, config_key: str) -> None:
    """Raise a one-line ConfigError unless ``${stage:name.key}`` names a stage before ``order[index]``."""
    here = order[index]
    ref = f"${{stage:{name}.{key}}}" if key else f"${{stage:{name}}}"
    if key not in KEYS:
        raise ConfigError(
            config_key,
            f"{ref} in stage {here!r}: unknown key {key!r}; use ${{stage:<name>.KEY}} "
            f"with KEY one of {', '.join(KEYS)}",
        )
    if name not in order:
        earlier = ", ".join(order[:index]) or "none"
        raise ConfigError(
            config_key, f"{ref} in stage {here!r}: no stage is named {name!r} (stages before {here!r}: {earlier})"
        )
    if order.index(name) >= index:
        what = "itself" if name == here else f"stage {name!r}, which runs after it"
        raise ConfigError(
            config_key, f"{ref} in stage {here!r} refers to {what}; a stage can only use the outputs of earlier stages"
        )


def stage_dir(run_dir: str | Path, index: int, name: str) -> Path:
    """The run dir of stage ``index`` (0-based in the config, 1-based on disk)."""
    return Path(run_dir) / f"{index + 1}-{name}"


def outputs_of(run_dir: str | Path, index: int, name: str, model: str) -> Dict[str, str]:
    """What ``${stage:name.KEY}`` stands for, KEY -> value."""
    path = stage_dir(run_dir, index, name)
    return {"dir": str(path), "final": str(path / "final"), "model": model}


def quote(value: str) -> str:
    """``value`` as a Hydra override value: as it is when plain, else single-quoted."""
    if SAFE_VALUE.match(value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def resolve(text: str, outputs: Mapping[str, Mapping[str, str]], config_key: str = "") -> str:
    """``text`` with every ``${stage:NAME.KEY}`` replaced from ``outputs`` (the stages run so far).

    An override that is exactly ``key=${stage:...}`` gets a quoted value when the path needs it."""

    def value(match: re.Match) -> str:
        name, _, key = match.group(1).strip().rpartition(".")
        if name not in outputs or key not in outputs[name]:
            raise ConfigError(
                config_key or "method.stages",
                f"{match.group(0)}: no earlier stage {name!r} with a "
                f"{key!r} output (known: {', '.join(outputs) or 'none'})",
            )
        return outputs[name][key]

    whole = re.fullmatch(r"([^=]+)=" + REF.pattern, text)
    if whole:
        return f"{whole.group(1)}={quote(value(REF.search(text)))}"
    return REF.sub(value, text)


def stage_overrides(
    method: PipelineMethod,
    index: int,
    run_dir: str | Path,
    input_model: str,
    outputs: Mapping[str, Mapping[str, str]],
    resume: bool = False,
) -> list[str]:
    """The overrides stage ``index`` is composed with (see the module docstring for the order)."""
    stage = method.stages[index]
    own = [resolve(t, outputs, f"method.stages.{index}.overrides.{j}") for j, t in enumerate(stage.overrides)]
    starts_elsewhere = any(override_key(t) == "model.name_or_path" for t in own)
    out = [
        f"recipe={stage.recipe}",
        *([] if starts_elsewhere else [f"model.name_or_path={quote(input_model)}"]),
        *own,
        *method.common,
        f"output_dir={quote(str(stage_dir(run_dir, index, stage.name)))}",
    ]
    return out + (["resume=auto"] if resume else [])
