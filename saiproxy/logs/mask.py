"""Masking: no credential value ever reaches a log line."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Final

from .format import request_tag

__all__ = ["MASK", "MIN_SECRET_LENGTH", "Masker"]

# Header-like "name: value" or "name=value" pairs whose value is a credential.
_SENSITIVE: Final = re.compile(
    r"(?i)\b(authorization|x-api-key|cookie|user[_-]api[_-]key)([\"']?\s*[:=]\s*[\"']?)"
    r"([^\"'\n,}]+)"
)
MASK: Final = "***"
# A shorter value is not masked: replacing every "k" or "on" in a line would
# mangle it and hide nothing (a value that short is no secret).
MIN_SECRET_LENGTH: Final = 4
_CACHE_LIMIT: Final = 4096


class Masker:
    """Replace configured secrets and credential-looking values with ``***``.

    The one masker: log lines and the command line's output (``saiproxy check``).
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret containing another is masked whole.
        self._secrets = sorted(
            {s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True
        )
        self._masked: dict[str, str] = {}

    def tag(self, record: logging.LogRecord) -> None:
        """Prefix the message with the record's ``[request id]`` and mask it (not the fields)."""
        message = record.getMessage()
        request_id = getattr(record, "request_id", None)
        if request_id:
            tag = request_tag(request_id)
            if not message.startswith(tag):
                message = tag + message
        record.msg = self.mask(message)
        record.args = None

    def mask(self, text: str) -> str:
        """Return ``text`` with credential values replaced by ``***``."""
        # Short field values repeat line after line ("ok", "SAI_KEY", paths, models).
        # Unique ones (request IDs, messages) fill the cache too: a full cache
        # starts afresh, and the values that repeat are back within a few lines.
        masked = self._masked.get(text)
        if masked is None:
            masked = self._mask(text)
            if len(text) <= 64:
                if len(self._masked) >= _CACHE_LIMIT:
                    self._masked.clear()
                self._masked[text] = masked
        return masked

    def mask_unique(self, text: str) -> str:
        """Return ``text`` masked, for a value that will not come again (kept out of the cache)."""
        return self._mask(text)

    def cached(self) -> int:
        """Return how many texts the cache holds (it stays bounded)."""
        return len(self._masked)

    def _mask(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        # A credential header needs ":" or "="; most values have neither.
        if (":" in text or "=" in text) and _may_name(text) and _SENSITIVE.search(text):
            text = _SENSITIVE.sub(lambda m: f"{m[1]}{m[2]}{MASK}", text)
        return text


def _may_name(text: str) -> bool:
    """Whether ``text`` may hold a name _SENSITIVE matches ("api" of ``x-api-key`` and
    ``user_api_key``, ``authorization``, ``cookie``): three substring searches rule most
    texts out at a fraction of the case-blind regex's cost. Only ASCII is
    ruled out so (``re``'s case folding matches more than ``str.lower``)."""
    if not text.isascii():
        return True
    lowered = text.lower()
    return "api" in lowered or "authorization" in lowered or "cookie" in lowered
