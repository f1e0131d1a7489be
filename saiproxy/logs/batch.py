"""Batching: records are noted on the hot path and formatted a batch at a time on the loop.

Why: measured under load, INFO logging took 48 % of the proxy's CPU when each
line was formatted on its own; batched, and with lifecycle lines made without
a LogRecord (:func:`event`), about 13 %. The per-line figures are in
bench/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import logging.handlers
import queue
import threading
import time
from typing import Any, Final, NamedTuple

from .format import JsonFormatter, TextFormatter, request_tag
from .mask import Masker

__all__ = [
    "BatchHandler",
    "batcher_var",
    "event",
    "request_id_var",
    "trace_var",
]

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)
# The traced request's (trace_id, span_id), as hex: its lines carry them (saiproxy.tracing).
trace_var: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "trace", default=None
)

_TRACEBACKS: Final = logging.Formatter()


def event(logger: logging.Logger, message: str, fields: dict[str, Any]) -> None:
    """Log an INFO lifecycle line like ``logger.info(message, extra=fields)``, far cheaper.

    These lines are on every request's path. With a batching handler
    running for the caller's application (:data:`batcher_var`), only the
    parts are noted (the time and the request ID included) and the line is
    made in the next batch, so ``fields`` must not change afterwards; the
    caller's file and line are never written out, so they are never looked up.
    """
    if logger.isEnabledFor(logging.INFO):
        batcher = batcher_var.get()
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


class BatchHandler(logging.handlers.QueueHandler):
    """Format records a batch at a time on the event loop; the writer thread writes them.

    Logging a record only notes what must be noted at once (the request ID, a
    context variable; the traceback) and appends it to a list. Every
    ``GATHER`` seconds the event loop tags, masks and formats the whole list
    in one go and queues the lines for the writer thread, which only writes
    (a thread with no Python work to do hardly competes with the loop for the
    GIL). Lifecycle lines (:func:`event`) become a line without a LogRecord
    when this handler is the only one on their way. Records from other
    threads are handed to the loop; without a running loop (startup,
    shutdown) records are formatted at once.
    """

    GATHER: Final = 0.05  # seconds a line may wait for company

    def __init__(
        self,
        lines: queue.SimpleQueue[list[str] | None],
        masker: Masker,
        formatter: JsonFormatter | TextFormatter,
    ) -> None:
        super().__init__(lines)
        self._masker = masker
        self._line_formatter = formatter
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
        trace = trace_var.get()
        if trace is not None and "trace_id" not in record.__dict__:
            record.trace_id, record.span_id = trace
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
        trace = trace_var.get()
        if trace is not None:
            fields = {**fields, "trace_id": trace[0], "span_id": trace[1]}
        # tuple.__new__: a NamedTuple's own __new__ is a Python function.
        self._add(
            tuple.__new__(_Deferred, (logger, message, fields, time.time(), request_id_var.get()))
        )
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
                if not isinstance(item, _Deferred):
                    lines.append(self._render(item))
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
        if self.level > logging.INFO or self.formatter is not self._line_formatter:
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
        try:
            # The bare message is masked (its masking cached, as it repeats), then
            # tagged with the request ID, masked on its own (a client may choose it).
            message = self._masker.mask(item.message)
            request_id = item.request_id
            if request_id is not None and "request_id" not in item.fields:
                request_id = self._masker.mask_unique(request_id)
                message = request_tag(request_id) + message
            else:
                request_id = None
            return self._line_formatter.format_event(
                item.logger.name, message, item.created, item.fields, request_id
            )
        except Exception as exc:  # a bad line must not cost the caller anything
            return f"unformattable log record from {item.logger.name}: {type(exc).__name__}"

    def _render(self, record: logging.LogRecord) -> str:
        try:
            # The request ID was noted when the record was logged (see handle):
            # the batch itself runs in an empty context (see _add).
            self._masker.tag(record)  # the formatter masks the fields
            if record.exc_info and not record.exc_text:
                record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            if record.exc_text:  # an exception's text may quote anything
                record.exc_text = self._masker.mask(record.exc_text)
            return self.format(record)
        except Exception as exc:  # a bad record must not cost the caller anything
            return f"unformattable log record from {record.name}: {type(exc).__name__}"


# The handler event() defers to: set where an application's logging starts (its startup,
# see LogSetup.start), so that its server and every request it serves inherit it. A
# context variable, not a global: two applications in one process (the tests) each
# defer to their own handler, and one that stopped is never deferred to by another.
batcher_var: contextvars.ContextVar[BatchHandler | None] = contextvars.ContextVar(
    "log_batcher", default=None
)
