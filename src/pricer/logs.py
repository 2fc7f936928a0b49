"""Structured logs: one logfmt line per event (`level=WARNING msg="Rate limit exceeded" client_id=...`).

Messages the runbook greps for are constants here; secrets are never passed to a log call.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any

AUTHENTICATION_ERROR = "Authentication error"
RATE_LIMIT_EXCEEDED = "Rate limit exceeded"
BACKEND_SERVICE_ERROR = "Backend service error"
VALIDATION_ERROR = "Validation error"
SLOW_REQUEST = "Slow request"
CLIENT_DISCONNECTED = "Client disconnected"
BODY_TIMED_OUT = "Request body timed out"

FIELDS_ATTR = "logfmt_fields"


# Every character that could end or forge a line, or hide text on a terminal, is written as an escape: the
# C0 controls (\r above all: a raw one lets a client's value overwrite or fake a line), DEL, the C1 controls
# and Unicode's line and paragraph separators. One event is always one line.
_ESCAPES = {
    **{code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))},
    **{code: f"\\u{code:04x}" for code in (0x2028, 0x2029)},
    ord("\\"): "\\\\",
    ord('"'): '\\"',
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}


def escape(text: str) -> str:
    """The text as it goes between a logfmt value's quotes: backslash, quote and controls escaped."""
    return text.translate(_ESCAPES)


def _quote(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    text = str(value)
    if text and text.isascii() and all(ch.isalnum() or ch in "-_.:/" for ch in text):
        return text
    return f'"{escape(text)}"'


# Credentials that a client may put where they do not belong (say, a key as a field name) and that an
# error message would then repeat: masked in every line, whatever logged it.
_SECRETS = re.compile(
    r"(bre_[a-z0-9]{8,16}_)[A-Za-z0-9]{32,64}|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"
)


def redact(text: str) -> str:
    return _SECRETS.sub(lambda match: (match.group(1) or "") + "[REDACTED]", text)


class LogfmtFormatter(logging.Formatter):
    # Names whose values are always quoted, as the runbook's LogQL patterns expect (client_id="x").
    _ALWAYS_QUOTED = frozenset({"client_id", "endpoint", "msg"})

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        # `level=... msg="..."` first and adjacent: the runbook's LogQL patterns match on that text.
        parts = [
            f"level={record.levelname}",
            "msg=" + _always_quoted(record.getMessage()),
        ]
        fields: Mapping[str, Any] = getattr(record, FIELDS_ATTR, None) or {}
        for name, value in fields.items():
            if value is None:
                continue
            rendered = _always_quoted(value) if name in self._ALWAYS_QUOTED else _quote(value)
            parts.append(f"{name}={rendered}")
        parts.append(f"logger={record.name}")
        parts.append(f"ts={stamp}.{int(record.msecs):03d}Z")
        if record.exc_info:
            parts.append("exc=" + _always_quoted(self.formatException(record.exc_info)))
        return redact(" ".join(parts))


def _always_quoted(value: object) -> str:
    return f'"{escape(str(value))}"'


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a log call: `log.warning(VALIDATION_ERROR, extra=fields(client_id=...))`."""
    return {FIELDS_ATTR: values}


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # uvicorn's own access log is replaced by the engine's request logging.
    logging.getLogger("uvicorn.access").disabled = True


class LineBudget:
    """At most `per_second` log lines of each kind in each second of the clock. A failure repeated at
    hundreds of requests a second (a flood of bad keys, a database down) must not write a line each: the
    next line let through says how many of its kind were left out (`suppressed=N`)."""

    def __init__(self, per_second: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_second = per_second
        self._clock = clock
        # kind -> [second, lines written in it, lines left out since the last one written]
        self._kinds: dict[Hashable, list[int]] = {}

    def take(self, kind: Hashable = None) -> int | None:
        """None: leave this line out; else write it, saying how many of its kind were left out before."""
        second = int(self._clock())
        state = self._kinds.get(kind)
        if state is None:
            state = self._kinds[kind] = [second, 0, 0]
        elif state[0] != second:
            state[0], state[1] = second, 0
        if state[1] >= self._per_second:
            state[2] += 1
            return None
        state[1] += 1
        suppressed, state[2] = state[2], 0
        return suppressed
