class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says what to do."""
