"""Writing: a thread writes the formatted lines to stdout and a rotating file."""

from __future__ import annotations

import contextlib
import logging.handlers
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Final, TextIO

from .batch import BatchHandler

__all__ = ["RotatingFile", "Writer", "write_failures"]

_write_failures = 0  # writes of a batch that failed, per destination (read by /metrics)


def write_failures() -> int:
    """Return how many times this process failed to write a batch of lines somewhere."""
    return _write_failures


class RotatingFile(logging.handlers.RotatingFileHandler):
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


class Writer(threading.Thread):
    """Writes formatted lines in batches, off the event loop."""

    BATCH: Final = 4096
    GATHER: Final = BatchHandler.GATHER

    def __init__(
        self, lines: queue.SimpleQueue[list[str] | None], stream: TextIO, file: RotatingFile | None
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
