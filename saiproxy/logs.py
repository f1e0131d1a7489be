"""Logging: JSON or text lines tagged with the request ID, off the event loop.

Records go through a :class:`QueueHandler` on the root logger; a listener
thread writes them to stdout and to a rotating file whose name is unique per
process, so replicas sharing a directory never rotate each other's file.
Tagging and masking happen in the emitting thread, where the request's
context variable is still visible.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import re
import socket
import sys
from collections.abc import Iterable
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Final

from pythonjsonlogger.json import JsonFormatter

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

_STANDARD_ATTRS: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

# Header-like "name: value" or "name=value" pairs whose value is a credential.
_SENSITIVE: Final = re.compile(
    r"(?i)\b(authorization|x-api-key|cookie|user[_-]api[_-]key)([\"']?\s*[:=]\s*[\"']?)"
    r"([^\"'\n,}]+)"
)
MASK: Final = "***"


def log_file_name() -> str:
    """Return this process's log file name: host and pid make it unique."""
    return f"saiproxy-{socket.gethostname()}-{os.getpid()}.log"


class RequestContextFilter(logging.Filter):
    """Add ``request_id`` and the ``[id]`` message prefix; mask secrets."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # Longest first, so a secret containing another is masked whole.
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        message = record.getMessage()
        if request_id:
            record.request_id = request_id
            tag = f"[{request_id}] "
            if not message.startswith(tag):
                message = tag + message
        record.msg = self.mask(message)
        record.args = None
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                record.__dict__[key] = self.mask(value)
        return True

    def mask(self, text: str) -> str:
        """Return ``text`` with credential values replaced by ``***``."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        if _SENSITIVE.search(text):
            text = _SENSITIVE.sub(lambda m: f"{m[1]}{m[2]}{MASK}", text)
        return text


class TextFormatter(logging.Formatter):
    """Plain lines: time, level, logger, message, then the structured fields as k=v."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(
            f"{key}={value}" for key, value in record.__dict__.items() if key not in _STANDARD_ATTRS
        )
        return f"{line} {fields}" if fields else line


def make_formatter(fmt: str) -> logging.Formatter:
    """Return the JSON (default) or text formatter."""
    if fmt == "text":
        return TextFormatter()
    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        json_ensure_ascii=False,
        json_default=str,
    )


class LogSetup:
    """Root logging for one process: a queue handler and its listener thread."""

    def __init__(
        self,
        *,
        fmt: str,
        level: int,
        log_dir: str | None,
        max_bytes: int,
        backups: int,
        secrets: Iterable[str] = (),
        stream: Any = None,
    ) -> None:
        formatter = make_formatter(fmt)
        handlers: list[logging.Handler] = [logging.StreamHandler(stream or sys.stdout)]
        self.path: Path | None = None
        if log_dir:
            directory = Path(log_dir)
            directory.mkdir(parents=True, exist_ok=True)
            self.path = directory / log_file_name()
            handlers.append(
                logging.handlers.RotatingFileHandler(
                    self.path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
                )
            )
        for handler in handlers:
            handler.setFormatter(formatter)
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._handler = logging.handlers.QueueHandler(self._queue)
        self._handler.addFilter(RequestContextFilter(secrets))
        self._listener = logging.handlers.QueueListener(
            self._queue, *handlers, respect_handler_level=False
        )
        self._handlers = handlers
        self._level = level
        self._previous_level = logging.root.level

    def start(self) -> None:
        """Attach the queue handler to the root logger and start the writer thread."""
        self._listener.start()
        logging.root.addHandler(self._handler)
        logging.root.setLevel(self._level)
        # aiohttp's own loggers stay at WARNING unless we are verbose.
        logging.getLogger("aiohttp").setLevel(
            logging.DEBUG if self._level <= logging.DEBUG else logging.WARNING
        )
        logging.getLogger("aiohttp.access").setLevel(self._level)

    def stop(self) -> None:
        """Detach, flush every queued record, and close the outputs."""
        logging.root.removeHandler(self._handler)
        logging.root.setLevel(self._previous_level)
        self._listener.stop()
        for handler in self._handlers:
            handler.close()
