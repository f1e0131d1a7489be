"""The processes a benchmark starts: the fake SAI, and a saiproxy's environment.

Every bench script starts its fake SAI and its proxies the same way; this
module is that one way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.fake_sai import free_port
from bench.valkey import ValkeyServer

__all__ = ["ROOT", "Upstreams", "proxy_env", "start_fake_sai", "stop", "upstreams"]

ROOT = Path(__file__).resolve().parent.parent


def start_fake_sai(port: int, *options: str) -> subprocess.Popen[bytes]:
    """Start ``bench/fake_sai.py`` on ``port`` with ``options`` (e.g. ``--drip-chunks 10``).

    Its output is discarded; the caller stops it.
    """
    return subprocess.Popen(
        [sys.executable, "-m", "bench.fake_sai", "--port", str(port), *options],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def proxy_env(
    sai_port: int, workdir: Path, extra: Mapping[str, str] | None = None, *, code: Path = ROOT
) -> dict[str, str]:
    """Return a saiproxy's environment: this one's, pointed at the fake SAI, plus ``extra``.

    ``code`` is the checkout whose config/saiproxy.toml it reads. ``PORT``
    and the log level come in ``extra`` where a scenario sets them.
    """
    return {
        **os.environ,
        "SAI_URL": f"http://127.0.0.1:{sai_port}",
        "SAI_KEY": "bench-key",
        "SAI_TEMPLATE_ID": "bench",
        "HOST": "127.0.0.1",
        "LOG_DIR": str(workdir / "logs"),
        "SHUTDOWN_DELAY": "0",
        "SAIPROXY_CONFIG": str(code / "config" / "saiproxy.toml"),
        **(extra or {}),
    }


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop ``process``: SIGTERM, then SIGKILL if it is still there after 40 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True)
class Upstreams:
    """What a bench's proxies talk to: a work folder, a Valkey server, the fake SAI's port."""

    workdir: Path
    valkey: ValkeyServer
    sai_port: int


@contextmanager
def upstreams(name: str) -> Iterator[Upstreams]:
    """Start a Valkey server and the fake SAI in a fresh work folder; stop both after."""
    with tempfile.TemporaryDirectory(prefix=f"saiproxy-bench-{name}-") as tmp:
        workdir = Path(tmp)
        valkey = ValkeyServer(workdir / "valkey")
        valkey.start()
        sai_port = free_port()
        sai = start_fake_sai(sai_port)
        try:
            yield Upstreams(workdir, valkey, sai_port)
        finally:
            stop(sai)
            valkey.stop()
