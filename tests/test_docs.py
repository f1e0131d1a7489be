"""The docs say what the code does: facts checked against their one source."""

from __future__ import annotations

import re

from saiproxy.limits.identity import API_KEY_HEADER
from saiproxy.web.middlewares import OPEN_PATHS

from .conftest import ROOT


def _paragraph(page: str, start: str) -> str:
    """Return the paragraph of ``page`` that contains ``start``."""
    text = (ROOT / page).read_text(encoding="utf-8")
    found = next(p for p in re.split(r"\n\s*\n", text) if start in p)
    return " ".join(found.split())


def test_proxy_access_names_every_open_path_and_both_headers() -> None:
    for page in ("README.md", "docs/auth.md"):
        paragraph = _paragraph(page, "PROXY_API_KEYS=key1,key2")
        for path in OPEN_PATHS:
            assert f"`{path}`" in paragraph, (page, path)
        assert "Authorization: Bearer" in paragraph, page
        assert f"{API_KEY_HEADER}: <key>" in paragraph, page
