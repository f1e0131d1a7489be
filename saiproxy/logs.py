"""Logging: JSON or text lines tagged with the request ID, off the event loop.

A queue handler on the root logger notes each record's request ID (a
context variable, visible only where the record is logged) and formats
records a batch at a time on the event loop; a writer thread writes the lines
to stdout and to a rotating file whose name is unique per process, so
replicas sharing a directory never rotate each other's file.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
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
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Final, NamedTuple, Protocol, TextIO, runtime_checkable

from pythonjsonlogger.json import JsonFormatter

from .settings import SettingsError

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)

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
_MASK_CACHE_LIMIT: Final = 4096

# A text field longer than this is cut, with a marker saying how much went: a
# client must not be able to write megabytes per line (and so rotate every
# file away) through a path, a model name or any other string it sends.
FIELD_LIMIT: Final = 512
_CONTAINER_LIMIT: Final = 64  # items of a list or dict field kept in a line


def bound(text: str, limit: int = FIELD_LIMIT) -> str:
    """Return ``text`` cut to ``limit`` characters, with a marker when cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more chars]"


_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(char: str) -> str:
    known = _ESCAPES.get(char)
    if known is not None:
        return known
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """Return ``text`` with every non-printable character escaped (``\\n``, ``\\x1b``).

    Text lines are read by people in terminals: a raw newline would forge a
    line, an escape sequence would drive the terminal.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape_char(char) for char in text)


def _bound_value(value: Any) -> Any:
    """Return a list or dict field with its strings and its length bounded."""
    if isinstance(value, str):
        return bound(value)
    if isinstance(value, dict):
        items = list(value.items())
        bounded: Any = {
            bound(str(key)): _bound_value(item) for key, item in items[:_CONTAINER_LIMIT]
        }
        if len(items) > _CONTAINER_LIMIT:
            bounded["..."] = f"{len(items) - _CONTAINER_LIMIT} more items"
        return bounded
    if isinstance(value, (list, tuple)):
        bounded = [_bound_value(item) for item in value[:_CONTAINER_LIMIT]]
        if len(value) > _CONTAINER_LIMIT:
            bounded.append(f"...[{len(value) - _CONTAINER_LIMIT} more items]")
        return bounded
    return value


def event(logger: logging.Logger, message: str, fields: dict[str, Any]) -> None:
    """Log an INFO lifecycle line like ``logger.info(message, extra=fields)``, far cheaper.

    These lines are on every request's path. With the process's batching
    handler running, only the parts are noted (the time and the request ID
    included) and the line is made in the next batch, so ``fields`` must not
    change afterwards; the caller's file and line are never written out, so
    they are never looked up.
    """
    if logger.isEnabledFor(logging.INFO):
        batcher = _batcher
        if batcher is not None and batcher.defer(logger, message, fields):
            return
        logger.handle(_lifecycle_record(logger, message, fields))


def _lifecycle_record(
    logger: logging.Logger, message: str, fields: dict[str, Any], created: float | None = None
) -> logging.LogRecord:
    record = logging.LogRecord(logger.name, logging.INFO, "", 0, message, None, None)
    if created is not None:
        record.created = created
        record.msecs = int((created - int(created)) * 1000) + 0.0
    # Our own field names never clash with LogRecord's, so makeRecord's
    # per-key clash check is skipped.
    record.__dict__.update(fields)
    return record


def log_file_name() -> str:
    """Return this process's log file name: host and pid make it unique."""
    return f"saiproxy-{socket.gethostname()}-{os.getpid()}.log"


