"""User-facing errors and warnings.

Anything a user can cause (a bad path, an unknown architecture, a ratio out of range) raises
`DepthkitError` with a message that says what went wrong and how to fix it. The CLI prints that
one line and exits non-zero instead of showing a traceback from deep inside torch. Messages name
options as Python does, in backticks (`seq_len`); the CLI shows those as its flags (`--seq-len`).
"""


class DepthkitError(Exception):
    """An error caused by the user's input or environment, with an actionable message."""


def require(condition: bool, message: str) -> None:
    """Raise `DepthkitError(message)` unless `condition` holds."""
    if not condition:
        raise DepthkitError(message)


def warn(message: str) -> None:
    """One `depthkit: warning:` line on stderr: something the user should know, not a failure."""
    import sys

    print(f"depthkit: warning: {message}", file=sys.stderr)
