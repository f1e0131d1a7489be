"""``GET /``: a page for people told to "use the proxy at ...": what it is, how to connect.

Plain server-rendered HTML (no script, no build step): the proxy's health,
its models, and copy-ready settings for each client family with this
server's own base URL. It says whether a proxy key is needed and never
shows one, nor any other secret: nothing on the page is read from a secret.
"""

from __future__ import annotations

import html
import re
import socket
from functools import cache
from importlib import resources
from string import Template
from typing import Final

from aiohttp import hdrs, web

from .. import __version__
from ..base.keys import SETTINGS, STATE
from ..base.settings import Settings

__all__ = [
    "KEY_VARIABLE",
    "base_url",
    "landing",
    "render_landing",
]

# A host name, IPv4 or bracketed IPv6 address, with an optional port: anything
# else in Host or X-Forwarded-Host is not echoed back into the page.
_HOST: Final = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
    r"[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)
KEY_VARIABLE: Final = "SAIPROXY_API_KEY"
# The page is assembled per request from forwarded headers: no shared cache may keep it.
_HEADERS: Final = {
    hdrs.CACHE_CONTROL: "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _first(value: str | None) -> str:
    """Return the first entry of a header a chain of proxies may have appended to."""
    return (value or "").split(",")[0].strip()


def base_url(request: web.BaseRequest) -> str:
    """Return the URL clients reach this server at: scheme and host, no trailing slash.

    ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` (set by a TLS-terminating
    proxy or ingress) are honoured only when they hold a plain ``http``/``https``
    and a well-formed host; the result is for display and links, never for
    access decisions.
    """
    scheme = request.scheme
    forwarded_proto = _first(request.headers.get("X-Forwarded-Proto")).lower()
    if forwarded_proto in ("http", "https"):
        scheme = forwarded_proto
    for candidate in (_first(request.headers.get("X-Forwarded-Host")), request.host):
        if candidate and _HOST.fullmatch(candidate):
            return f"{scheme}://{candidate}"
    return f"{scheme}://localhost"


@cache
def _template() -> Template:
    text = resources.files(__package__).joinpath("static/landing.html").read_text("utf-8")
    return Template(text)


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _access(settings: Settings) -> tuple[str, str]:
    """Return how a client authenticates to the proxy (escaped HTML) and the key to show."""
    if settings.proxy_api_keys:
        return (
            "required: send <code>Authorization: Bearer &lt;key&gt;</code> "
            "(Anthropic clients may send <code>x-api-key</code>). Ask the operators for a key.",
            "<your saiproxy key>",
        )
    if "bearer" in settings.auth_chain:
        return (
            "not needed: the API key you send (<code>Authorization: Bearer</code>) is used as "
            "<strong>your own SAI key</strong>.",
            "<your SAI key>",
        )
    return (
        "not needed. SDKs insist on some key: any non-empty value works.",
        "unused",
    )


def _credential(settings: Settings) -> str:
    """Return which SAI credential answers, in words (names of settings, never values)."""
    shared = [
        name
        for name, handler, secret in (
            ("SAI_KEY", "system_key", settings.sai_key),
            ("SAI_COOKIE", "system_cookie", settings.sai_cookie),
        )
        if handler in settings.auth_chain and secret is not None
    ]
    parts = []
    if shared:
        parts.append(f"the proxy's shared credential ({' then '.join(shared)}) by default.")
    else:
        parts.append("no shared credential: every request needs your own SAI key.")
    if "header" in settings.auth_chain:
        parts.append(
            "To use your own SAI key, send the header <code>user-api-key: &lt;your SAI "
            "key&gt;</code>."
        )
    if "metadata" in settings.auth_chain:
        parts.append("Clients of the old LiteLLM setup may keep sending it as metadata.")
    return " ".join(parts)


def _error_mode(settings: Settings) -> str:
    if settings.error_mode == "http":
        return (
            "returned as HTTP errors (401, 429, 502, 504 ...) in each API's error shape, so "
            "SDKs can retry."
        )
    return (
        "explained in the answer's text, so a chat user reads the reason; the header "
        "<code>X-Saiproxy-Error</code> carries the code."
    )


def _models(settings: Settings) -> tuple[str, str]:
    items = []
    for name in settings.models:
        suffix = " <span class='muted'>(default)</span>" if name == settings.default_model else ""
        items.append(f"<li><code>{_e(name)}</code>{suffix}</li>")
    default = f"<code>{_e(settings.default_model)}</code>"
    if settings.strict_models:
        rule = "Ask for one of these names; any other model name is refused (404)."
    else:
        rule = f"Any other model name is answered by {default}, so client defaults work as is."
    return "\n".join(items), rule


def _snippets(settings: Settings, base: str, key: str, key_required: bool) -> dict[str, str]:
    model = settings.default_model
    v1 = f"{base}/v1"
    openai_env = f'export OPENAI_BASE_URL="{v1}"\nexport OPENAI_API_KEY="{key}"'
    openai_python = (
        "from openai import OpenAI\n\n"
        f'client = OpenAI(base_url="{v1}", api_key="{key}")\n'
        "answer = client.chat.completions.create(\n"
        f'    model="{model}", messages=[{{"role": "user", "content": "Hello"}}]\n'
        ")\n"
        "print(answer.choices[0].message.content)"
    )
    auth = f' \\\n  -H "Authorization: Bearer {key}"' if key_required else ""
    curl = (
        f"curl {v1}/chat/completions{auth} \\\n"
        '  -H "Content-Type: application/json" \\\n'
        f'  -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}\''
    )
    anthropic_env = (
        f'export ANTHROPIC_BASE_URL="{base}"\n'
        f'export ANTHROPIC_AUTH_TOKEN="{key}"   # sent as Authorization: Bearer\n'
        f'export ANTHROPIC_MODEL="{model}"'
    )
    if "header" in settings.auth_chain:
        anthropic_env += (
            '\n# optional, your own SAI key:\n# export ANTHROPIC_CUSTOM_HEADERS="user-api-key: '
            '<your SAI key>"'
        )
    codex_lines = [
        f'model = "{model}"',
        'model_provider = "saiproxy"',
        "",
        "[model_providers.saiproxy]",
        'name = "saiproxy"',
        f'base_url = "{v1}"',
        'wire_api = "responses"',
    ]
    if key_required or "bearer" in settings.auth_chain:
        codex_lines.append(f'env_key = "{KEY_VARIABLE}"')
    if "header" in settings.auth_chain:
        codex_lines.append(
            "# optional, your own SAI key from $SAI_API_KEY:\n"
            '# env_http_headers = { "user-api-key" = "SAI_API_KEY" }'
        )
    snippets = {
        "openai_env": openai_env,
        "openai_python": openai_python,
        "curl": curl,
        "anthropic_env": anthropic_env,
        "codex_toml": "\n".join(codex_lines),
    }
    return {name: _e(text) for name, text in snippets.items()}


def render_landing(settings: Settings, base: str, ready: bool) -> str:
    """Return the page for a server reached at ``base``."""
    access, key = _access(settings)
    key_required = bool(settings.proxy_api_keys)
    models, model_rule = _models(settings)
    if key_required or "bearer" in settings.auth_chain:
        codex_key = (
            f'<p>then <code>export {KEY_VARIABLE}="{_e(key)}"</code> before starting '
            "<code>codex</code>.</p>"
        )
    else:
        codex_key = "<p>No key is needed: leave <code>env_key</code> out.</p>"
    host = base.partition("://")[2]
    return _template().substitute(
        version=_e(__version__),
        host=_e(host),
        base_url=_e(f"{base}/v1"),
        anthropic_base=_e(base),
        health=f"ready ({_e(socket.gethostname())})" if ready else "shutting down",
        health_class="ok" if ready else "bad",
        access=access,
        credential=_credential(settings),
        error_mode=_error_mode(settings),
        models=models,
        model_rule=model_rule,
        codex_key=codex_key,
        **_snippets(settings, base, key, key_required),
    )


async def landing(request: web.Request) -> web.Response:
    """Serve the landing page."""
    page = render_landing(request.app[SETTINGS], base_url(request), request.app[STATE].ready)
    return web.Response(text=page, content_type="text/html", charset="utf-8", headers=_HEADERS)
