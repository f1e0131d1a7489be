"""``saiproxy check``: validate the configuration and probe SAI with every system credential.

The settings are loaded exactly as startup loads them (a configuration error
exits 2 with one line). Then each configured system credential (SAI_KEY,
SAI_COOKIE) executes each configured model's template once with a tiny
prompt, through the same client the proxy uses, but with no retries and no
fallback, so every line reports what that one credential gets from SAI.
Exit 0 when every probe passed, 1 otherwise: usable as a pre-deploy step.

Nothing printed comes from a secret: probes are named by credential kind,
and the output goes through the logs' masker (every configured secret value
of at least MIN_SECRET_LENGTH characters) before it is written, as a second
line of defence.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, Final

import aiohttp
import orjson

from .. import __version__
from ..base.errors import UpstreamError
from ..base.log import root_logger
from ..base.metrics import Metrics
from ..base.settings import ModelConfig, Settings, SettingsError, load_settings
from ..logs import Masker
from ..upstream.auth import AuthChain, Credential, SystemHandler
from ..upstream.sai import SaiClient, client_timeout

__all__ = [
    "DEFAULT_TIMEOUT",
    "PROBE_PROMPT",
    "Probe",
    "advice_for",
    "format_probe",
    "main",
    "probe",
    "probe_payload",
    "report",
    "run_probes",
    "system_credentials",
]

PROBE_PROMPT: Final = "saiproxy check: reply with the single word OK."
DEFAULT_TIMEOUT: Final = 60.0


@dataclass(frozen=True, slots=True)
class Probe:
    """One template execution with one system credential, and how it went."""

    credential: str  # SAI_KEY or SAI_COOKIE, never the value
    model: str
    template: str
    status: int | str  # SAI's HTTP status, or "timeout" / "connection_error"
    latency_ms: float
    outcome: str  # "ok" or the proxy's outcome code for this failure
    advice: str = ""  # what to do, on failure
    upstream_model: str | None = None  # the model SAI says answered
    answer_chars: int = 0

    @property
    def ok(self) -> bool:
        """Return whether the credential works for this template."""
        return self.outcome == "ok"


def system_credentials(settings: Settings) -> list[Credential]:
    """Return the configured system credentials, SAI_KEY first, as the auth chain builds them."""
    handlers = (
        SystemHandler("key", settings.sai_key),
        SystemHandler("cookie", settings.sai_cookie),
    )
    return [handler.credential for handler in handlers if handler.credential is not None]


def probe_payload() -> bytes:
    """Return the smallest template execution SAI accepts (see docs/sai.md)."""
    message_id = int(time.time() * 1000)
    return orjson.dumps(
        {
            "inputs": {"system": "", "user": PROBE_PROMPT},
            "chatMessages": [{"content": PROBE_PROMPT, "role": "user", "id": message_id}],
        }
    )


def advice_for(
    credential: Credential, model: ModelConfig, status: int | str, settings: Settings
) -> tuple[str, str]:
    """Return the outcome code and what an operator should do about a failed probe."""
    name = credential.label  # SAI_KEY or SAI_COOKIE: the variable, the secret and the file
    where = f"{name} (environment, {name}_FILE, or the Docker secret {name})"
    if status == 401:
        return "invalid_api_key", f"SAI rejected {name}: put a current value in {where}"
    if status == 429:
        if credential.kind == "key" and settings.sai_cookie is not None:
            then = "requests fall back to SAI_COOKIE meanwhile"
        else:
            then = "no fallback is left for requests that reach this limit"
        return (
            "rate_limit_exceeded",
            f"{name} is rate limited by SAI ({then}): wait for the limit to reset "
            "or ask SAI's owners to raise it",
        )
    if status == "timeout":
        return (
            "upstream_timeout",
            f"SAI did not answer within {settings.request_timeout:g} s: "
            "check SAI's status, or raise --timeout",
        )
    if status == "connection_error":
        return (
            "upstream_error",
            f"cannot connect to {_display_url(settings)}: check SAI_URL, DNS and the network "
            "path (proxies, firewalls) from this host",
        )
    if status == 404:
        return (
            "upstream_error",
            f"SAI knows no template {model.template_id!r}: check SAI_TEMPLATE_ID or "
            f"[models.{model.name}] template_id, and that {name} may use it",
        )
    if status == 403:
        return "upstream_error", f"SAI refused {name} for this template: ask for access to it"
    if isinstance(status, int) and status >= 500:
        return "upstream_error", f"SAI failed with HTTP {status}: check SAI's status and retry"
    override = f" or model_override {model.model_override!r}" if model.model_override else ""
    return (
        "upstream_error",
        f"SAI answered HTTP {status}: check SAI_URL and the template{override}",
    )


def _display_url(settings: Settings) -> str:
    """Return SAI's URL without any user information it may carry."""
    return str(settings.sai_url.with_user(None))


