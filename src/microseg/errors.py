"""Exceptions that reach the user as one clear line (the CLI prints them and exits 2)."""


class MicrosegError(Exception):
    """Base class: an error with a message meant for the user, not a traceback."""


class InputError(MicrosegError):
    """A file or argument the user gave is malformed (bad capture, bad rule or policy file)."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path, self.line = path, line
