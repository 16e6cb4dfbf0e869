"""The one error type of ``polmctl.models``: its message is one line that says how to fix it."""


class ModelError(RuntimeError):
    """A model or tokenizer cannot be resolved, loaded, adapted or saved; the message says how to fix it."""
