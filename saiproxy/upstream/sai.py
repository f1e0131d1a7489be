"""The SAI client: one template execution, with retries and credential fallback (docs/sai.md).

:meth:`SaiClient.open` returns once SAI has answered 200, leaving the body to
be read piece by piece; every earlier failure is retried, falls back or
becomes an :class:`~saiproxy.errors.UpstreamError`. :meth:`SaiClient.fetch`
reads the whole body and retries a body that breaks off, since nothing has
reached the client yet.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import aiohttp
from aiohttp import hdrs, web
from yarl import URL

from ..base.errors import (
    ContextTooLong,
    UpstreamAnswerTooLarge,
    UpstreamAuthRejected,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ..base.metrics import Metrics
from ..base.settings import ModelConfig, Settings
from ..logs import event
from ..tracing import hooks as tracing
from .auth import UNCLEAN_HEADER_TEXT, AuthChain, Credential
from .deadline import Deadline

if TYPE_CHECKING:
    from ..tracing.hooks import Tracing

__all__ = [
    "BACKOFF_CAP",
    "CALL_BUDGET",
    "CONTEXT_TOO_LONG",
    "ERROR_BODY_LIMIT",
    "RETRYABLE_STATUSES",
    "SAI",
    "CallBudget",
    "CleanHeaders",
    "SaiAnswer",
    "SaiCall",
    "SaiClient",
    "SaiStream",
    "clean_header_value",
    "client_timeout",
]

log = logging.getLogger("saiproxy.sai")

RETRYABLE_STATUSES: Final = frozenset({502, 503, 504})
CONTEXT_TOO_LONG: Final = re.compile(r"prompt is too long|openaicompatible", re.IGNORECASE)
ERROR_BODY_LIMIT: Final = 64 * 1024
BACKOFF_CAP: Final = 10.0


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

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


def client_timeout(settings: Settings) -> aiohttp.ClientTimeout:
    """Return the upstream session's timeouts: connecting only.

    REQUEST_TIMEOUT bounds the wait for SAI's headers and every silence in its
    body (:class:`SaiClient`, :class:`SaiStream`), at a fraction of the cost
    per piece of aiohttp's ``sock_read``; so a stream that keeps flowing is
    never cut, and the whole answer has no limit.
    """
    return aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout)


class _Transient(Exception):
    """An attempt failed in a way worth retrying."""

    def __init__(self, error: UpstreamError) -> None:
        super().__init__(error.message)
        self.error = error


class CallBudget:
    """The SAI calls one client request may still make beyond one per prompt (all its prompts').

    Retries, 429 fallbacks and structured-output repairs each take one; with
    none left, the failure at hand is the answer (REQUEST_EXTRA_CALLS).
    """

    __slots__ = ("left",)

    def __init__(self, extra: int) -> None:
        self.left = extra

    def take(self) -> bool:
        """Take one call from the budget; return False when none is left."""
        if self.left <= 0:
            return False
        self.left -= 1
        return True


@dataclass(slots=True)
class SaiCall:
    """One client request's journey through SAI: credentials tried, attempts made."""

    url: URL
    payload: bytes
    credential: Credential
    request_id: str
    template_id: str
    attempts: int = 0
    retries: int = 0
    tried: list[Credential] = field(default_factory=list)
    last_status: int | str | None = None  # of the last attempt: HTTP status, or what failed
    last_latency_ms: float | None = None
    budget: CallBudget | None = None  # shared by the client request's calls; None: unbounded
    # Asked before a call that began on a user's own credential goes on with a shared one
    # (SAI_COOKIE after a 429): False refuses it (the global limits, limits/gate.py).
    before_shared: Callable[[], Awaitable[bool]] | None = None
    span: Any = None  # the attempt's trace span while it is open (tracing on)

    def summary(self) -> dict[str, Any]:
        """Return the call's facts for the finish line: attempts and how the last one went."""
        return {
            "attempts": self.attempts,
            "template": self.template_id,
            "credential": self.credential.label,
            "upstream_status": self.last_status,
            "upstream_latency_ms": self.last_latency_ms,
        }


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
        # The body's idle timeout: one timer per answer, not one per piece (see _check_idle).
        self._watchdog: asyncio.TimerHandle | None = (
            loop.call_at(self._last + timeout, self._check_idle) if timeout else None
        )
        self.opened_at = time.monotonic()
        self.first_piece_at: float | None = None  # noted by read_text, not by the relay
        self._headers: CleanHeaders | None = None

    @property
    def headers(self) -> CleanHeaders:
        """Return SAI's response headers, every value cleaned (never raw undecodable bytes)."""
        if self._headers is None:
            self._headers = CleanHeaders(self.response.headers)
        return self._headers

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

    async def piece(self) -> str | None:
        """Return the next piece of the body as text as soon as it arrives; None at its end.

        A body that breaks off, stalls past REQUEST_TIMEOUT or grows past
        MAX_ANSWER_BYTES raises an UpstreamError.
        """
        while True:
            try:
                chunk = await self.response.content.readany()
            except self.BROKEN as exc:
                raise self.body_error(exc) from None
            text = self.text_of(chunk)
            if text != "":
                return text

    async def read_text(self) -> str:
        """Return the whole body as text, once it has all arrived (at most MAX_ANSWER_BYTES)."""
        # piece()'s loop, inline: one coroutine fewer per piece of the answer.
        pieces: list[str] = []
        read = self.response.content.readany
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

    async def __aenter__(self) -> SaiStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class SaiClient:
    """Executes SAI templates over one pooled ClientSession."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: Settings,
        chain: AuthChain,
        metrics: Metrics,
        *,
        jitter: Callable[[], float] = random.random,
        tracing: Tracing | None = None,
    ) -> None:
        self._session = session
        self._tracing = tracing
        # Looked up once: on Python 3.11 every lookup is a getpid() system call.
        self._loop = asyncio.get_running_loop()
        self._settings = settings
        self._chain = chain
        self._metrics = metrics
        self._jitter = jitter
        self._urls = {name: self._url(model) for name, model in settings.models.items()}

    def _url(self, model: ModelConfig) -> URL:
        url = self._settings.sai_url / "api" / "templates" / model.template_id / "execute"
        if model.model_override:
            url = url.with_query(modelOverride=model.model_override)
        return url

    def new_call(
        self,
        model: ModelConfig,
        payload: bytes,
        credential: Credential,
        request_id: str,
        budget: CallBudget | None = None,
    ) -> SaiCall:
        """Prepare the call for one client request (retries and fallbacks draw on ``budget``)."""
        return SaiCall(
            self._urls[model.name], payload, credential, request_id, model.template_id,
            budget=budget,
        )  # fmt: skip

    async def open(self, call: SaiCall) -> SaiStream:
        """Send the call until SAI answers 200; retry, fall back, or raise UpstreamError."""
        while True:
            try:
                return await self._attempt(call)
            except _Fallback as fallback:
                await self._fall_back(call, fallback)
            except _Transient as failure:
                await self._before_retry(call, failure.error)

    async def fetch(self, call: SaiCall) -> SaiAnswer:
        """Send the call and read the whole answer, retrying a body that breaks off."""
        while True:
            stream = await self.open(call)
            async with stream:
                try:
                    text = await stream.read_text()
                except UpstreamAnswerTooLarge:
                    raise  # asking again would only make SAI send it again
                except (UpstreamTimeout, UpstreamUnavailable) as error:
                    await self._before_retry(call, error)
                    continue
            return SaiAnswer(text, stream.headers, stream.first_piece_at or time.monotonic())

    async def _fall_back(self, call: SaiCall, fallback: _Fallback) -> None:
        """Go on with the fallback credential, once the global limits admit it when the call
        began on the user's own credential; else the 429 is the outcome."""
        credential = call.credential
        if credential.user and call.before_shared is not None and not await call.before_shared():
            raise UpstreamRateLimited(credential.label, fallback.retry_after)
        log.info(
            "rate limited; falling back",
            extra={"from": credential.label, "to": fallback.credential.label},
        )
        call.credential = fallback.credential
        self._metrics.fallbacks.inc()

    async def _before_retry(self, call: SaiCall, error: UpstreamError) -> None:
        if call.retries >= self._settings.max_retries:
            log.warning(
                "upstream failed, no retries left",
                extra={"attempt": call.attempts, "error": error.code},
            )
            raise error
        if call.budget is not None and not call.budget.take():
            log.warning(
                "upstream failed, the request's SAI calls are spent (REQUEST_EXTRA_CALLS)",
                extra={"attempt": call.attempts, "error": error.code},
            )
            raise error
        call.retries += 1
        self._metrics.child(self._metrics.retries, error.code or "error").inc()
        base = self._settings.retry_backoff * 2 ** (call.retries - 1)
        delay = min(BACKOFF_CAP, base) * (0.5 + self._jitter() / 2)
        log.info(
            "retrying upstream call",
            extra={
                "attempt": call.attempts,
                "retry": call.retries,
                "error": error.code,
                "delay_ms": round(delay * 1000),
            },
        )
        await asyncio.sleep(delay)

    async def _post(self, call: SaiCall, headers: dict[str, str]) -> aiohttp.ClientResponse:
        """Send one attempt; return when SAI's headers came, within REQUEST_TIMEOUT (else
        TimeoutError). The body's silences are bounded by the answer's watchdog (SaiStream)."""
        timeout = self._settings.request_timeout
        deadline = Deadline(self._loop, timeout) if timeout else None
        try:
            # Never follow a redirect: it would repeat the call, credential
            # included, to wherever SAI's answer points. A 3xx is a failure.
            return await self._session.post(
                call.url, data=call.payload, headers=headers, allow_redirects=False
            )
        except asyncio.CancelledError:
            if deadline is not None and deadline.stop():
                raise TimeoutError from None
            raise
        finally:
            if deadline is not None:
                deadline.stop()

    async def _attempt(self, call: SaiCall) -> SaiStream:
        call.attempts += 1
        credential = call.credential
        if credential not in call.tried:
            call.tried.append(credential)
        headers = {
            hdrs.CONTENT_TYPE: "application/json",
            hdrs.ACCEPT: "text/plain, */*",
            "X-Request-ID": call.request_id,
            **credential.headers(),
        }
        if self._tracing is not None:
            tracing.attempt_started(call, headers, self._tracing)
        log.debug("upstream call", extra={"attempt": call.attempts})
        started = time.monotonic()
        try:
            response = await self._post(call, headers)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            self._log_attempt(call, "timeout", started)
            raise _Transient(
                UpstreamTimeout(self._settings.request_timeout, call.attempts)
            ) from None
        except aiohttp.ClientResponseError as exc:
            # SAI's answer could not be parsed (a NUL in a header, a broken status
            # line): asking again gets the same answer, so it is not retried.
            self._log_attempt(call, "bad_answer", started)
            raise UpstreamUnavailable(
                f"SAI's answer could not be read (malformed HTTP, {type(exc).__name__})",
                call.attempts,
            ) from None
        except aiohttp.ClientError as exc:
            self._log_attempt(call, "connection_error", started)
            raise _Transient(
                UpstreamUnavailable(f"connection failed ({type(exc).__name__})", call.attempts)
            ) from None

        status = response.status
        self._log_attempt(call, status, started)
        if status == 200:
            return SaiStream(
                response,
                call,
                self._loop,
                self._settings.request_timeout,
                self._settings.max_answer_bytes,
            )
        try:
            body = await self._error_body(response)
        finally:
            response.release()
        raise self._failure(call, status, body, response.headers.get(hdrs.RETRY_AFTER))

    def _failure(self, call: SaiCall, status: int, body: str, retry_after: str | None) -> Exception:
        credential = call.credential
        if status == 401:
            log.warning(
                "SAI rejected the credential; not falling back",
                extra={"credential": credential.label, "source": credential.source},
            )
            return UpstreamAuthRejected(credential.label, credential.fix_when_rejected)
        if status == 429:
            fallback = self._chain.after_rate_limit(call.tried)
            if fallback is None or (call.budget is not None and not call.budget.take()):
                return UpstreamRateLimited(credential.label, retry_after)
            # Not a retry: the next attempt goes out at once, with another credential.
            return _Fallback(fallback, retry_after)
        if status == 500 and CONTEXT_TOO_LONG.search(body):
            return ContextTooLong()
        if 300 <= status < 400:
            log.warning("SAI answered with a redirect; not following it", extra={"status": status})
            return UpstreamUnavailable(
                f"HTTP {status} from SAI (a redirect, not followed)", call.attempts
            )
        error = UpstreamUnavailable(f"HTTP {status} from SAI", call.attempts)
        if status in RETRYABLE_STATUSES:
            return _Transient(error)
        return error

    async def _error_body(self, response: aiohttp.ClientResponse) -> str:
        try:
            async with asyncio.timeout(self._settings.request_timeout or None):
                raw = await response.content.read(ERROR_BODY_LIMIT)
        except (TimeoutError, aiohttp.ClientError):
            return ""
        return raw.decode("utf-8", "replace")

    def _log_attempt(self, call: SaiCall, status: int | str, started: float) -> None:
        """Count one attempt and remember how it went; a failed one gets its own line.

        A successful attempt is reported in the request's finish line, which
        saves a line on every healthy request (see bench/RESULTS.md).
        """
        self._metrics.child(self._metrics.upstream_attempts, str(status)).inc()
        call.last_status = status
        call.last_latency_ms = round((time.monotonic() - started) * 1000, 1)
        if status != 200:
            if call.span is not None:
                tracing.attempt_ended(call, status)
            event(
                log,
                "upstream attempt",
                {
                    "attempt": call.attempts,
                    "template": call.template_id,
                    "credential": call.credential.label,
                    "status": status,
                    "latency_ms": call.last_latency_ms,
                },
            )


class _Fallback(Exception):
    """A 429 moves the call to another credential: try again without counting a retry."""

    def __init__(self, credential: Credential, retry_after: str | None) -> None:
        super().__init__("rate limited; falling back")
        self.credential = credential
        self.retry_after = retry_after


SAI: Final = web.AppKey("sai", SaiClient)
# The SAI calls a request may still make beyond one per prompt (REQUEST_EXTRA_CALLS).
CALL_BUDGET: Final = web.RequestKey("call_budget", CallBudget)
