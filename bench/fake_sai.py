"""The fake SAI for load: saiproxy's fake with a fixed answer, optional delay and drip.

Run it as ``python -m bench.fake_sai --port 9000 --chars 200 --drip-chunks 10
--drip-seconds 2``. It answers every template execution with ``chars``
characters of text, after ``delay`` seconds, in ``drip-chunks`` pieces spread
over ``drip-seconds`` (one piece when 0).
"""

from __future__ import annotations

import argparse
import resource
import socket
import sys

from aiohttp import web

from saiproxy.upstream.fake_sai import FakeSai, Reply


def make_app(chars: int, delay: float, drip_chunks: int, drip_seconds: float) -> web.Application:
    """Return the fake SAI application: saiproxy's fake with one fixed reply, nothing recorded."""
    answer = ("lorem ipsum dolor sit amet " * (chars // 27 + 1))[:chars].encode()
    pieces = max(1, drip_chunks)
    size = -(-len(answer) // pieces)
    chunks: list[str | bytes] = [answer[i : i + size] for i in range(0, len(answer), size)]
    chunks = chunks or [b""]
    gap = drip_seconds / len(chunks) if drip_seconds > 0 else 0.0
    headers = {
        "Content-Type": "text/plain; charset=utf-8",
        "prompttokens": "12",
        "completiontokens": str(max(1, chars // 4)),
        "model": "sai-bench",
    }
    # Each piece follows a gap, the first one included.
    reply = Reply(body=chunks, headers=headers, delay=delay + gap, chunk_delay=gap)
    return FakeSai(default=reply, record=False).app


def free_port() -> int:
    """Return a loopback port that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_nofile() -> None:
    """Raise the open-file limit to the hard limit: thousands of sockets are normal here."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chars", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--drip-chunks", type=int, default=1)
    parser.add_argument("--drip-seconds", type=float, default=0.0)
    args = parser.parse_args(argv)
    raise_nofile()
    app = make_app(args.chars, args.delay, args.drip_chunks, args.drip_seconds)
    print(f"fake SAI on {args.host}:{args.port}", file=sys.stderr, flush=True)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main()
