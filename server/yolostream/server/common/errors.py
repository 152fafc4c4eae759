"""The one exception base for mistakes a user can fix, and a safe way to quote what a client sent.

``UserError`` marks a failure caused by the input (a refused checkpoint, a bad config, an unknown layer), as opposed
to a bug. The ``yolostream`` command prints it as one line and exits 2; a server turns it into INVALID_ARGUMENT. It
subclasses ValueError so that every caller that already handles ValueError keeps working.

``quote`` exists because error texts travel back to clients in gRPC trailers, which have a hard size limit: an
error that echoes a multi-kilobyte layer name whole reaches the client as RESOURCE_EXHAUSTED instead of the real
error, and a log line that echoes it lets any client fill the log. Every message that repeats client-sent text
goes through it.

``UnparsableRequestFilter`` keeps a client that sends bytes which do not parse as our messages from writing a
multi-line traceback into the server log per call: it is the client's mistake, worth one line.

This module imports neither torch nor grpc, so the command line, the client-facing front end and the tests can
all use it.
"""

from __future__ import annotations

import logging

#: Longest client-sent text a message repeats, in characters (before ``repr`` escaping).
QUOTE_LIMIT = 64


class UserError(ValueError):
    """A failure the user can fix from its message alone; shown without a traceback."""


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr`` of ``str(value)`` cut to ``limit`` characters, saying how much was cut.

    The repr keeps control characters and newlines of hostile input from breaking a one-line message or a log
    line; the cut keeps the message small whatever was sent.
    """
    if limit < 1:
        raise ValueError(f"quote limit must be at least 1, got {limit}")
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text):,} characters)"


def one_line(text: str, limit: int = 2000) -> str:
    """``text`` on a single line of at most about ``limit`` characters, for messages built from long details.

    Library errors (torch's zip reader, OpenCV) may span lines; the command line promises one line per error.
    """
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else f"{flat[:limit]}… ({len(flat):,} characters)"


#: The logger grpc.aio reports exceptions of servicer calls to (among them requests that do not parse).
GRPC_AIO_LOGGER = "grpc._cython.cygrpc"


class UnparsableRequestFilter(logging.Filter):
    """Turns grpc.aio's ERROR-with-traceback for a request that does not parse into one WARNING line.

    grpc answers such a call UNKNOWN by itself; the traceback it logs shows only grpc's and protobuf's frames,
    and any client could fill the log with them. Install with
    ``logging.getLogger(GRPC_AIO_LOGGER).addFilter(UnparsableRequestFilter())``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and type(error).__name__ == "DecodeError":
            original = record.getMessage()
            record.msg = "a client sent a request that does not parse (%s): %s"
            record.args = (original, one_line(str(error), 200))
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True
