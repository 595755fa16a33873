"""Keep credentials out of the server's logs: uvicorn logs each request's path with its query string.

A browser's WebSocket cannot send headers, so a key may arrive as ``?api_key=``; the filter below rewrites
such values (and other credential-looking parameters) to ``[redacted]`` before any handler formats the line.
"""

from __future__ import annotations

import logging
import re

_CREDENTIAL = re.compile(r"(?i)([?&](?:api_key|apikey|key|token|access_token|password)=)[^&\s\"]*")
LOGGERS = ("uvicorn.access", "uvicorn.error")  # HTTP requests; WebSocket handshakes ("uvicorn.error")


def redact(text: str) -> str:
    """``text`` with the values of credential query parameters replaced."""
    return _CREDENTIAL.sub(r"\1[redacted]", text)


class RedactCredentials(logging.Filter):
    """Rewrites a record's message and string arguments; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


def install() -> None:
    """Add the filter to uvicorn's loggers once (called at start-up, after uvicorn configured logging)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactCredentials) for f in logger.filters):
            logger.addFilter(RedactCredentials())
