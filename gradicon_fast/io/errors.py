"""The two kinds of user-facing error of the I/O layer; the CLI reports either as one line."""


class InputError(ValueError):
    """A problem with the user's inputs (file, option, shape): reported as one line by the CLI."""


class OutputError(InputError):
    """An output file could not be written; the message names the file and the cause."""


class IncompleteOutput(Exception):
    """A format check found a written file incomplete or unreadable (the message says how)."""
