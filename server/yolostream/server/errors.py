"""User errors, and quoting what a client or user sent without echoing it whole.

A ``UserError`` is a problem the user can fix (a bad flag, an unreadable or refused checkpoint): the CLI prints
its one line and exits 2. ``quote`` bounds any client-supplied text placed in a message: gRPC carries status
details in a header, so an unbounded echo would turn a clear INVALID_ARGUMENT into RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

#: Characters of client-supplied text quoted in an error or log message.
QUOTE_LIMIT = 64


class UserError(ValueError):
    """A problem with what the user asked for; its text is one line that says what to do."""


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr`` of ``value`` cut to ``limit`` characters, saying how long the original was when cut."""
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text):,} characters)"
