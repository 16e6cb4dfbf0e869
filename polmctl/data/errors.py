class DataError(ValueError):
    """Bad data: the message names the source, the row index and the column, and the fix."""
