"""The one exception type that reaches the user as a sentence instead of a traceback."""


class SimsearchError(Exception):
    """A problem with the user's input or environment, explained in one sentence.

    The CLI prints the message and exits with status 2; anything else is a bug and keeps its traceback.
    """
