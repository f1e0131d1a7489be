"""What a log line looks like: JSON (the default) or text, one line per record.

Everything that reads the lines back (``saiproxy trace``, the tests, an
operator's ``grep``) takes the file names, the time format and the field
spacing from here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any, Final

import orjson

__all__ = [
    "FIELD_LIMIT",
    "FILE_GLOB",
    "FILE_PREFIX",
    "LOGGER_PREFIX",
    "RESPONSE_FINISHED",
    "TIME_FORMAT",
    "JsonFormatter",
    "TextFormatter",
    "bound",
    "escape_controls",
    "extras",
    "json_field",
    "log_file_name",
    "make_formatter",
    "parse_time",
    "request_tag",
    "serialise",
]

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
# json's C encoder, made once: ``JSONEncoder.encode`` builds a new one on every
# call. Same separators and options as _ENCODER; None where json has no C part.
_make_c_encoder = getattr(json.encoder, "c_make_encoder", None)
_C_ENCODE: Final[Callable[[Any, int], Iterable[str]] | None] = (
    _make_c_encoder(None, str, json.encoder.encode_basestring, None, ": ", ", ", False, False, True)
    if _make_c_encoder is not None
    else None
)
_json_string: Final[Callable[[str], str]] = json.encoder.encode_basestring


def serialise(data: dict[str, Any]) -> str:
    """Serialise one log line with one C encoder made once.

    Its ``"key": value`` spacing matters: ``grep '"request_id": "a1b2c3d4"'``
    finds a request's lines (orjson, faster, writes none; see ``JsonFormatter._plain``).
    """
    if _C_ENCODE is None:
        return _ENCODER.encode(data)
    return "".join(_C_ENCODE(data, 0))


_HEAD_KEYS: Final = frozenset({"time", "level", "logger", "message"})  # every JSON line's first
_CONTAINERS: Final = (list, tuple, dict)
# What a dict among the fields of a lifecycle line written at once may hold.
_NESTED_TYPES: Final = frozenset({str, int, bool, type(None)})
# The magnitudes a float has where json (its repr) and orjson write it alike (0 too).
_SAME_FLOATS: Final = (1e-4, 1e16)
# Indented, a dict's item takes at least 10 bytes ('\n    "": 0'): one of more than
# _CONTAINER_LIMIT items (65 x 10) makes a text longer than FIELD_LIMIT (512).
_NEXT_ITEM: Final = re.compile(rb",\n *")
_BREAKS: Final = re.compile(rb"\n *")
_SCALARS: Final = (int, bool, float, type(None))


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
    kind = type(value)
    if kind is int or kind is bool or value is None:  # most items: as they are
        return value
    if isinstance(value, str):
        return bound(value)
    if isinstance(value, float) and value - value != 0:  # NaN and infinities are not JSON
        return None
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


_MILLISECONDS: Final = tuple(f",{millis:03d}" for millis in range(1000))


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
        return self._stamp + _MILLISECONDS[int((created - second) * 1000)]


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

    def format_event(
        self, name: str, message: str, created: float, fields: dict[str, Any],
        request_id: str | None = None,
    ) -> str:  # fmt: skip
        """Format an INFO lifecycle line without a LogRecord (see :func:`~saiproxy.logs.event`)."""
        message = escape_controls(bound(message))
        items: Iterable[tuple[str, Any]] = fields.items()
        if request_id is not None and "request_id" not in fields:
            items = (*items, ("request_id", request_id))
        return f"{self._clock.text(created)} INFO {name} {message} {self._pairs(items)}"

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

    def format_event(
        self, name: str, message: str, created: float, fields: dict[str, Any],
        request_id: str | None = None,
    ) -> str:  # fmt: skip
        """Format an INFO lifecycle line without a LogRecord (see :func:`~saiproxy.logs.event`).

        The same line :meth:`format` makes of such a record (``request_id``
        last unless ``fields`` has one), assembled around the serialised
        fields: the fixed head is written as text, not encoded field by field.
        """
        if not _HEAD_KEYS.isdisjoint(fields):  # a field that takes the place of one of these
            data = self._data(created, "INFO", name, message, fields.items())
            if request_id is not None and "request_id" not in fields:
                data["request_id"] = request_id
            return serialise(data)
        head = (
            f'{{"time": "{self._clock.text(created)}", "level": "INFO", '
            f'"logger": {_json_string(name)}, "message": {_json_string(bound(message))}'
        )
        tail = "}"
        if request_id is not None and "request_id" not in fields:
            tail = f', "request_id": {_json_string(request_id)}}}'
        if not fields:
            return head + tail
        plain = self._plain(fields)
        if plain is not None:
            return f"{head}, {plain}{tail}"
        return f"{head}, {serialise(self._fields(fields.items()))[1:-1]}{tail}"

    def _plain(self, fields: dict[str, Any]) -> str | None:
        """Return the fields' JSON without its braces when none needs masking or bounding.

        The usual lifecycle line: short texts, ints, floats json and orjson
        spell alike, bools, nulls and a small dict of them (anything else: an
        enum, a list, a date, a subclass, ``5e-05``, gives None, and the
        fields are written one by one). orjson writes them all at once, in its
        indented form, which has json's ``": "`` already: its line breaks and
        indents (never inside a JSON text, where a break is ``\\n``) become
        json's ``", "``. The texts are masked unchanged, all at once; the
        whole JSON is shorter than :data:`FIELD_LIMIT` (so no text is longer,
        and no dict has more items than are kept) and has no escape (the
        texts are written as they are).
        """
        texts: list[str] = []
        for value in fields.values():
            kind = type(value)
            if kind is str:
                texts.append(value)
            elif kind is float:
                if value and not _SAME_FLOATS[0] <= abs(value) < _SAME_FLOATS[1]:
                    return None  # 5e-05, 1e+16, NaN: json and orjson write them otherwise
            elif kind is dict:
                if not _NESTED_TYPES.issuperset(map(type, value.values())):
                    return None
            elif not (kind is int or kind is bool or value is None):
                return None  # an enum, a list, a date, a subclass
        if texts:
            # Each text is masked unchanged when all of them joined are: a secret or a
            # credential header in one would be in the whole (a break ends a match).
            joined = "\n".join(texts)
            if self.mask(joined) != joined:
                return None
        try:
            indented = orjson.dumps(fields, option=orjson.OPT_INDENT_2)
        except orjson.JSONEncodeError:  # an int over 64 bits
            return None
        if len(indented) > FIELD_LIMIT or b"\\" in indented:
            return None
        if b"\n    " in indented:  # a dict among the fields: its own breaks go too
            return _BREAKS.sub(b"", _NEXT_ITEM.sub(b", ", indented[4:-2])).decode()
        return indented[4:-2].replace(b",\n  ", b", ").decode()

    def _data(
        self, created: float, level: str, name: str, message: str,
        fields: Iterable[tuple[str, Any]],
    ) -> dict[str, Any]:  # fmt: skip
        data: dict[str, Any] = {
            "time": self._clock.text(created),
            "level": level,
            "logger": name,
            "message": bound(message),
        }
        data.update(self._fields(fields))
        return data

    def _fields(self, fields: Iterable[tuple[str, Any]]) -> dict[str, Any]:
        """Return the fields with their text masked and every value bounded."""
        mask = self.mask
        data: dict[str, Any] = {}
        for key, value in fields:
            kind = type(value)
            if kind is str:
                value = mask(value)
                if len(value) > FIELD_LIMIT:
                    value = bound(value)
            elif kind is int or value is None or kind is bool:  # most fields: as they are
                pass
            elif kind is float:
                if value - value != 0:  # NaN and infinities are not JSON
                    value = None
            elif kind in _CONTAINERS or (kind not in _SCALARS and isinstance(value, _CONTAINERS)):
                value = _bound_value(value)
            data[key] = value
        return data


def make_formatter(
    fmt: str, mask: Callable[[str], str] = _unmasked
) -> TextFormatter | JsonFormatter:
    """Return the JSON (default) or text formatter; ``mask`` cleans every text field."""
    return TextFormatter(mask) if fmt == "text" else JsonFormatter(mask)
