class ModelError(RuntimeError):
    """A model or tokenizer cannot be loaded or saved; the message says how to fix it."""
