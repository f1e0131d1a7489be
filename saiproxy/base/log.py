"""Every logger saiproxy writes to, named in this one place, as aiohttp's ``log.py`` does.

A module takes its logger from here (``from ..base.log import exchange_logger
as log``), so a line keeps its logger name when code moves between modules:
operators and dashboards filter on these names (docs/operations.md lists them
with what writes to each).
"""

from __future__ import annotations

import logging

__all__ = [
    "auth_logger",
    "exchange_logger",
    "limits_logger",
    "middlewares_logger",
    "protocols_logger",
    "root_logger",
    "sai_logger",
    "schema_logger",
    "server_logger",
    "tracing_logger",
]

# The parent of them all: ``saiproxy check`` quiets it.
root_logger = logging.getLogger("saiproxy")
# The credential chain: which credential a request got (upstream/auth.py).
auth_logger = logging.getLogger("saiproxy.auth")
# One exchange's lifecycle: request received, response finished, the relay, the
# in-flight accounting, the prompt and the JSON body (core/).
exchange_logger = logging.getLogger("saiproxy.exchange")
# Admissions, refusals, the store's health and the usage endpoint (limits/, web/usage.py).
limits_logger = logging.getLogger("saiproxy.limits")
# Failures rendered for the client, rejected proxy keys (web/middlewares.py).
middlewares_logger = logging.getLogger("saiproxy.middlewares")
# What a protocol adapter ignored or refused (protocols/).
protocols_logger = logging.getLogger("saiproxy.protocols")
# One SAI call: attempts, retries, fallback, SAI's answer (upstream/sai.py, outcome.py).
sai_logger = logging.getLogger("saiproxy.sai")
# Structured output checked against the client's schema (core/schemacheck.py).
schema_logger = logging.getLogger("saiproxy.schema")
# Listening, draining, requests aiohttp could not parse (web/server.py, web/malformed.py).
server_logger = logging.getLogger("saiproxy.server")
# The OpenTelemetry SDK's set-up and its exporter (tracing/sdk.py).
tracing_logger = logging.getLogger("saiproxy.tracing")
