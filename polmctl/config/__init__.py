"""Typed config schemas, their registration with Hydra, and validation."""

from hydra.core.config_store import ConfigStore

from polmctl.config.schema import ConfigError, RunConfig
from polmctl.config.validate import validate


def register_schema() -> None:
    """Register ``RunConfig`` as ``polmctl_schema``, the first entry of conf/config.yaml."""
    ConfigStore.instance().store(name="polmctl_schema", node=RunConfig)


__all__ = ["ConfigError", "RunConfig", "validate", "register_schema"]
