"""The SAI client: one template execution, with retries and credential fallback (docs/sai.md).

:meth:`SaiClient.open` returns once SAI has answered 200, leaving the body to
be read piece by piece; every earlier failure is retried, falls back or
becomes an :class:`~saiproxy.errors.UpstreamError`, as the attempt's
:mod:`~saiproxy.upstream.outcome` says. :meth:`SaiClient.fetch` reads the
whole body and retries a body that breaks off, since nothing has reached the
client yet.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp import hdrs, web
from yarl import URL

from ..base.errors import (
    UpstreamAnswerTooLarge,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ..base.log import sai_logger as log
from ..base.metrics import Metrics
from ..base.settings import ModelConfig, Settings
from ..logs import event
from ..tracing import hooks as tracing
from .auth import AuthChain, Credential
from .call import CallBudget, SaiCall
from .deadline import Deadline
from .outcome import Fail, FallBack, Opened, Outcome, Retry, judge
from .stream import SaiAnswer, SaiStream

if TYPE_CHECKING:
    from ..tracing.hooks import Tracing

# The client's face: a caller of SAI imports from here, wherever a name is defined.
__all__ = [
    "BACKOFF_CAP",
    "ERROR_BODY_LIMIT",
    "SAI",
    "CallBudget",
    "SaiAnswer",
    "SaiCall",
    "SaiClient",
    "SaiStream",
    "client_timeout",
]


ERROR_BODY_LIMIT: Final = 64 * 1024
BACKOFF_CAP: Final = 10.0


def client_timeout(settings: Settings) -> aiohttp.ClientTimeout:
    """Return the upstream session's timeouts: connecting only.

    REQUEST_TIMEOUT bounds the wait for SAI's headers and every silence in its
    body (:class:`SaiClient`, :class:`SaiStream`), at a fraction of the cost
    per piece of aiohttp's ``sock_read``; so a stream that keeps flowing is
    never cut, and the whole answer has no limit.
    """
    return aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout)


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
            outcome = await self._attempt(call)
            try:
                if isinstance(outcome, Opened):
                    return outcome.stream
                if isinstance(outcome, FallBack):
                    await self._fall_back(call, outcome)
                    call.credential = outcome.credential
                elif isinstance(outcome, Retry):
                    await self._before_retry(call, outcome.error)
                else:
                    raise outcome.error
            finally:
                # A raised error's traceback holds this frame: without this, the frame and
                # the error would hold each other, and the call (its payload) with them,
                # until the garbage collector ran.
                del outcome

    async def fetch(self, call: SaiCall) -> SaiAnswer:
        """Send the call and read the whole answer, retrying a body that breaks off."""
        while True:
            stream = await self.open(call)
            with stream:
                try:
                    text = await stream.read_text()
                except UpstreamAnswerTooLarge:
                    raise  # asking again would only make SAI send it again
                except (UpstreamTimeout, UpstreamUnavailable) as error:
                    await self._before_retry(call, error)
                    continue
            return SaiAnswer(text, stream.headers, stream.first_piece_at or time.monotonic())

    async def _fall_back(self, call: SaiCall, fallback: FallBack) -> None:
        """Spend a call on the fallback credential, once the global limits admit it when the
        call began on the user's own credential; else raise the 429."""
        credential = call.credential
        if call.budget is not None and not call.budget.take():
            raise UpstreamRateLimited(credential.label, fallback.retry_after)
        if credential.user and call.before_shared is not None and not await call.before_shared():
            raise UpstreamRateLimited(credential.label, fallback.retry_after)
        log.info(
            "rate limited; falling back",
            extra={"from": credential.label, "to": fallback.credential.label},
        )
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
        TimeoutError). The body's silences are bounded by the answer's watchdog (SaiStream).

        One timer handle (:class:`Deadline`), not ``asyncio.timeout``: about 3 us
        less per attempt.
        """
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

    async def _attempt(self, call: SaiCall) -> Outcome:
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
            return Retry(UpstreamTimeout(self._settings.request_timeout, call.attempts))
        except aiohttp.ClientResponseError as exc:
            # SAI's answer could not be parsed (a NUL in a header, a broken status
            # line): asking again gets the same answer, so it is not retried.
            self._log_attempt(call, "bad_answer", started)
            return Fail(
                UpstreamUnavailable(
                    f"SAI's answer could not be read (malformed HTTP, {type(exc).__name__})",
                    call.attempts,
                )
            )
        except aiohttp.ClientError as exc:
            self._log_attempt(call, "connection_error", started)
            return Retry(
                UpstreamUnavailable(f"connection failed ({type(exc).__name__})", call.attempts)
            )

        status = response.status
        self._log_attempt(call, status, started)
        if status == 200:
            return Opened(
                SaiStream(
                    response,
                    call,
                    self._loop,
                    self._settings.request_timeout,
                    self._settings.max_answer_bytes,
                )
            )
        try:
            body = await self._error_body(response)
        finally:
            response.release()
        return judge(call, self._chain, status, body, response.headers.get(hdrs.RETRY_AFTER))

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


SAI: Final = web.AppKey("sai", SaiClient)
