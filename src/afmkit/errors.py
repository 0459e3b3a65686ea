"""Errors that a user can fix. The CLI prints them as one line without a traceback."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix."""


class ModelNotFoundError(UserError):
    """A model name or path that does not resolve to weights."""


class CorruptFileError(UserError):
    """A weight, tokenizer or checkpoint file that cannot be read."""
