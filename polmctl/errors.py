"""Every error type polmctl raises on purpose, in one place.

Each is an error a user can fix: its message is one line that names what is wrong and where (the
config key, the file and row, the model) and says how to fix it. ``polmctl`` prints such errors as
that line, never as a traceback (``USER_ERRORS``); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is wrong. ``key`` is the full dotted path of the offending key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


class DataError(ValueError):
    """Bad data or a bad data option: the message names the source, the row index and the
    column where they are known, and says how to fix it."""


class ModelError(RuntimeError):
    """A model or tokenizer cannot be resolved, loaded, adapted or saved."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss, a rollout with nothing to learn from)."""


class RewardError(ValueError):
    """A reward function failed or returned something other than one finite number per completion."""


class CommandError(RuntimeError):
    """A run-management command (runs, compare, chat, export, ...) cannot do what was asked."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DataError,
    ModelError,
    TrainingError,
    RewardError,
    CommandError,
    FileNotFoundError,
)
