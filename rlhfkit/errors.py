"""The package's exceptions: user mistakes are RlhfkitError, one line, never a traceback at the CLI."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (a library's multi-line error as one line)."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


class RlhfkitError(Exception):
    """Bad input or configuration. The message is one line that says what and where."""


class ConfigError(RlhfkitError):
    """A configuration is invalid (unknown key, wrong type, inconsistent sizes, missing file)."""


class DataError(RlhfkitError):
    """Input data is unreadable or malformed; the message names the file, line or field."""


class TrainingError(RlhfkitError):
    """Training went wrong at run time (a NaN/inf loss); the message says where and what to try."""


class OutputError(RlhfkitError):
    """An output folder is not rlhfkit's to write: it holds files rlhfkit did not write, or another run holds it."""
