"""structlog setup: JSON lines for operators and log shippers, readable text on a terminal.

No secret reaches a log line: every value of every line passes ``redact`` (credentials in any
URL-looking text, exception text included), and a config section is logged as its
``redacted()`` form, secret fields masked. Call sites need not remember either.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import msgspec
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}  # fmt: skip


MASK = "***"
# scheme://userinfo@ : userinfo runs to the authority's last "@" (an unescaped "@" in a password)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s\"'<>]*@")
# ?password=... and the like in a query string (Redis and HTTP clients read them)
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&;](?:password|passwd|pass|pwd|secret|token|access_token|api_key|apikey|key|"
    r"auth|sig|signature)=)[^&#\s\"'<>]+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with the credentials of every URL in it (userinfo, secret query values)
    replaced by ``***``: ``redis://:pw@host`` becomes ``redis://***@host``."""
    if "@" in text:
        text = _USERINFO.sub(rf"\g<scheme>{MASK}@", text)
    if "=" in text:
        text = _QUERY_SECRET.sub(rf"\g<key>{MASK}", text)
    return text


def redacted(value: Any) -> Any:
    """``value`` made safe to log: strings through ``redact``, containers item by item, a
    config section as its ``redacted()`` form, anything else as its (redacted) text."""
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {redacted(k): redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redacted(item) for item in value]
    masked = getattr(value, "redacted", None)
    if callable(masked):
        return redacted(masked())
    if isinstance(value, msgspec.Struct):  # field by field: a config inside is masked too
        return {name: redacted(getattr(value, name)) for name in value.__struct_fields__}
    return redact(str(value))


def _redact_line(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> dict[str, Any]:
    """The structlog processor: every field of the line through ``redacted``."""
    return {key: redacted(value) for key, value in event.items()}


def _json_dumps(obj: Any, **_: Any) -> str:
    return msgspec.json.encode(obj, enc_hook=str).decode()


_threshold = logging.INFO  # the lowest level logged; a reload changes it (``set_level``)


def set_level(level: str) -> None:
    global _threshold
    _threshold = _LEVELS[level]


class _Logger(structlog.BoundLoggerBase):
    """structlog's bound logger, with a level a reload can change for every logger, bound and
    cached ones included. A call below it is one comparison: structlog's filtering loggers
    bake their level in, and a dropping processor costs ~2 µs a call (18 times as much)."""

    def _at(self, level: int, method: str, event: str, kw: dict[str, Any]) -> Any:
        if level < _threshold:
            return None
        return self._proxy_to_logger(method, event, **kw)

    def debug(self, event: str, **kw: Any) -> Any:
        return self._at(logging.DEBUG, "debug", event, kw)

    def info(self, event: str, **kw: Any) -> Any:
        return self._at(logging.INFO, "info", event, kw)

    def warning(self, event: str, **kw: Any) -> Any:
        return self._at(logging.WARNING, "warning", event, kw)

    def error(self, event: str, **kw: Any) -> Any:
        return self._at(logging.ERROR, "error", event, kw)

    def exception(self, event: str, **kw: Any) -> Any:
        kw.setdefault("exc_info", True)
        return self._at(logging.ERROR, "error", event, kw)


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog once for the process; ``fmt`` is ``auto``, ``json`` or ``console``."""
    set_level(level)
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer()
        if console
        else structlog.processors.JSONRenderer(_json_dumps)
    )
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            structlog.processors.format_exc_info,
            _redact_line,  # after format_exc_info: a traceback's text is redacted too
            renderer,
        ],
        wrapper_class=_Logger,
        # one write per line: processes sharing stderr (--workers) never interleave mid-line
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    _route_standard_logging(stamp, renderer)


class _LibraryHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """pushd's handler on the root logger (one, however often ``configure`` runs)."""


def _route_standard_logging(stamp: Any, renderer: Any) -> None:
    """Libraries that log with ``logging`` (httpx, coredis, hypercorn) write lines of the same
    shape through the same redaction, warnings and up only (their info is per request)."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name,
                           structlog.processors.add_log_level, stamp],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, _redact_line, renderer],
    )  # fmt: skip
    handler = _LibraryHandler(sys.stderr)  # one write per line, as structlog's
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _LibraryHandler)]
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


class ThrottledLog:
    """One warning per ``interval_s`` for a flood of the same event (bad frames, bad clocks);
    what was held back is counted in the next line."""

    def __init__(self, logger: Any, what: str, interval_s: float = 1.0) -> None:
        self._log = logger
        self._what = what
        self._interval = interval_s
        self._next_at = 0.0
        self._held = 0

    def warning(self, **fields: object) -> None:
        self._emit(self._log.warning, fields)

    def error(self, **fields: object) -> None:
        self._emit(self._log.error, fields)

    def _emit(self, write: Any, fields: dict[str, object]) -> None:
        now = time.monotonic()
        if now < self._next_at:
            self._held += 1
            return
        write(self._what, suppressed=self._held, **fields)
        self._held = 0
        self._next_at = now + self._interval


class _ToStructlog(logging.Handler):
    """Hands a standard-library log record to structlog, traceback included, so a library
    that logs through ``logging`` (hypercorn) lands in the daemon's one log stream."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    def emit(self, record: logging.LogRecord) -> None:
        log = structlog.get_logger(self._name)  # not cached: follows configure() and tests
        method = "error" if record.levelno >= logging.ERROR else "warning"
        getattr(log, method)(record.getMessage(), exc_info=record.exc_info or False)


def stdlib_logger(name: str, level: int = logging.WARNING) -> logging.Logger:
    """A standard-library logger whose records at ``level`` and above go to structlog."""
    logger = logging.getLogger(name)
    logger.handlers = [_ToStructlog(name)]
    logger.setLevel(level)
    logger.propagate = False
    return logger
