"""Logging: JSON or text lines tagged with the request ID, off the event loop.

Records go through a :class:`QueueHandler` on the root logger; a listener
thread writes them to stdout and to a rotating file whose name is unique per
process, so replicas sharing a directory never rotate each other's file.
Tagging and masking happen in the emitting thread, where the request's
context variable is still visible.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import queue
import re
import socket
import sys
import threading
import time
from collections.abc import Iterable
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Final, TextIO

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


def event(logger: logging.Logger, message: str, fields: dict[str, Any]) -> None:
    """Log an INFO lifecycle line: ``logger.info(message, extra=fields)``, minus the caller lookup.

    These lines are on every request's path; the caller's file and line are
    never written out, so they are not looked up.
    """
    if logger.isEnabledFor(logging.INFO):
        record = logging.LogRecord(logger.name, logging.INFO, "", 0, message, None, None)
        # Our own field names never clash with LogRecord's, so makeRecord's
        # per-key clash check is skipped.
        record.__dict__.update(fields)
        logger.handle(record)


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
        # A credential header needs ":" or "="; most values have neither.
        if (":" in text or "=" in text) and _SENSITIVE.search(text):
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


class _JsonFormatter(JsonFormatter):
    """python-json-logger's formatter and serialiser, with a lean field merge.

    The fields are always the same: time, level, logger, message, then the
    record's own extras (request_id among them). Building that dict directly
    takes half the time of the generic merge, and the time text is made once
    per second.
    """

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS:
                data[key] = value
        if record.exc_text:
            data["exc_info"] = record.exc_text
        if record.stack_info:
            data["stack_info"] = self.formatStack(record.stack_info)
        return self.jsonify_log_record(data)

    _second: int = -1
    _stamp: str = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            # The writer thread is the only caller, so no lock is needed.
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"


def make_formatter(fmt: str) -> logging.Formatter:
    """Return the JSON (default) or text formatter."""
    if fmt == "text":
        return TextFormatter()
    return _JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        json_serializer=_serialise,
    )


_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, default=str)


def _serialise(data: Any, **_: Any) -> str:
    """Serialise a log line with one encoder made once (json.dumps makes one per call)."""
    return _ENCODER.encode(data)


class _QueueHandler(logging.handlers.QueueHandler):
    """Hand records to the writer thread, doing on the event loop only what must be done there.

    That is noting the request ID (a context variable, visible only in this
    thread) and turning a traceback into text. Tagging, masking and
    formatting happen in the writer thread: measured, work there costs the
    proxy far less throughput than the same work on the event loop.
    """

    def handle(self, record: logging.LogRecord) -> bool:
        if "request_id" not in record.__dict__:
            request_id = request_id_var.get()
            if request_id is not None:
                record.request_id = request_id
        if record.exc_info:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = None
        self.queue.put_nowait(record)
        return True


_TRACEBACKS: Final = logging.Formatter()


class _RotatingFile(logging.handlers.RotatingFileHandler):
    """A rotating file written a batch of lines at a time."""

    def write_lines(self, lines: list[str]) -> None:
        if self.stream is None:
            self.stream = self._open()
        size = self.stream.tell()
        pending: list[str] = []
        for line in lines:
            length = len(line) + 1
            if self.maxBytes and size and size + length > self.maxBytes:
                self.stream.write("".join(pending))
                pending.clear()
                self.doRollover()
                self.stream = self.stream or self._open()
                size = 0
            pending.append(line + "\n")
            size += length
        self.stream.write("".join(pending))
        self.stream.flush()


class _Writer(threading.Thread):
    """Formats and writes queued records in batches, off the event loop."""

    BATCH: Final = 4096
    GATHER: Final = 0.05  # seconds a line may wait for company

    def __init__(
        self,
        records: queue.SimpleQueue[logging.LogRecord | None],
        context: RequestContextFilter,
        formatter: logging.Formatter,
        stream: TextIO,
        file: _RotatingFile | None,
    ) -> None:
        super().__init__(name="saiproxy-log-writer", daemon=True)
        self._records = records
        self._context = context
        self._formatter = formatter
        self._stream = stream
        self._file = file

    def run(self) -> None:
        records = self._records
        while True:
            batch = [records.get()]
            # Let a batch gather: each wake-up competes with the event loop for
            # the GIL, so fewer, larger writes cost the proxy far less.
            time.sleep(self.GATHER)
            while len(batch) < self.BATCH:
                try:
                    batch.append(records.get_nowait())
                except queue.Empty:
                    break
            lines = [self._format(record) for record in batch if record is not None]
            if lines:
                self._write(lines)
            if any(record is None for record in batch):
                return

    def _format(self, record: logging.LogRecord) -> str:
        try:
            self._context.filter(record)
            return self._formatter.format(record)
        except Exception as exc:  # a bad record must not stop the writer
            return f"unformattable log record from {record.name}: {type(exc).__name__}"

    def _write(self, lines: list[str]) -> None:
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stdout went away; the file still gets the lines
        if self._file is not None:
            try:
                self._file.write_lines(lines)
            except OSError as exc:
                print(f"saiproxy: cannot write the log file: {exc.strerror}", file=sys.stderr)


class LogSetup:
    """Root logging for one process: a queue handler and its writer thread."""

    def __init__(
        self,
        *,
        fmt: str,
        level: int,
        log_dir: str | None,
        max_bytes: int,
        backups: int,
        secrets: Iterable[str] = (),
        stream: TextIO | None = None,
    ) -> None:
        self.path: Path | None = None
        file = None
        if log_dir:
            directory = Path(log_dir)
            directory.mkdir(parents=True, exist_ok=True)
            self.path = directory / log_file_name()
            file = _RotatingFile(self.path, maxBytes=max_bytes, backupCount=backups,
                                 encoding="utf-8", delay=True)  # fmt: skip
        self._file = file
        self._queue: queue.SimpleQueue[logging.LogRecord | None] = queue.SimpleQueue()
        self._handler = _QueueHandler(self._queue)
        self._writer = _Writer(
            self._queue, RequestContextFilter(secrets), make_formatter(fmt), stream or sys.stdout,
            file,
        )  # fmt: skip
        self._level = level
        self._previous_level = logging.root.level

    def start(self) -> None:
        """Attach the queue handler to the root logger and start the writer thread."""
        # Thread and process names are never written out: skip collecting them.
        logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
        self._writer.start()
        logging.root.addHandler(self._handler)
        logging.root.setLevel(self._level)
        # aiohttp's own loggers stay at WARNING unless we are verbose.
        logging.getLogger("aiohttp").setLevel(
            logging.DEBUG if self._level <= logging.DEBUG else logging.WARNING
        )
        logging.getLogger("aiohttp.access").setLevel(self._level)

    def stop(self) -> None:
        """Detach, write every queued record, and close the file."""
        logging.root.removeHandler(self._handler)
        logging.root.setLevel(self._previous_level)
        self._queue.put(None)
        self._writer.join()
        if self._file is not None:
            self._file.close()
