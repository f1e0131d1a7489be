"""A deadline for one await, at a third of ``asyncio.timeout``'s cost (SAI's headers, per attempt).

``asyncio.timeout`` is a context manager that reschedules its timer on entry
and works out on exit whether the cancellation was its own: about 5 us per
use under uvloop, on every SAI attempt. :class:`Deadline` does the same work
with one timer handle and no context manager (about 2 us): the task is
cancelled when the time is up, and :meth:`Deadline.stop` says whether a
cancellation that ended the await was the deadline's (then it is taken back,
as ``asyncio.timeout`` does, and the caller raises its timeout instead).
"""

from __future__ import annotations

import asyncio

__all__ = ["Deadline"]


class Deadline:
    """Cancel the current task ``seconds`` from now, unless stopped first."""

    __slots__ = ("_cancelling", "_handle", "_ours", "_task", "expired")

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("a Deadline needs a running task")
        self._task = task
        self._cancelling = task.cancelling()
        self.expired = False
        self._ours = False
        self._handle: asyncio.TimerHandle | None = loop.call_at(loop.time() + seconds, self._expire)

    def _expire(self) -> None:
        self.expired = True
        self._task.cancel()

    def stop(self) -> bool:
        """Stop the timer; return True when it had fired: its cancellation is taken back, and
        a CancelledError that ended the await is the deadline's (unless the task was also
        cancelled from elsewhere, which then stands). Stopping again changes nothing."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._ours = self.expired and self._task.uncancel() <= self._cancelling
        return self._ours