class RequestContextFilter(logging.Filter):
    """Add ``request_id`` and the ``[id]`` message prefix; mask secrets."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # Longest first, so a secret containing another is masked whole.
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)
        self._masked: dict[str, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        self.tag(record)
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                record.__dict__[key] = self.mask(value)
        return True

    def tag(self, record: logging.LogRecord) -> None:
        """Add ``request_id`` and the ``[id]`` prefix, and mask the message (not the fields)."""
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        message = record.getMessage()
        if request_id:
            record.request_id = request_id
            tag = f"[{request_id}] "
            if not message.startswith(tag):
                message = tag + message
        record.msg = self.mask(message)
        record.args = None

    def mask(self, text: str) -> str:
        """Return ``text`` with credential values replaced by ``***``."""
        # Short field values repeat line after line ("ok", "SAI_KEY", paths, models).
        # Unique ones (request IDs, messages) fill the cache too: a full cache
        # starts afresh, and the values that repeat are back within a few lines.
        masked = self._masked.get(text)
        if masked is None:
            masked = self._mask(text)
            if len(text) <= 64:
                if len(self._masked) >= _MASK_CACHE_LIMIT:
                    self._masked.clear()
                self._masked[text] = masked
        return masked

    def _mask(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        # A credential header needs ":" or "="; most values have neither.
        if (":" in text or "=" in text) and _SENSITIVE.search(text):
            text = _SENSITIVE.sub(lambda m: f"{m[1]}{m[2]}{MASK}", text)
        return text


def _unmasked(text: str) -> str:
    return text


class _Clock:
    """Log time text, ``2026-11-26 21:04:51,123``, with the seconds part made once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._stamp = ""

    def text(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            # Racing threads at worst both make the same text: no lock needed.
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = second
        return f"{self._stamp},{int((created - second) * 1000):03d}"


class TextFormatter(logging.Formatter):
    """Plain lines: time, level, logger, message, then the structured fields as k=v.

    ``mask`` is applied to every text field on its way out; then every field
    and the message are bounded (:data:`FIELD_LIMIT`) and their control
    characters escaped, so one record is always one line.
    """

    def __init__(self, mask: Callable[[str], str] = _unmasked) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self.mask = mask
        self._clock = _Clock()

    def format_event(self, name: str, message: str, created: float, fields: dict[str, Any]) -> str:
        """Format an INFO lifecycle line without a LogRecord (see :func:`event`)."""
        message = escape_controls(bound(message))
        return f"{self._clock.text(created)} INFO {name} {message} {self._pairs(fields.items())}"

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        record.message = escape_controls(bound(message))
        try:
            return super().formatMessage(record)
        finally:
            record.message = message

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = self._pairs(_extras(record))
        return f"{line} {fields}" if fields else line

    def _pairs(self, items: Iterable[tuple[str, Any]]) -> str:
        mask = self.mask
        return " ".join(
            f"{key}={escape_controls(bound(mask(value) if isinstance(value, str) else str(value)))}"
            for key, value in items
        )


def _extras(record: logging.LogRecord) -> Iterator[tuple[str, Any]]:
    """Yield a record's own fields: what ``extra=`` and saiproxy added to it."""
    return ((key, value) for key, value in record.__dict__.items() if key not in _STANDARD_ATTRS)


class _JsonFormatter(JsonFormatter):
    """python-json-logger's formatter and serialiser, with a lean field merge.

    The fields are always the same: time, level, logger, message, then the
    record's own extras (request_id among them), text ones masked with
    ``mask`` and bounded (:data:`FIELD_LIMIT`; JSON escapes control characters).
    Building that dict directly takes half the time of the generic
    merge, and the time text is made once per second.
    """

    def __init__(self, mask: Callable[[str], str] = _unmasked, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mask = mask
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        data = self._data(
            record.created, record.levelname, record.name, record.getMessage(), _extras(record)
        )
        if record.exc_text:  # made (and masked) by the handler
            data["exc_info"] = record.exc_text
        if record.stack_info:
            data["stack_info"] = self.formatStack(record.stack_info)
        return self.jsonify_log_record(data)

    def format_event(self, name: str, message: str, created: float, fields: dict[str, Any]) -> str:
        """Format an INFO lifecycle line without a LogRecord (see :func:`event`)."""
        return self.jsonify_log_record(self._data(created, "INFO", name, message, fields.items()))

    def _data(
        self, created: float, level: str, name: str, message: str,
        fields: Iterable[tuple[str, Any]],
    ) -> dict[str, Any]:  # fmt: skip
        mask = self.mask
        data: dict[str, Any] = {
            "time": self._clock.text(created),
            "level": level,
            "logger": name,
            "message": bound(message),
        }
        for key, value in fields:
            if type(value) is str:
                value = mask(value)
                if len(value) > FIELD_LIMIT:
                    value = bound(value)
            elif isinstance(value, (list, tuple, dict)):
                value = _bound_value(value)
            data[key] = value
        return data


def make_formatter(fmt: str, mask: Callable[[str], str] = _unmasked) -> logging.Formatter:
    """Return the JSON (default) or text formatter; ``mask`` cleans every text field."""
    if fmt == "text":
        return TextFormatter(mask)
    return _JsonFormatter(
        mask,
        fmt="%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        json_serializer=serialise,
    )


_TRACEBACKS: Final = logging.Formatter()
_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, default=str)


def serialise(data: dict[str, Any], **_: Any) -> str:
    """Serialise one log line with one C encoder made once (``json.dumps`` builds one per call).

    Its ``"key": value`` spacing matters: ``grep '"request_id": "a1b2c3d4"'``
    finds a request's lines (orjson, faster, writes no spaces).
    """
    return _ENCODER.encode(data)


@runtime_checkable
class _EventFormatter(Protocol):
    def format_event(
        self, name: str, message: str, created: float, fields: dict[str, Any]
    ) -> str: ...


class _Deferred(NamedTuple):
    """A lifecycle line, noted on the hot path and made into a record in the next batch."""

    logger: logging.Logger
    message: str
    fields: dict[str, Any]
    created: float
    request_id: str | None

    def record(self) -> logging.LogRecord:
        """Return the line's record, timed and tagged as when it was noted."""
        record = _lifecycle_record(self.logger, self.message, self.fields, self.created)
        if self.request_id is not None and "request_id" not in self.fields:
            record.request_id = self.request_id
        return record


class _BatchHandler(logging.handlers.QueueHandler):
    """Format records a batch at a time on the event loop; the writer thread writes them.

    Logging a record only notes what must be noted at once (the request ID, a
    context variable; the traceback) and appends it to a list. Every
    ``GATHER`` seconds the event loop tags, masks and formats the whole list
    in one go and queues the lines for the writer thread, which only writes.
    Measured under load (bench/RESULTS.md), a line formatted on its own cost
    about 50 us of CPU (the formatting code is cold between requests), one in
    a batch about 30 us, and a writer thread with no Python work to do hardly
    competes with the loop for the GIL. Lifecycle lines (:func:`event`) are
    cheaper still, about 12 us: they become a line without a LogRecord when
    this handler is the only one on their way. Records from other threads are
    handed to the loop; without a running loop (startup, shutdown) records
    are formatted at once.
    """

    GATHER: Final = 0.05  # seconds a line may wait for company

    def __init__(
        self,
        lines: queue.SimpleQueue[list[str] | None],
        context: RequestContextFilter,
        formatter: logging.Formatter,
    ) -> None:
        super().__init__(lines)
        self._context = context
        self.setFormatter(formatter)
        self._pending: list[logging.LogRecord | _Deferred] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._flushing: list[str] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start batching on ``loop`` (the running loop, in its thread)."""
        self._loop, self._loop_thread = loop, threading.get_ident()

    def detach(self) -> None:
        """Format and queue what is pending; from now on format at once."""
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
        self._loop = self._loop_thread = None

    def handle(self, record: logging.LogRecord) -> bool:
        if self._flushing is not None and threading.get_ident() == self._loop_thread:
            self._flushing.append(self._render(record))  # a deferred line, now a record
            return True
        if "request_id" not in record.__dict__:
            request_id = request_id_var.get()
            if request_id is not None:
                record.request_id = request_id
        if self._loop is None:
            self.queue.put_nowait([self._render(record)])
            return True
        if record.exc_info:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = None
        self._add(record)
        return True

    def defer(self, logger: logging.Logger, message: str, fields: dict[str, Any]) -> bool:
        """Note a lifecycle line for the next batch; False when not batching."""
        if self._loop is None:
            return False
        self._add(_Deferred(logger, message, fields, time.time(), request_id_var.get()))
        return True

    def _add(self, item: logging.LogRecord | _Deferred) -> None:
        loop = self._loop
        if threading.get_ident() != self._loop_thread and loop is not None:
            # Only the loop's thread touches the pending list: no lock needed.
            try:
                loop.call_soon_threadsafe(self._add, item)
                return
            except RuntimeError:  # the loop is closed: write the line at once
                self._loop = None
        if loop is None or loop.is_closed():
            self._loop = None
            record = item if isinstance(item, logging.LogRecord) else item.record()
            self.queue.put_nowait([self._render(record)])
            return
        pending = self._pending
        pending.append(item)
        if len(pending) == 1:
            # In an empty context: the batch must not see the request ID of
            # whichever request happened to log its first line.
            self._timer = loop.call_later(self.GATHER, self.flush, context=contextvars.Context())

    def flush(self) -> None:
        """Format every pending record and hand the lines to the writer thread.

        The pending list belongs to the loop's thread; called from another
        (``logging.shutdown`` at exit), the flush is left to the loop.
        """
        if self._loop is not None and threading.get_ident() != self._loop_thread:
            return
        self._timer = None
        pending, self._pending = self._pending, []
        if not pending:
            return
        self._flushing = lines = []
        direct: dict[logging.Logger, bool] = {}
        try:
            for item in pending:
                if type(item) is not _Deferred:
                    lines.append(self._render(item))  # type: ignore[arg-type]
                    continue
                only_here = direct.get(item.logger)
                if only_here is None:
                    only_here = direct[item.logger] = self._only_handler_of(item.logger)
                if only_here:
                    lines.append(self._render_event(item))
                else:
                    # Through the logger, so its filters and every other handler see it too.
                    item.logger.handle(item.record())
        finally:
            self._flushing = None
        self.queue.put_nowait(lines)

    def _only_handler_of(self, logger: logging.Logger) -> bool:
        """Whether a record of ``logger`` would reach this handler, no filter, no other handler."""
        if self.level > logging.INFO or not isinstance(self.formatter, _EventFormatter):
            return False
        node: logging.Logger | None = logger
        while node is not None:
            if node.filters or (node.handlers and node.handlers != [self]):
                return False
            if node.handlers or not node.propagate:
                return node.handlers == [self]
            node = node.parent
        return False

    def _render_event(self, item: _Deferred) -> str:
        """Format a lifecycle line straight from its parts: no LogRecord on the way."""
        fields, request_id = item.fields, item.request_id
        message = item.message
        if request_id is not None and "request_id" not in fields:
            fields = {**fields, "request_id": request_id}
            message = f"[{request_id}] {message}"
        try:
            formatter: _EventFormatter = self.formatter  # type: ignore[assignment]
            return formatter.format_event(
                item.logger.name, self._context.mask(message), item.created, fields
            )
        except Exception as exc:  # a bad line must not cost the caller anything
            return f"unformattable log record from {item.logger.name}: {type(exc).__name__}"

    def _render(self, record: logging.LogRecord) -> str:
        try:
            # The request ID was noted when the record was logged; tag() falls back
            # to the context variable, which is empty in a batch (see _add).
            self._context.tag(record)  # the formatter masks the fields
            if record.exc_info and not record.exc_text:
                record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            if record.exc_text:  # an exception's text may quote anything
                record.exc_text = self._context.mask(record.exc_text)
            return self.format(record)
        except Exception as exc:  # a bad record must not cost the caller anything
            return f"unformattable log record from {record.name}: {type(exc).__name__}"


_batcher: _BatchHandler | None = None  # the running process's handler, for event()
_write_failures = 0  # writes of a batch that failed, per destination (read by /metrics)


def write_failures() -> int:
    """Return how many times this process failed to write a batch of lines somewhere."""
    return _write_failures


class _RotatingFile(logging.handlers.RotatingFileHandler):
    """A rotating file written a batch of lines at a time."""

    def write_lines(self, text: str) -> None:
        """Append ``text`` (lines, each ending with a newline), rotating where one would not fit."""
        if self.stream is None:
            self.stream = self._open()
        size = self.stream.tell()
        if not self.maxBytes or size + len(text) <= self.maxBytes:
            self.stream.write(text)  # the usual case: the whole batch fits
            self.stream.flush()
            return
        pending: list[str] = []
        for line in text[:-1].split("\n"):
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
    """Writes formatted lines in batches, off the event loop."""

    BATCH: Final = 4096
    GATHER: Final = _BatchHandler.GATHER

    def __init__(
        self, lines: queue.SimpleQueue[list[str] | None], stream: TextIO, file: _RotatingFile | None
    ) -> None:
        super().__init__(name="saiproxy-log-writer", daemon=True)
        self._lines = lines
        self._stream = stream
        self._file = file
        self._reported: set[str] = set()

    def run(self) -> None:
        queued = self._lines
        while True:
            batches = [queued.get()]
            # Lines logged off the loop come one at a time: let them gather.
            if len(batches[0] or ()) == 1:
                time.sleep(self.GATHER)
            while len(batches) < self.BATCH:
                try:
                    batches.append(queued.get_nowait())
                except queue.Empty:
                    break
            lines = [line for batch in batches if batch is not None for line in batch]
            if lines:
                self._write(lines)
            if None in batches:
                return  # the stop sign

    def _write(self, lines: list[str]) -> None:
        lines.append("")  # the last line's newline
        text = "\n".join(lines)
        # Whatever a line holds (a lone surrogate from undecodable bytes, say)
        # and whatever the destination does, the thread must live on: a dead
        # writer would silently end logging while the queue grows unbounded.
        self._attempt("stdout", self._write_stream, text)
        if self._file is not None:
            self._attempt("the log file", self._file.write_lines, text)

    def _write_stream(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()

    def _attempt(self, where: str, write: Callable[[str], None], text: str) -> None:
        """Write ``text`` with ``write``; retry once with unencodable characters replaced."""
        try:
            try:
                write(text)
            except UnicodeError:
                # ASCII with escapes: writable whatever the destination's encoding.
                write(text.encode("ascii", "backslashreplace").decode("ascii"))
        except Exception as exc:
            global _write_failures
            _write_failures += 1
            if where not in self._reported:
                self._reported.add(where)
                detail = getattr(exc, "strerror", None) or type(exc).__name__
                with contextlib.suppress(Exception):
                    print(
                        f"saiproxy: cannot write to {where}: {detail} "
                        "(reported once; saiproxy_log_write_failures counts them)",
                        file=sys.stderr,
                        flush=True,
                    )


class LogSetup:
    """Root logging for one process: a batching queue handler and its writer thread."""

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
            self.path = directory / log_file_name()
            try:
                directory.mkdir(parents=True, exist_ok=True)
                # Opened now, so an unwritable directory stops the start, not the logs.
                self.path.open("a", encoding="utf-8").close()
            except OSError as exc:
                raise SettingsError(
                    "LOG_DIR", f"cannot write log files in {log_dir} ({exc.strerror})"
                ) from None
            file = _RotatingFile(self.path, maxBytes=max_bytes, backupCount=backups,
                                 encoding="utf-8", delay=True)  # fmt: skip
        self._file = file
        self._queue: queue.SimpleQueue[list[str] | None] = queue.SimpleQueue()
        context = RequestContextFilter(secrets)
        self._handler = _BatchHandler(self._queue, context, make_formatter(fmt, context.mask))
        self._writer = _Writer(self._queue, stream or sys.stdout, file)
        self._level = level
        self._previous_level = logging.root.level

    def start(self) -> None:
        """Attach the handler to the root logger and start the writer thread.

        Called on the event loop, the handler batches there (see :class:`_BatchHandler`).
        """
        # Thread and process names are never written out: skip collecting them.
        logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
        self._writer.start()
        global _batcher
        with contextlib.suppress(RuntimeError):  # batching needs a running loop
            self._handler.attach(asyncio.get_running_loop())
            _batcher = self._handler
        logging.root.addHandler(self._handler)
        logging.root.setLevel(self._level)
        # aiohttp's own loggers stay at WARNING unless we are verbose.
        logging.getLogger("aiohttp").setLevel(
            logging.DEBUG if self._level <= logging.DEBUG else logging.WARNING
        )
        logging.getLogger("aiohttp.access").setLevel(self._level)

    def stop(self) -> None:
        """Detach, write every queued record, and close the file."""
        global _batcher
        if _batcher is self._handler:
            _batcher = None
        self._handler.detach()  # while attached: deferred lines go through the root logger
        logging.root.removeHandler(self._handler)
        logging.root.setLevel(self._previous_level)
        self._queue.put(None)
        self._writer.join()
        if self._file is not None:
            self._file.close()
