"""Setup: one process's root logging, started and stopped with the application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from ..base.settings import SettingsError
from .batch import BatchHandler, batcher_var
from .format import log_file_name, make_formatter
from .mask import Masker
from .write import RotatingFile, Writer

__all__ = ["LogSetup"]


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
            file = RotatingFile(self.path, maxBytes=max_bytes, backupCount=backups,
                                encoding="utf-8", delay=True)  # fmt: skip
        self._file = file
        self._queue: queue.SimpleQueue[list[str] | None] = queue.SimpleQueue()
        masker = Masker(secrets)
        self._handler = BatchHandler(self._queue, masker, make_formatter(fmt, masker.mask))
        self._writer = Writer(self._queue, stream or sys.stdout, file)
        self._level = level
        self._previous_level = logging.root.level

    def start(self) -> None:
        """Attach the handler to the root logger and start the writer thread.

        Called on the event loop, the handler batches there (see :class:`BatchHandler`),
        and the lifecycle lines logged in this context (the application's startup, so its
        server and every request it serves) defer to it (:func:`~.batch.event`).
        """
        # Thread and process names are never written out: skip collecting them.
        logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
        self._writer.start()
        with contextlib.suppress(RuntimeError):  # batching needs a running loop
            self._handler.attach(asyncio.get_running_loop())
            batcher_var.set(self._handler)
        logging.root.addHandler(self._handler)
        logging.root.setLevel(self._level)
        # aiohttp's own loggers stay at WARNING unless we are verbose.
        logging.getLogger("aiohttp").setLevel(
            logging.DEBUG if self._level <= logging.DEBUG else logging.WARNING
        )
        logging.getLogger("aiohttp.access").setLevel(self._level)

    def stop(self) -> None:
        """Detach, write every queued record, and close the file."""
        if batcher_var.get() is self._handler:
            batcher_var.set(None)
        self._handler.detach()  # while attached: deferred lines go through the root logger
        logging.root.removeHandler(self._handler)
        logging.root.setLevel(self._previous_level)
        self._queue.put(None)
        self._writer.join()
        if self._file is not None:
            self._file.close()
