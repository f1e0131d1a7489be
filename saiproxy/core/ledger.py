"""What one exchange knows and has recorded: the request, the call, what it cost.

The :class:`~saiproxy.core.exchange.Exchange` drives the conversation; its
ledger holds the facts it learns (SAI's model, the first byte, the tokens,
the call blocks left as text) and reports them: the request received line
and the finish line, once. What the relay learns it returns as a
:class:`~saiproxy.core.relay.Learned`, which the ledger records.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from typing import Any

from aiohttp import web

from ..base.errors import ContextTooLong, ModelNotFound, UpstreamError
from ..base.keys import METRICS, REQUEST_ID, SETTINGS
from ..base.log import exchange_logger as log
from ..base.settings import ModelConfig, Settings
from ..limits.identity import OWNERS
from ..logs import RESPONSE_FINISHED, event
from ..tracing import hooks as tracing
from ..upstream.sai import SAI, CallBudget, SaiCall, SaiClient
from .answer import Rejected
from .conversation import Conversation, Usage
from .ending import Ending
from .prompt import estimate_tokens
from .relay import Learned, usage_of

__all__ = ["Ledger", "unique_suffix"]

# The exchange's log lines keep its logger name, whichever module writes them.

_SUFFIXES = itertools.count(secrets.randbits(40))


def unique_suffix() -> str:
    """Return a process-unique suffix: a random start, counted up (no entropy per call)."""
    return f"{next(_SUFFIXES) & 0xFFFFFFFFFFFF:012x}"


class Ledger:
    """What one exchange knows and has recorded, and the log lines that report it."""

    # Slots: ten thousand open streams each hold one (a dict would cost ~1 KB more).
    __slots__ = (
        "_body", "app", "budget", "call", "chars", "choice", "conversation", "created", "early",
        "first_byte", "loop", "max_output", "model", "model_config", "protocol", "rejected",
        "rejected_detail", "request", "request_id", "settings", "span", "started", "suffix",
        "usage",
    )  # fmt: skip

    def __init__(
        self,
        request: web.Request,
        body: Any,
        conversation: Conversation,
        *,
        protocol: str,
    ) -> None:
        self.request = request
        self.app = request.app  # a property that walks the request's routing: looked up once
        self.settings: Settings = self.app[SETTINGS]
        # Looked up once: on Python 3.11 every lookup is a getpid() system call.
        self.loop = asyncio.get_running_loop()
        self.conversation = conversation
        self.protocol = protocol
        self.started = time.monotonic()
        self.created = int(time.time())
        self.request_id = request[REQUEST_ID]
        # The request's server span; None: not traced. Tracing off, one attribute
        # check: a missing request key costs a KeyError inside ``get`` (about 1 us).
        self.span = request.get(tracing.SPAN) if self.settings.tracing is not None else None
        self.suffix = unique_suffix()
        self.model_config = self._model(conversation.model)
        # SAI's model header names the model; without it, the name the client asked for.
        self.model = conversation.model or self.model_config.name
        self._body = body
        self.call: SaiCall | None = None
        # The SAI calls the request may make beyond one per prompt (shared by several
        # answers of one request: answer_request).
        self.budget = CallBudget(self.settings.request_extra_calls)
        self.early: UpstreamError | None = None  # an outcome known without calling SAI
        self.chars = 0
        self.first_byte: float | None = None
        self.usage = Usage()
        self.choice: int | None = None  # its index when one of several (fanout.respond_all)
        self.max_output: int | None = None  # the answer's token bound the client asked for
        # Call blocks left as text, by reason, and the first one's detail: one log line at the end.
        self.rejected: dict[str, int] = {}
        self.rejected_detail = ""

    @property
    def sai(self) -> SaiClient:
        return self.app[SAI]

    @property
    def ids(self) -> str:
        """Return the part every ID of this answer shares: request ID and a unique suffix."""
        return f"{self.request_id}-{self.suffix}"

    def _model(self, name: str | None) -> ModelConfig:
        model = self.settings.model_for(name)
        if model is None:
            raise ModelNotFound(name)
        return model

    def count(
        self, headers: Any, completion_chars: int, *, prompt_chars: int | None = None
    ) -> None:
        """Add one SAI answer's tokens: its headers, else estimates from the characters."""
        prompt_chars = self.chars if prompt_chars is None else prompt_chars
        self._add(usage_of(headers, prompt_chars, completion_chars))

    def _add(self, usage: Usage) -> None:
        self.usage.prompt_tokens += usage.prompt_tokens
        self.usage.completion_tokens += usage.completion_tokens

    def record(self, learned: Learned) -> None:
        """Record what relaying the streamed answer learned: SAI's model, first byte, tokens."""
        if learned.model is not None:
            self.model = learned.model
        if learned.first_byte is not None:
            self.first_byte = learned.first_byte
        if learned.usage is not None:
            self._add(learned.usage)

    def client_id(self) -> str:
        """Return the client's ID as the limits name it: a hash, never the key."""
        assert self.call is not None
        return self.app[OWNERS](self.request, self.call.credential).id

    def _rejected(self, rejected: Rejected) -> None:
        metrics = self.app[METRICS]
        metrics.child(metrics.tool_calls_unrecognised, rejected.reason).inc()
        if not self.rejected:
            self.rejected_detail = rejected.detail[:300]
        self.rejected[rejected.reason] = self.rejected.get(rejected.reason, 0) + 1

    def _log_rejected(self) -> None:
        """Log the call blocks left as text: one line per answer, however many there were."""
        if self.rejected:
            log.warning(
                "tool calls not recognised, left as text",
                extra={
                    "count": sum(self.rejected.values()),
                    "reasons": self.rejected,
                    "detail": self.rejected_detail,
                    **self._choice_field(),
                },
            )

    def _choice_field(self) -> dict[str, int]:
        return {"choice": self.choice} if self.choice is not None else {}

    def _log_received(self, credential: dict[str, Any]) -> None:
        """Log the request as received, with the credential decision."""
        conversation = self.conversation
        if log.isEnabledFor(logging.INFO):  # the line's fields are not made for nothing
            self._note_received(credential)
        if conversation.unwrapped:
            log.info(
                "IDE plugin wrapper removed",
                extra={
                    "count": conversation.unwrapped,
                    "chars_before": conversation.unwrapped_chars_before,
                    "chars_after": conversation.unwrapped_chars_after,
                },
            )
        if isinstance(self.early, ContextTooLong):
            log.info(
                "context too long, not calling SAI",
                extra={"estimated_tokens": estimate_tokens(self.chars),
                       "limit": self.settings.max_context_tokens},
            )  # fmt: skip
        if self.settings.verbose_logging:
            log.debug(
                "message previews",
                extra={"previews": [f"{t.role}: {t.text[:80]}" for t in conversation.turns]},
            )
            if self.call is not None:
                log.debug("SAI payload built", extra={"payload_bytes": len(self.call.payload)})

    def _note_received(self, credential: dict[str, Any]) -> None:
        conversation = self.conversation
        event(
            log,
            "request received",
            {
                "path": self.request.path,
                "protocol": self.protocol,
                "stream": conversation.stream,
                "model": self.model_config.name,
                "requested_model": conversation.model,
                "messages": len(conversation.turns),
                "roles": conversation.role_counts(),
                "chars": self.chars,
                "estimated_tokens": estimate_tokens(self.chars),
                "unwrapped": conversation.unwrapped,
                "tools": len(conversation.offered_tools),
                **credential,
                **self._choice_field(),
            },
        )

    def finish(self, ending: Ending) -> None:
        """Log the finish line (how the answer ended, what it cost) and record the latencies."""
        now = time.monotonic()
        latency = now - self.started
        generating = now - self.first_byte if self.first_byte is not None else 0.0
        metrics = self.app[METRICS]
        stream = "true" if self.conversation.stream else "false"
        exemplar = tracing.exemplar(self.span) if self.span is not None else None
        metrics.child(metrics.latency, stream).observe(latency, exemplar)
        if self.first_byte is not None:
            metrics.child(metrics.ttfb, stream).observe(self.first_byte - self.started, exemplar)
        usage = self.usage
        # Raised, the early outcome's traceback holds this exchange's frames: a
        # cycle that would keep the whole conversation until the collector runs.
        self.early = None
        self._log_rejected()
        if not log.isEnabledFor(logging.INFO):
            return
        event(
            log,
            RESPONSE_FINISHED,
            {
                "path": self.request.path,
                "status": ending.status,
                "outcome": ending.outcome,
                "finish_reason": ending.finish_reason,
                "tool_calls": ending.tool_calls,
                "latency_ms": round(latency * 1000, 1),
                "ttfb_ms": round((self.first_byte - self.started) * 1000, 1)
                if self.first_byte is not None
                else None,
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
                "tokens_per_second": round(usage.completion_tokens / generating, 1)
                if generating > 0
                else None,
                "model": self.model,
                **(self.call.summary() if self.call is not None else {}),
                **self._choice_field(),
            },
        )