async def probe(
    client: SaiClient,
    settings: Settings,
    credential: Credential,
    model: ModelConfig,
) -> Probe:
    """Execute the model's template once with the credential; never raise for SAI's answer."""
    call = client.new_call(model, probe_payload(), credential, f"check-{secrets.token_hex(4)}")
    started = time.monotonic()
    upstream_model = None
    chars = 0
    failure: UpstreamError | None = None
    try:
        answer = await client.fetch(call)
    except UpstreamError as error:
        failure = error
    else:
        upstream_model = answer.headers.get("model")
        chars = len(answer.text)
    latency_ms = round((time.monotonic() - started) * 1000, 1)
    status: int | str = call.last_status if call.last_status is not None else "connection_error"
    if failure is None:
        outcome, advice = "ok", ""
    elif status == 200:  # SAI said yes, then the body stalled or broke off
        outcome = failure.code or "upstream_error"
        advice = f"SAI's answer did not arrive whole ({failure.message}): check SAI's status"
    else:
        outcome, advice = advice_for(credential, model, status, settings)
    return Probe(
        credential=credential.label,
        model=model.name,
        template=model.template_id,
        status=status,
        latency_ms=latency_ms,
        outcome=outcome,
        advice=advice,
        upstream_model=upstream_model,
        answer_chars=chars,
    )


async def run_probes(
    settings: Settings,
    *,
    probe_timeout: float = DEFAULT_TIMEOUT,
    on_probe: Callable[[Probe], None] | None = None,
) -> list[Probe]:
    """Probe every model with every system credential, one at a time, in a fixed order.

    One at a time: a pre-deploy check should not itself trip SAI's rate limits.
    """
    # One attempt per probe: a retry or a fallback would hide which credential failed.
    settings = dataclasses.replace(
        settings, max_retries=0, request_timeout=min(settings.request_timeout, probe_timeout)
    )
    no_fallback = AuthChain([], None)
    results: list[Probe] = []
    async with aiohttp.ClientSession(
        timeout=client_timeout(settings), cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        client = SaiClient(session, settings, no_fallback, Metrics())
        for credential in system_credentials(settings):
            for model in settings.models.values():
                result = await probe(client, settings, credential, model)
                results.append(result)
                if on_probe is not None:
                    on_probe(result)
    return results


class _Scrubbed:
    """A text stream that masks every configured secret before writing, as the logs do."""

    def __init__(self, out: IO[str], masker: Masker) -> None:
        self._out = out
        self._masker = masker

    def line(self, text: str) -> None:
        self._out.write(self._masker.mask_unique(text) + "\n")
        self._out.flush()


def format_probe(result: Probe) -> str:
    """Return one human line for a probe."""
    verdict = "PASS" if result.ok else "FAIL"
    status = f"HTTP {result.status}" if isinstance(result.status, int) else str(result.status)
    line = (
        f"{verdict}  {result.credential:<10}  model {result.model}  template {result.template}  "
        f"{status}  {result.latency_ms:.0f} ms"
    )
    if result.ok and result.upstream_model:
        line += f"  (SAI model {result.upstream_model})"
    if not result.ok:
        line += f"  -> {result.advice}"
    return line


def report(settings: Settings, results: Sequence[Probe]) -> dict[str, Any]:
    """Return the machine-readable report."""
    passed = sum(1 for result in results if result.ok)
    return {
        "ok": bool(results) and passed == len(results),
        "version": __version__,
        "sai_url": _display_url(settings),
        "models": list(settings.models),
        "credentials": [credential.label for credential in system_credentials(settings)],
        "probes": [{**dataclasses.asdict(result), "ok": result.ok} for result in results],
        "summary": {"probes": len(results), "passed": passed, "failed": len(results) - passed},
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saiproxy check",
        description="Validate the configuration as startup does, then execute each model's "
        "template once with each system credential (SAI_KEY, SAI_COOKIE). "
        "Exit 0 when every probe passes, 1 when one fails, 2 on a configuration error.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON report")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds each probe may wait for SAI (default {DEFAULT_TIMEOUT:g}, "
        "capped by REQUEST_TIMEOUT)",
    )
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> int:
    """Run the check; return the exit status."""
    args = _parser().parse_args(argv)
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        settings = load_settings(os.environ if env is None else env)
        AuthChain.from_settings(settings)  # as create_app does at startup
    except SettingsError as error:
        err.write(f"saiproxy: configuration error: {error}\n")
        return 2
    # The client's own log lines (rejected credential, failed attempt) repeat what
    # the probe lines say; without a handler Python would print them bare to stderr.
    root_logger.addHandler(logging.NullHandler())
    writer = _Scrubbed(out, Masker(secret.reveal() for secret in settings.secrets()))
    credentials = system_credentials(settings)
    if not args.json:
        writer.line(
            f"saiproxy check {__version__}: SAI {_display_url(settings)}, "
            f"{len(settings.models)} model(s), credentials "
            f"{', '.join(c.label for c in credentials)}"
        )

    def show(result: Probe) -> None:
        if not args.json:
            writer.line(format_probe(result))

    results = asyncio.run(run_probes(settings, probe_timeout=args.timeout, on_probe=show))
    document = report(settings, results)
    if args.json:
        writer.line(json.dumps(document, indent=2))
    else:
        summary = document["summary"]
        verdict = "all passed" if document["ok"] else f"{summary['failed']} failed"
        writer.line(f"summary: {summary['passed']} of {summary['probes']} probes passed, {verdict}")
    return 0 if document["ok"] else 1
