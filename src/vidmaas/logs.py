"""Logging for every vidmaas role: JSON lines in production, readable text otherwise.

Guarantees:
- :func:`configure_logging` is the only place that installs handlers; it is
  idempotent (calling it again replaces its own handler, never stacks a second
  one) and leaves handlers it did not install alone. Nothing happens at import.
- Every line carries ``task_id``: set by :class:`TaskLog` (the one way code logs a
  line about a task: ``tlog.info(task_id, "launched %s", job)`` writes ``task <id>:
  launched …`` with the record's ``task_id`` set), else from the context variable
  :data:`task_id_var` (set it with :func:`bind_task_id` around the work for one
  task), else ``null``/``-``.
- A JSON line is one object with ``ts`` (UTC, ISO 8601, milliseconds), ``level``,
  ``logger``, ``message``, ``task_id``, ``exc`` (the traceback text, when there is
  one) and any other ``extra`` fields that JSON can hold (others are ``repr``-ed).
- Secrets never reach the output: API keys (``vmk_…``), webhook endpoint secrets
  (``whsec_…``, e.g. in the SQL parameters a database driver logs at DEBUG),
  ``Authorization`` header values and bearer tokens, passwords inside URLs
  (``redis://:secret@host``) and credentials in query strings (``?token=…``,
  presigned-URL signatures) are redacted from the message, the traceback and the
  extra fields by :class:`RedactingFilter` and again by the formatters.
- Uvicorn's loggers are routed through the same handler, so access and error
  lines get the same format.
"""

from __future__ import annotations

import contextlib
import json as jsonlib
import logging
import re
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Final, TextIO

task_id_var: ContextVar[str | None] = ContextVar("vidmaas_task_id", default=None)
"""The task the current context works on; read by every formatter."""

REDACTED: Final = "[redacted]"

_SECRET_PATTERNS: Final[tuple[tuple[re.Pattern[str], str], ...]] = (
    # Authorization / Proxy-Authorization header values, in "k: v", "k=v", dict or JSON form.
    (re.compile(r"""(?i)((?:proxy-)?authorization['"]?\s*[:=]\s*['"]?)[^'",}\r\n]+"""),
     r"\1" + REDACTED),
    # Bare bearer/basic tokens wherever they appear.
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 " + REDACTED),
    # vidmaas API keys.
    (re.compile(r"\bvmk_[A-Za-z0-9_-]+"), "vmk_" + REDACTED),
    # Webhook endpoint signing secrets (base64, Standard Webhooks form).
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=_-]+"), "whsec_" + REDACTED),
    # Credentials in query strings (the short-lived stream tokens of WebSocket/SSE URLs
    # end up in access logs).
    (re.compile(r"(?i)([?&](?:token|access_token|api_key|apikey|key|signature|"
                r"x-amz-signature|x-amz-credential)=)[^&\s\"']+"), r"\1" + REDACTED),
    # Passwords in URLs: scheme://user:password@host or scheme://:password@host.
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@/\s]+@"), r"\1" + REDACTED + "@"),
)

_STANDARD_ATTRS: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "task_id", "taskName"}
)
_HANDLER_MARK: Final = "_vidmaas_handler"
_UVICORN_LOGGERS: Final = ("uvicorn", "uvicorn.error", "uvicorn.access")


def redact(text: str) -> str:
    """``text`` with anything that looks like a secret replaced by ``[redacted]``."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


@contextlib.contextmanager
def bind_task_id(task_id: str | None) -> Iterator[None]:
    """Within this block (and tasks it starts), log lines carry ``task_id``."""
    token = task_id_var.set(task_id)
    try:
        yield
    finally:
        task_id_var.reset(token)


class TaskLog:
    """Lines about one task: the message gets a ``task <id>: `` prefix and the record
    its ``task_id``, so every line about a task is found by grepping either."""

    __slots__ = ("_log",)

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger

    def _emit(self, level: int, task_id: str | None, msg: str, args: tuple[object, ...],
              exc_info: bool) -> None:
        if not self._log.isEnabledFor(level):
            return
        if task_id is not None:
            msg, args = "task %s: " + msg, (task_id, *args)
        self._log.log(level, msg, *args, exc_info=exc_info, extra={"task_id": task_id},
                      stacklevel=3)

    def debug(self, task_id: str | None, msg: str, *args: object) -> None:
        self._emit(logging.DEBUG, task_id, msg, args, False)

    def info(self, task_id: str | None, msg: str, *args: object) -> None:
        self._emit(logging.INFO, task_id, msg, args, False)

    def warning(self, task_id: str | None, msg: str, *args: object) -> None:
        self._emit(logging.WARNING, task_id, msg, args, False)

    def error(self, task_id: str | None, msg: str, *args: object) -> None:
        self._emit(logging.ERROR, task_id, msg, args, False)

    def exception(self, task_id: str | None, msg: str, *args: object) -> None:
        """An error line with the current exception's traceback."""
        self._emit(logging.ERROR, task_id, msg, args, True)


def _task_id(record: logging.LogRecord) -> str | None:
    explicit = record.__dict__.get("task_id")
    if explicit is not None:
        return str(explicit)
    return task_id_var.get()


class RedactingFilter(logging.Filter):
    """Rewrites a record so that its message, traceback and extras hold no secrets.

    The message is formatted once (``msg % args``) and redacted; the traceback is
    rendered into ``exc_text`` and redacted, so later formatters reuse it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                record.__dict__[key] = redact(value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; see the module docstring for the fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "task_id": _task_id(record),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_") and key not in entry:
                entry[key] = value if _json_safe(value) else repr(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return redact(jsonlib.dumps(entry, ensure_ascii=False, default=repr))


class TextFormatter(logging.Formatter):
    """``2026-01-01T12:00:00.000Z INFO  vidmaas.dispatcher [task=…] message``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(name)s [task=%(task_id)s] %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return (datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
                .replace("+00:00", "Z"))

    def format(self, record: logging.LogRecord) -> str:
        record.task_id = _task_id(record) or "-"
        return redact(super().format(record))


def _json_safe(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool | list | dict)


def configure_logging(*, level: str, json: bool, stream: TextIO | None = None) -> logging.Handler:
    """Install vidmaas's handler on the root logger (replacing one installed earlier).

    ``level`` is a level name (``DEBUG``, ``info``, …); ``json`` picks JSON lines
    over text; ``stream`` defaults to ``sys.stderr``. Returns the handler, so
    tests (and the embedded ``vidmaas up``) can inspect or remove it."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")

    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    handler.addFilter(RedactingFilter())
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)

    for name in _UVICORN_LOGGERS:
        # uvicorn's own configuration (or an earlier server in this process) may have
        # given these loggers handlers, a level or propagate=False: route them to ours.
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.setLevel(logging.NOTSET)
        logger.disabled = False
        logger.propagate = True
    return handler
