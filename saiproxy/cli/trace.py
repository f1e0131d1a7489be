"""``saiproxy trace <request-id> [FILES...]``: one request's timeline from JSON logs.

Reads any number of files (every replica's, every rotated one), keeps the
lines of that request, orders them by time and prints them with the figures
a person looks for: latency, time to first byte, tokens.
"""

from __future__ import annotations

import json
import stat
import sys
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Final, TextIO

from ..base.settings import SettingsError, setting
from ..logs import (
    FILE_GLOB,
    LOGGER_PREFIX,
    RESPONSE_FINISHED,
    escape_controls,
    json_field,
    parse_time,
    request_tag,
)

__all__ = [
    "MAX_LINE_CHARS",
    "default_files",
    "find",
    "main",
    "render",
]

# Longer lines are skipped: saiproxy's own are far shorter (fields are cut), and
# a file that is one endless line must not be read into memory whole.
MAX_LINE_CHARS: Final = 1024 * 1024
_SHOWN_FIRST: Final = ("time", "level", "logger", "message", "request_id", "taskName")
_SUMMARY: Final = (
    ("status", "status {}"),
    ("outcome", "outcome {}"),
    ("finish_reason", "finish {}"),
    ("latency_ms", "latency {} ms"),
    ("ttfb_ms", "first byte {} ms"),
    ("prompt_tokens", "prompt {} tok"),
    ("completion_tokens", "completion {} tok"),
    ("tokens_per_second", "{} tok/s"),
    ("model", "model {}"),
)


def default_files(log_dir: str) -> list[Path]:
    """Return every saiproxy log file in ``log_dir``, rotated ones included."""
    return sorted(Path(log_dir).glob(FILE_GLOB))


def _lines(handle: TextIO) -> Iterator[str]:
    """Yield the file's lines; a line longer than MAX_LINE_CHARS is skipped, never held whole."""
    while line := handle.readline(MAX_LINE_CHARS):
        if len(line) == MAX_LINE_CHARS and not line.endswith("\n"):
            while (rest := handle.readline(MAX_LINE_CHARS)) and not rest.endswith("\n"):
                pass
            continue
        yield line


def find(request_id: str, files: Iterable[Path]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield (file, record) for every JSON line of the request, from regular files only."""
    needle = json_field("request_id", request_id)
    for path in files:
        try:
            # A device or a FIFO would be read forever or block: only regular files.
            if not stat.S_ISREG(path.stat().st_mode):
                print(f"saiproxy trace: skipping {path}: not a regular file", file=sys.stderr)
                continue
            handle = path.open(encoding="utf-8", errors="replace")
        except OSError as exc:
            print(f"saiproxy trace: cannot read {path}: {exc.strerror}", file=sys.stderr)
            continue
        with handle:
            for line in _lines(handle):
                if needle not in line:
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("request_id") == request_id:
                    yield path, record


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _fields(record: dict[str, Any]) -> str:
    return " ".join(
        escape_controls(f"{key}={_text(value)}")
        for key, value in record.items()
        if key not in _SHOWN_FIRST and value is not None
    )


def render(request_id: str, found: list[tuple[Path, dict[str, Any]]], out: TextIO) -> None:
    """Print the timeline of one request."""
    found.sort(key=lambda item: parse_time(item[1].get("time")) or datetime.min)
    start = parse_time(found[0][1].get("time"))
    sources = sorted({path.name for path, _ in found})
    print(f"request {request_id}: {len(found)} lines from {', '.join(sources)}", file=out)
    # A traced request's lines carry its trace ID: the way into the trace backend.
    trace_ids = sorted({t for _, r in found if isinstance(t := r.get("trace_id"), str)})
    if trace_ids:
        print(escape_controls(f"trace id: {', '.join(trace_ids)}"), file=out)
    tag = request_tag(request_id)
    summary: dict[str, Any] = {}
    for _, record in found:
        moment = parse_time(record.get("time"))
        offset = (moment - start).total_seconds() * 1000 if moment and start else 0.0
        # Any field may hold any JSON value (a line may not even be saiproxy's).
        message = _text(record.get("message", "")).removeprefix(tag)
        logger = _text(record.get("logger", "")).removeprefix(LOGGER_PREFIX)
        level = _text(record.get("level", "?"))
        # Lines are JSON-decoded: a raw newline or terminal escape sent by a
        # client would reach the terminal unless escaped here.
        print(
            escape_controls(
                f"  {_text(record.get('time', '?'))}  +{offset:8.1f} ms  {level:<7} "
                f"{logger:<8}  {message}"
            ),
            file=out,
        )
        extra = _fields(record)
        if extra:
            print(f"{'':44}{extra}", file=out)
        if message == RESPONSE_FINISHED:
            summary = record
    if summary:
        parts = [
            label.format(summary[key]) for key, label in _SUMMARY if summary.get(key) is not None
        ]
        print(escape_controls("summary: " + ", ".join(parts)), file=out)


def main(argv: list[str], out: TextIO = sys.stdout) -> int:
    """Run the trace command; return the exit status."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="saiproxy trace", description="Print one request's timeline from saiproxy's JSON logs."
    )
    parser.add_argument("request_id")
    parser.add_argument(
        "files",
        nargs="*",
        type=Path,
        help="log files (default: every file in LOG_DIR, or log_dir in the config file)",
    )
    args = parser.parse_args(argv)
    try:
        files = args.files or default_files(setting("log_dir"))
    except SettingsError as error:
        print(f"saiproxy trace: configuration error: {error}", file=sys.stderr)
        return 2
    if not files:
        print("saiproxy trace: no log files found", file=sys.stderr)
        return 1
    found = list(find(args.request_id, files))
    if not found:
        print(f"saiproxy trace: no lines for request {args.request_id}", file=sys.stderr)
        return 1
    render(args.request_id, found, out)
    return 0
