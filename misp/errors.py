"""Errors caused by the user's input, and how ``misp`` reports them.

A :class:`UserError` says what is wrong with a file, a record, an option or a checkpoint, and names it.
The ``misp`` command prints it as one line on stderr and exits with status 2, without the traceback of
library frames it passed through (``MISP_TRACEBACK=1`` shows it). Any other exception is a bug, and its
traceback is printed as usual.
"""

from __future__ import annotations

_UNION = "Does not validate against any of the Union subtypes"
# Lines of jsonargparse's nested Union report that describe the report, not the problem.
_REPORT_LINES = (
    _UNION,
    "Subtypes:",
    "Errors:",
    "Given value",
    "Expected a <class 'NoneType'>",
    "Problem with given class_path",
    "Not a valid subclass",
)


class UserError(Exception):
    """The input is wrong (a file, a record, an option, a checkpoint); the message names it."""


class ConfigError(UserError, ValueError):
    """A config value is invalid; the message names the option."""


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be used: missing, truncated, foreign, or made by another method's config."""


def innermost_reason(error: BaseException) -> str:
    """The message that says what is wrong, out of an error jsonargparse wrapped in its Union reports.

    A dataclass's ``__post_init__`` check (``mining.pool_size must be ...``) reaches the user inside one
    "Does not validate against any of the Union subtypes" report per enclosing optional type, with the
    reason tens of lines down. The reason is the first exception down the ``__cause__`` chain that is not
    such a report; where the chain is cut, the first line of the reports that is not about the report.
    """
    e: BaseException | None = error
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if not is_union_report(e):
            return str(e).strip()
        e = e.__cause__
    for line in str(error).splitlines():
        text = line.strip().removeprefix("- ").strip()
        if text and not text.startswith(_REPORT_LINES):
            return text
    return str(error)


def is_union_report(error: BaseException) -> bool:
    """Whether ``error`` is jsonargparse's Union report (see :func:`innermost_reason`)."""
    return str(error).startswith(_UNION)


class Interrupted(UserError):
    """A signal (SIGTERM, SIGINT, SIGHUP) stopped the run before it finished; nothing of it is a result.

    ``misp`` exits with status ``128 + signum``, as a shell reports a process a signal ended.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
