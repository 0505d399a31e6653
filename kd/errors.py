class KdError(Exception):
    """A problem the user can fix. Its message is one sentence that names the bad value and what to do."""
