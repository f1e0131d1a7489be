"""What a log line looks like: JSON (the default) or text, one line per record.

Everything that reads the lines back (``saiproxy trace``, the tests, an
operator's ``grep``) takes the file names, the time format and the field
spacing from here.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any, Final

FILE_PREFIX: Final = "saiproxy-"
FILE_GLOB: Final = f"{FILE_PREFIX}*.log*"  # every process's file, rotated ones included
TIME_FORMAT: Final = "%Y-%m-%d %H:%M:%S"  # then ",mmm": 2026-11-26 21:04:51,123
LOGGER_PREFIX: Final = __name__.partition(".")[0] + "."  # "saiproxy."
# The message of the line closing each completion request: its fields are the
# request's summary (status, outcome, latency, tokens).
RESPONSE_FINISHED: Final = "response finished"

# A text field longer than this is cut, with a marker saying how much went: a
# client must not be able to write megabytes per line (and so rotate every
# file away) through a path, a model name or any other string it sends.
FIELD_LIMIT: Final = 512
_CONTAINER_LIMIT: Final = 64  # items of a list or dict field kept in a line

_STANDARD_ATTRS: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def log_file_name() -> str:
    """Return this process's log file name: host and pid make it unique."""
    return f"{FILE_PREFIX}{socket.gethostname()}-{os.getpid()}.log"


def request_tag(request_id: str) -> str:
    """Return the prefix a request's messages carry: ``[a1b2c3d4] ``."""
    return f"[{request_id}] "


def parse_time(value: Any) -> datetime | None:
    """Return the moment a line's ``time`` field names, or None."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.strptime(value, f"{TIME_FORMAT},%f")
    except ValueError:
        return None


_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, default=str)


def serialise(data: dict[str, Any]) -> str:
    """Serialise one log line with one C encoder made once (``json.dumps`` builds one per call).

    Its ``"key": value`` spacing matters: ``grep '"request_id": "a1b2c3d4"'``
    finds a request's lines (orjson, faster, writes no spaces).
    """
    return _ENCODER.encode(data)


def json_field(key: str, value: Any) -> str:
    """Return ``"key": value`` exactly as a JSON line spells it, for a quick text search."""
    return serialise({key: value})[1:-1]


def bound(text: str, limit: int = FIELD_LIMIT) -> str:
    """Return ``text`` cut to ``limit`` characters, with a marker when cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more chars]"


_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(char: str) -> str:
    known = _ESCAPES.get(char)
    if known is not None:
        return known
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """Return ``text`` with every non-printable character escaped (``\\n``, ``\\x1b``).

    Text lines are read by people in terminals: a raw newline would forge a
    line, an escape sequence would drive the terminal.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape_char(char) for char in text)


def _bound_value(value: Any) -> Any:
    """Return a list or dict field with its strings and its length bounded."""
    if isinstance(value, str):
        return bound(value)
    if isinstance(value, dict):
        items = list(value.items())
        bounded: Any = {
            bound(str(key)): _bound_value(item) for key, item in items[:_CONTAINER_LIMIT]
        }
        if len(items) > _CONTAINER_LIMIT:
            bounded["..."] = f"{len(items) - _CONTAINER_LIMIT} more items"
        return bounded
    if isinstance(value, (list, tuple)):
        bounded = [_bound_value(item) for item in value[:_CONTAINER_LIMIT]]
        if len(value) > _CONTAINER_LIMIT:
            bounded.append(f"...[{len(value) - _CONTAINER_LIMIT} more items]")
        return bounded
    return value


def extras(record: logging.LogRecord) -> Iterator[tuple[str, Any]]:
    """Yield a record's own fields: what ``extra=`` and saiproxy added to it."""
    return ((key, value) for key, value in record.__dict__.items() if key not in _STANDARD_ATTRS)


def _unmasked(text: str) -> str:
    return text


class _Clock:
    """Log time text (:data:`TIME_FORMAT`, then milliseconds), seconds made once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._stamp = ""

    def text(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            # Racing threads at worst both make the same text: no lock needed.
            self._stamp = time.strftime(TIME_FORMAT, time.localtime(second))
            self._second = second
        return f"{self._stamp},{int((created - second) * 1000):03d}"


class TextFormatter(logging.Formatter):
    """Plain lines: time, level, logger, message, then the structured fields as k=v.

    ``mask`` is applied to every text field on its way out; then every field
    and the message are bounded (:data:`FIELD_LIMIT`) and their control
    characters escaped, so one record is always one line.
    """

    def __init__(self, mask: Callable[[str], str] = _unmasked) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self.mask = mask
        self._clock = _Clock()

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self._clock.text(record.created)

    def format_event(self, name: str, message: str, created: float, fields: dict[str, Any]) -> str:
        """Format an INFO lifecycle line without a LogRecord (see :func:`~saiproxy.logs.event`)."""
        message = escape_controls(bound(message))
        return f"{self._clock.text(created)} INFO {name} {message} {self._pairs(fields.items())}"

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        record.message = escape_controls(bound(message))
        try:
            return super().formatMessage(record)
        finally:
            record.message = message

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = self._pairs(extras(record))
        return f"{line} {fields}" if fields else line

    def _pairs(self, items: Iterable[tuple[str, Any]]) -> str:
        mask = self.mask
        return " ".join(
            f"{key}={escape_controls(bound(mask(value) if isinstance(value, str) else str(value)))}"
            for key, value in items
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the record's own fields.

    Text fields are masked with ``mask`` and bounded (:data:`FIELD_LIMIT`;
    JSON escapes control characters). The dict is built directly and
    serialised by one encoder made once (:func:`serialise`); the time text is
    made once per second.
    """

    def __init__(self, mask: Callable[[str], str] = _unmasked) -> None:
        super().__init__()
        self.mask = mask
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        data = self._data(
            record.created, record.levelname, record.name, record.getMessage(), extras(record)
        )
        if record.exc_text:  # made (and masked) by the handler
            data["exc_info"] = record.exc_text
        if record.stack_info:
            data["stack_info"] = self.formatStack(record.stack_info)
        return serialise(data)

    def format_event(self, name: str, message: str, created: float, fields: dict[str, Any]) -> str:
        """Format an INFO lifecycle line without a LogRecord (see :func:`~saiproxy.logs.event`)."""
        return serialise(self._data(created, "INFO", name, message, fields.items()))

    def _data(
        self, created: float, level: str, name: str, message: str,
        fields: Iterable[tuple[str, Any]],
    ) -> dict[str, Any]:  # fmt: skip
        mask = self.mask
        data: dict[str, Any] = {
            "time": self._clock.text(created),
            "level": level,
            "logger": name,
            "message": bound(message),
        }
        for key, value in fields:
            if type(value) is str:
                value = mask(value)
                if len(value) > FIELD_LIMIT:
                    value = bound(value)
            elif isinstance(value, (list, tuple, dict)):
                value = _bound_value(value)
            data[key] = value
        return data


def make_formatter(
    fmt: str, mask: Callable[[str], str] = _unmasked
) -> TextFormatter | JsonFormatter:
    """Return the JSON (default) or text formatter; ``mask`` cleans every text field."""
    return TextFormatter(mask) if fmt == "text" else JsonFormatter(mask)
