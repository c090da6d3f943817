"""One way to fail: a problem the user can fix is one line, "error: <culprit>: <what to do>", and an exit code.

Tracebacks are for segnet's own bugs. Every command runs its work inside `reported()`; `--debug` (infer,
export, bench) or `hydra.verbose=true` (train, evaluate) lets the traceback through.
"""

import sys
from contextlib import contextmanager


class UserError(Exception):
    """A problem with the user's data, files, config or environment; the message names the culprit and the fix."""

    exit_code = 2


class DatasetError(UserError, ValueError):
    """A problem with the user's data: the message names the file and what to do."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (the schema already refuses unknown keys, wrong types and choices)."""


class MissingExtra(UserError, ImportError):
    """An optional package is not installed: say which extra brings it."""

    def __init__(self, what: str, extra: str):
        super().__init__(f"{what} needs the optional packages of segnet[{extra}]: pip install -e '.[{extra}]'")
        self.extra = extra


class NonFiniteLoss(UserError):
    exit_code = 3


class LostWorker(UserError):
    """Another worker of a multi-worker job died: the whole job stops and can be started again."""

    exit_code = 4


class Interrupted(UserError):
    """Ctrl-C: what is finished is on disk; the message says how to continue."""

    exit_code = 130


def first_line(e: Exception) -> str:
    """The first line of a library's own error message (ffmpeg's, onnxruntime's...), to quote in ours."""
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


# FileNotFoundError and FileExistsError: our own messages about paths the user gave.
FAILURES = (UserError, FileNotFoundError, FileExistsError)


@contextmanager
def reported(debug: bool = False):
    """Turn a user-fixable failure into one line on stderr and its exit code; with debug, the traceback."""
    try:
        yield
    except KeyboardInterrupt:
        if debug:
            raise
        print("\ninterrupted", file=sys.stderr)
        sys.exit(Interrupted.exit_code)
    except FAILURES as e:
        if debug:
            raise
        prefix = "\ninterrupted" if isinstance(e, Interrupted) else "error"
        print(f"{prefix}: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
