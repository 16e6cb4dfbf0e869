"""Compose a config outside a run (for ``polmctl show`` and tests) with Hydra's compose API."""

from __future__ import annotations

from typing import Sequence

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from polmctl.config.schema import RunConfig
from polmctl.methods.registry import register_configs
from polmctl.validate import check_overrides, validate


def hydra_error_text(err: BaseException) -> str:
    """One line from a Hydra/OmegaConf error and its causes, without the search-path dump."""
    parts = []
    while err is not None:
        text = " ".join(str(err).split()).split(" Config search path:")[0]
        if text and text not in parts:
            parts.append(text)
        err = err.__cause__
    return ": ".join(parts)


def compose_config(overrides: Sequence[str] = ()):
    """The composed DictConfig, with output_dir pinned (there is no Hydra run dir here)."""
    check_overrides(list(overrides))
    register_configs()
    try:
        with initialize_config_module("polmctl.conf", version_base="1.3"):
            cfg = compose("config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ValueError(hydra_error_text(err)) from None
    if not any(o.startswith("output_dir=") for o in overrides):
        OmegaConf.set_struct(cfg, False)
        cfg.output_dir = "<hydra run dir>"
    return cfg


def compose_validated(overrides: Sequence[str] = ()) -> tuple[RunConfig, str]:
    """The validated RunConfig and its YAML text."""
    cfg = compose_config(overrides)
    run = validate(cfg)
    return run, OmegaConf.to_yaml(OmegaConf.structured(run))
