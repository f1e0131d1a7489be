"""A hostile SAI: a raw asyncio server that answers with protocol-level faults.

aiohttp's server will not send undecodable header bytes, half a status line or
a body that never ends, so this one writes bytes by hand. Queue one action per
expected call (:meth:`HostileSai.script`); each connection reads one request,
records it and plays the next action (then :attr:`HostileSai.default`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

Action = Callable[[asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawRequest:
    """One request as it arrived: request line, headers (lower-case names), body."""

    line: str
    headers: dict[str, str]
    body: bytes


def _head(status: str, headers: list[tuple[str, str | bytes]]) -> bytes:
    lines = [f"HTTP/1.1 {status}".encode()]
    for name, value in headers:
        raw = value if isinstance(value, bytes) else value.encode()
        lines.append(name.encode() + b": " + raw)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def answer(
    body: bytes = b"Hello from SAI",
    *,
    status: str = "200 OK",
    headers: list[tuple[str, str | bytes]] | None = None,
) -> Action:
    """A complete answer; header values may be raw bytes."""

    async def act(writer: asyncio.StreamWriter) -> None:
        writer.write(
            _head(
                status,
                [
                    ("Content-Type", "text/plain"),
                    ("Content-Length", str(len(body))),
                    ("Connection", "close"),
                    *(headers or []),
                ],
            )
            + body
        )
        await writer.drain()

    return act


def redirect(status: int, location: str) -> Action:
    """A redirect to ``location``."""
    return answer(b"moved", status=f"{status} Moved", headers=[("Location", location)])


def gzip_bomb(size: int) -> Action:
    """A 200 whose gzip body inflates to ``size`` zero bytes."""
    return answer(gzip.compress(bytes(size), 9), headers=[("Content-Encoding", "gzip")])


def endless(piece: int = 64 * 1024) -> Action:
    """A 200 whose chunked body never ends (until the reader goes away)."""

    async def act(writer: asyncio.StreamWriter) -> None:
        writer.write(_head("200 OK", [("Transfer-Encoding", "chunked")]))
        chunk = f"{piece:x}\r\n".encode() + b"a" * piece + b"\r\n"
        while not writer.is_closing():
            writer.write(chunk)
            await writer.drain()

    return act


def reset_before_headers() -> Action:
    """Drop the connection without a byte of answer."""

    async def act(writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()

    return act


def reset_mid_headers() -> Action:
    """Send part of the status line and headers, then drop the connection."""

    async def act(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/pl")
        await writer.drain()
        writer.transport.abort()

    return act


def reset_mid_body() -> Action:
    """Promise 1000 bytes, send 10, drop the connection."""

    async def act(writer: asyncio.StreamWriter) -> None:
        writer.write(_head("200 OK", [("Content-Length", "1000")]) + b"0123456789")
        await writer.drain()
        writer.transport.abort()

    return act


class HostileSai:
    """The server: ``url`` once started, ``received`` lists every request that arrived."""

    def __init__(self) -> None:
        self.actions: deque[Action] = deque()
        self.default: Action = answer()
        self.received: list[RawRequest] = []
        self.url = ""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def script(self, *actions: Action) -> None:
        """Play these actions for the next calls, in order."""
        self.actions.extend(actions)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()  # an endless answer ends here
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                request = await self._read(reader)
                if request is None:
                    return
                self.received.append(request)
                action = self.actions.popleft() if self.actions else self.default
                await action(writer)
                if writer.transport.is_closing():
                    return
                writer.close()
                return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> RawRequest | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        line, *rest = head.decode("latin-1").split("\r\n")
        headers = {}
        for header in rest:
            if header:
                name, _, value = header.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return RawRequest(line, headers, body)


async def hostile_server() -> AsyncIterator[HostileSai]:
    """Start a HostileSai for a fixture; close it afterwards."""
    server = HostileSai()
    await server.start()
    try:
        yield server
    finally:
        await server.close()
