"""An answer of SAI: its cleaned headers, its body read piece by piece or whole."""

from __future__ import annotations

import asyncio
import codecs
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from ..base.errors import (
    UpstreamAnswerTooLarge,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ..tracing import hooks as tracing
from .auth import UNCLEAN_HEADER_TEXT
from .call import SaiCall

__all__ = ["CleanHeaders", "SaiAnswer", "SaiStream", "clean_header_value"]


def clean_header_value(value: str) -> str:
    """Return a header value as clean text: bad bytes become U+FFFD, controls a space."""
    if value.isascii() and value.isprintable():
        return value  # the usual case, at the cost of two C scans
    if not value.isascii():
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return UNCLEAN_HEADER_TEXT.sub(" ", value)


class CleanHeaders(Mapping[str, str]):
    """SAI's response headers, each value cleaned as it is read (see clean_header_value).

    A view, not a copy: an open stream holds it for its whole life.
    """

    __slots__ = ("_raw",)

    def __init__(self, raw: Mapping[str, str]) -> None:
        self._raw = raw

    def __getitem__(self, name: str) -> str:
        return clean_header_value(self._raw[name])

    def get(self, name: str, default: Any = None) -> Any:  # Mapping's, without a KeyError
        value = self._raw.get(name)
        return default if value is None else clean_header_value(value)

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


@dataclass(slots=True)
class SaiAnswer:
    """A complete answer: text and the headers that describe it."""

    text: str
    headers: CleanHeaders  # cleaned, like SaiStream.headers
    first_byte_at: float  # when the body's first byte arrived (an empty body: when it ended)


class SaiStream:
    """An open 200 answer whose body is still arriving.

    At most ``max_bytes`` of body (decompressed) are accepted: beyond that the
    answer ends with :class:`~saiproxy.errors.UpstreamAnswerTooLarge`, so SAI
    cannot make the proxy hold more, whatever it sends.
    """

    __slots__ = (
        "_complete", "_decoder", "_ended", "_headers", "_idle", "_last", "_loop", "_max_bytes",
        "_received", "_split", "_timeout", "_watchdog", "call", "first_piece_at", "opened_at",
        "response",
    )  # fmt: skip

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        call: SaiCall,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
        max_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.response = response
        self.call = call
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._complete = False
        self._ended = False
        self._received = 0
        self._decoder: codecs.IncrementalDecoder | None = None  # made for a split character
        self._split = False  # the decoder holds the start of a character
        self._loop = loop
        self._last = loop.time()
        self._idle = False  # the watchdog found the body silent too long, and closed it
        # The body's idle timeout: one timer per answer, not one per piece (see _check_idle),
        # armed by the first read that may wait (a body that came whole needs none).
        self._watchdog: asyncio.TimerHandle | None = None
        self.opened_at = time.monotonic()
        self.first_piece_at: float | None = None  # noted by read_text, not by the relay
        self._headers: CleanHeaders | None = None

    @property
    def headers(self) -> CleanHeaders:
        """Return SAI's response headers, every value cleaned (never raw undecodable bytes)."""
        if self._headers is None:
            self._headers = CleanHeaders(self.response.headers)
        return self._headers

    def _arm(self) -> None:
        """Start the watchdog, counting the silence from the last piece (or the opening)."""
        if self._timeout and self._watchdog is None and not self._ended:
            self._watchdog = self._loop.call_at(self._last + self._timeout, self._check_idle)

    def _check_idle(self) -> None:
        """End a body that stayed silent for REQUEST_TIMEOUT; else look again when it could have.

        Bounding the silence between two reads the usual way (aiohttp's
        ``sock_read``) cancels and re-arms a timer for every chunk that
        arrives; a token stream brings thousands a second. Here one timer per
        answer wakes once per REQUEST_TIMEOUT and re-arms itself for what is
        left of the silence, while each piece only notes the time
        (:meth:`text_of`). A silent body is closed: the pending read fails,
        and :meth:`body_error` calls it a timeout.
        """
        deadline = self._last + self._timeout
        if self._loop.time() >= deadline:
            self._watchdog = None
            self._idle = True
            self.response.close()
        else:
            self._watchdog = self._loop.call_at(deadline, self._check_idle)

    # What reading a body raises when it breaks off or stalls: map it with body_error().
    BROKEN: Final = (TimeoutError, aiohttp.ClientError)

    @property
    def read_chunk(self) -> Callable[[], Awaitable[bytes]]:
        """Return the raw read of the next chunk (all that has arrived; b"" at the end).

        A relay awaits it directly and hands the chunk to :meth:`text_of`: a
        token stream then pays one await per piece, not two. What it raises
        is one of :attr:`BROKEN`, for :meth:`body_error`.
        """
        self._arm()
        return self.response.content.readany

    def text_of(self, chunk: bytes) -> str | None:
        """Return a chunk's text ("" while a character is incomplete); None after the end.

        UTF-8 is decoded incrementally, so a character split across network
        chunks comes out whole. Past MAX_ANSWER_BYTES this raises an UpstreamError.
        """
        self._last = self._loop.time()
        if not chunk:
            if self._ended:
                return None
            self._ended = self._complete = True
            return self._decoder.decode(b"", final=True) if self._decoder and self._split else None
        self._received += len(chunk)
        if self._received > self._max_bytes:
            raise UpstreamAnswerTooLarge(self._max_bytes, self.call.attempts)
        if not self._split:
            # Nearly every piece is whole UTF-8: decode it at C speed, and only
            # keep a partial character for the next piece when it is not.
            try:
                return chunk.decode()
            except UnicodeDecodeError:
                self._split = True
        if self._decoder is None:
            self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text = self._decoder.decode(chunk)
        self._split = bool(self._decoder.getstate()[0])
        return text

    async def read_text(self) -> str:
        """Return the whole body as text, once it has all arrived (at most MAX_ANSWER_BYTES)."""
        content = self.response.content
        if content.is_eof():
            # The usual short answer: it came whole with the headers, and is read without
            # a wait (so without the watchdog's timer).
            try:
                text = (self.text_of(content.read_nowait()) or "") + (self.text_of(b"") or "")
            except self.BROKEN as exc:
                raise self.body_error(exc) from None
            if text:
                self.first_piece_at = time.monotonic()
            return text
        # piece()'s loop, inline: one coroutine fewer per piece of the answer.
        pieces: list[str] = []
        read = self.read_chunk
        while True:
            try:
                chunk = await read()
            except self.BROKEN as exc:
                raise self.body_error(exc) from None
            piece = self.text_of(chunk)
            if piece is None:
                return "".join(pieces)
            if piece:
                if not pieces:
                    self.first_piece_at = time.monotonic()
                pieces.append(piece)

    def body_error(self, exc: BaseException) -> UpstreamError:
        """Return the UpstreamError for a body that stalled or broke off."""
        if self._idle or isinstance(exc, (TimeoutError, aiohttp.ServerTimeoutError)):
            return UpstreamTimeout(self._timeout, self.call.attempts)
        return UpstreamUnavailable(
            f"the answer broke off ({type(exc).__name__})", self.call.attempts
        )

    def close(self) -> None:
        """Release the connection: back to the pool if the body was read, else drop it."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self.call.span is not None:
            tracing.attempt_ended(self.call, 200, complete=self._complete)
        if self._complete:
            self.response.release()
        else:
            # An unread body would poison a pooled connection; closing also tells
            # SAI at once that nobody is listening any more.
            self.response.close()

    # A plain ``with``: closing never waits, and an async one costs two coroutines per answer.
    def __enter__(self) -> SaiStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
