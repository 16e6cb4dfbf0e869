"""The one door from a config's ``_target_`` dotpath to Python code: an allow-list and a deny-list.

    polmctl run recipe=grpo "method.rewards=[{_target_: polmctl.rollout.rewards.length_penalty}]"
    POLMCTL_ALLOW_TARGETS=mypkg.rewards polmctl run recipe=grpo "method.rewards=[{_target_: mypkg.rewards.f}]"

A target may name polmctl's own code, or code under a prefix listed (comma-separated) in the
environment variable ``POLMCTL_ALLOW_TARGETS``. The allow-list lives in the environment, not in the
config, on purpose: a shared recipe or a pipeline stage's overrides can carry a ``_target_``, and a
config key that widened the list would let the same file open its own door; the environment belongs
to the person who runs the command. Modules that run commands, load code or reach into the
interpreter (``DENIED``) stay shut even under an allowed prefix, as do names Hydra's own instantiate
blocks, and dunder attributes (``__globals__``, ``__builtins__``: the way from any function to eval).

The dotpath is checked as written before anything is imported (``check_target``: validation does
this, so ``polmctl show`` never runs code a config names), and the object it resolves to is checked
again by its real module (``resolve_target``), so ``polmctl.targets.os.system`` (os as polmctl
imports it) is refused as ``posix.system``.
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any

from polmctl.errors import ConfigError

ALLOW_ENV = "POLMCTL_ALLOW_TARGETS"
OWN = ("polmctl",)
# Modules (and everything under them) that no allow-list opens: they run commands or other
# processes, load or evaluate code, unpickle, open sockets or native libraries, or reach into
# the interpreter's own state.
DENIED = (
    "os",
    "posix",
    "nt",
    "subprocess",
    "_posixsubprocess",
    "builtins",
    "_sitebuiltins",
    "sys",
    "shutil",
    "importlib",
    "_imp",
    "_frozen_importlib",
    "_frozen_importlib_external",
    "zipimport",
    "pkgutil",
    "site",
    "pickle",
    "_pickle",
    "marshal",
    "shelve",
    "dill",
    "cloudpickle",
    "joblib",
    "socket",
    "_socket",
    "ctypes",
    "_ctypes",
    "cffi",
    "pty",
    "code",
    "codeop",
    "runpy",
    "multiprocessing",
    "_multiprocessing",
    "concurrent",
    "threading",
    "_thread",
    "signal",
    "asyncio",
    "pdb",
    "bdb",
    "cProfile",
    "profile",
    "timeit",
    "trace",
    "pydoc",
    "webbrowser",
    "inspect",
    "gc",
    "types",
    "operator",
    "_operator",
    "logging.config",
    "torch.load",
    "torch.serialization",
    "torch.hub",
    "torch.package",
    "torch.utils.cpp_extension",
)


def allowed_prefixes() -> tuple[str, ...]:
    """polmctl, plus the prefixes listed in $POLMCTL_ALLOW_TARGETS (read on every call)."""
    listed = (p.strip() for p in os.environ.get(ALLOW_ENV, "").split(","))
    return OWN + tuple(p for p in listed if p)


def _under(name: str, prefixes: tuple[str, ...]) -> str | None:
    """The prefix ``name`` equals or lies under (``mypkg`` covers ``mypkg.x``, not ``mypkgx``)."""
    return next((p for p in prefixes if name == p or name.startswith(p + ".")), None)


def _hydra_blocks(name: str) -> bool:
    """Whether Hydra's instantiate blocklist refuses ``name``. Hydra keeps that list private
    (hydra/_internal/target_policy.py of its 1.3 patch releases); where it is absent, DENIED still applies."""
    try:
        from hydra._internal.target_policy import _is_blocklisted_target
    except ImportError:
        return False
    return bool(_is_blocklisted_target(name))


def _how_to_allow(name: str) -> str:
    root = name.split(".")[0]
    return (
        f"only polmctl's own code and prefixes listed in ${ALLOW_ENV} may be targets; to use your own "
        f"code, allow its package: {ALLOW_ENV}={root} polmctl ... (comma-separate several)"
    )


def _refuse(name: str, key: str, shown: str | None = None) -> None:
    """Raise ConfigError when ``name`` may not be a target; ``shown`` is the dotpath as the config wrote it."""
    what = f"{shown!r} (which is {name})" if shown and shown != name else repr(name)
    parts = name.split(".")
    if not name or any(not p for p in parts):
        raise ConfigError(key, f"{what} is not a dotpath; write package.module.function")
    if any(p.startswith("__") for p in parts):
        raise ConfigError(key, f"{what} reaches a dunder attribute; name a function or class itself")
    denied = _under(name, DENIED)
    if denied or _hydra_blocks(name):
        why = f"the {denied} module" if denied else "Hydra's instantiate blocklist"
        raise ConfigError(
            key,
            f"{what} is refused: {why} runs commands, loads code or reaches into the interpreter, "
            "and no allow-list opens it; name a function of your own instead",
        )
    if not _under(name, allowed_prefixes()):
        raise ConfigError(key, f"{what} is refused: {_how_to_allow(name)}")


def check_target(dotpath: Any, key: str) -> None:
    """Refuse ``dotpath`` as written, without importing anything (validation calls this)."""
    if not isinstance(dotpath, str):
        raise ConfigError(key, f"must be a dotpath string, got {type(dotpath).__name__} {dotpath!r:.60}")
    _refuse(dotpath.strip(), key)


def identity(obj: Any) -> str:
    """Where ``obj``'s code really lives: module.qualname of a function or class (a partial by its
    function, a bound method by its class's function), a module's name, or an instance's class."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    if isinstance(obj, types.MethodType):
        obj = obj.__func__
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)) and module and qualname:
        return f"{module}.{qualname}"
    cls = type(obj)  # an instance (or a C-level callable without a module): its class runs
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_target(dotpath: Any, key: str) -> Any:
    """The object ``dotpath`` names, imported only once its dotpath passes ``check_target``, and
    returned only if its real module passes too; otherwise a ConfigError naming ``key``."""
    check_target(dotpath, key)
    # hydra.utils.get_object is this lookup plus an error log line of its own; the error here says it once.
    from hydra._internal.utils import _locate

    try:
        obj = _locate(dotpath.strip())
    except Exception as err:  # ImportError, or ValueError for a malformed path; the module's own errors too
        raise ConfigError(key, f"{dotpath!r} cannot be imported: {' '.join(str(err).split())}") from None
    _refuse(identity(obj), key, shown=dotpath.strip())
    return obj


def check_config_targets(node: Any, path: str = "") -> None:
    """``check_target`` on every ``_target_`` in a validated config (dataclasses, mappings, lists),
    each error naming its key, e.g. method.rewards[1]._target_."""
    if is_dataclass(node) and not isinstance(node, type):
        for f in fields(node):
            check_config_targets(getattr(node, f.name), f"{path}.{f.name}" if path else f.name)
    elif isinstance(node, Mapping):
        for name, value in node.items():
            key = f"{path}.{name}" if path else str(name)
            if name == "_target_":
                check_target(value, key)
            else:
                check_config_targets(value, key)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            check_config_targets(value, f"{path}[{i}]")
