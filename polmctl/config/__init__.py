"""Typed config schemas, their registration with Hydra, and validation."""

from hydra.core.config_store import ConfigStore

from polmctl.config.schema import ConfigError, RunConfig
from polmctl.config.validate import validate


def register_schema() -> None:
    """Register ``RunConfig`` as ``polmctl_schema`` (the first entry of conf/config.yaml) and
    each objective's method dataclass as an option of the ``method`` group, so a recipe's
    ``override /method: dpo`` brings every key of that method, typed, with its default."""
    from polmctl.objectives import METHOD_SCHEMAS

    store = ConfigStore.instance()
    store.store(name="polmctl_schema", node=RunConfig)
    for name, schema in METHOD_SCHEMAS.items():
        store.store(group="method", name=name, node=schema)


__all__ = ["ConfigError", "RunConfig", "validate", "register_schema"]
