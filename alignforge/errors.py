"""Errors a user can fix, and how the command line shows them.

Every error a user can cause (a bad config key or value, a malformed data row, a missing file or
model, an endpoint that does not answer, a stopped run) derives from :class:`UserError`. Its
message is one or two lines that name the file, row or field and say what to do. ``alignforge``
prints that message and exits with ``exit_code``; ``alignforge --debug ...`` or
``ALIGNFORGE_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import os


class UserError(Exception):
    """Something the user can fix; the message names the file, row or field and what to do."""

    exit_code = 2


def debugging() -> bool:
    """Whether errors should show their traceback (``--debug`` sets ``ALIGNFORGE_DEBUG=1``)."""
    return os.environ.get("ALIGNFORGE_DEBUG", "").lower() not in ("", "0", "false", "no")


def describe(err: BaseException) -> tuple[str, int] | None:
    """``(message, exit code)`` of an error a user caused, or None for a bug (shown in full).

    Besides :class:`UserError`, an operating-system error about a named path (a missing or
    unreadable file, a directory where a file was expected) is the user's to fix.
    """
    if isinstance(err, UserError):
        return str(err), err.exit_code
    if isinstance(err, OSError) and err.filename is not None:
        what = err.strerror or type(err).__name__
        return f"{err.filename}: {what.lower()}; check the path", 2
    return None
