"""The one exception type of the data package."""


class DataError(ValueError):
    """Bad data or a bad data option: the message names the source, the row index and the
    column where they are known, and says how to fix it."""
