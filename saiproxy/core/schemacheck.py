"""Judging a structured-output answer, in a process of its own, with a deadline.

A schema is the client's code: ``uniqueItems`` over thousands of objects is
quadratic, a ``pattern`` such as ``^(a+)+$`` backtracks exponentially, and
Python's regular expressions never release the GIL. Run on the event loop (or
in a thread) either would stall every other request of the process. So one
child process per saiproxy process validates, one answer at a time; an answer
not judged within SCHEMA_CHECK_TIMEOUT (waiting included) is taken as it is,
"not validated", and the child is killed if it was the one busy, so a runaway
check never piles up. The child is started on first use.

References resolve within the client's schema only: the registry refuses
every retrieval (no URL, no file), and the request was refused at parse time
already if it named one (:func:`saiproxy.core.bounds.check_output_schema`).

The whole judgement happens there: the code fence stripped, the JSON parsed
(a 20 MB fenced answer took 0.6 s in the fence's regular expression and
0.3 s to parse), an object required when there is no schema, the schema
followed when there is one.

Frames on the pipes: 4-byte big-endian length, then the bytes. A request is
two frames, the schema's JSON (``null``: any object) and the answer's text as
SAI wrote it; the reply is one frame of JSON, ``null`` (valid), a string (the
problem), or ``{"unchecked": reason}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import struct
import sys
from pathlib import Path
from typing import Any, Final

import orjson

from ..base.log import schema_logger as log

__all__ = ["FENCED", "SchemaChecker", "check", "judge", "strip_fence"]


_LENGTH: Final = struct.Struct(">I")
# A whole answer in a code fence (```json ... ```): what is inside.
FENCED: Final = re.compile(r"\A\s*```[A-Za-z0-9_-]*[ \t]*\n?(.*?)\n?[ \t]*```\s*\Z", re.S)
_MODULE: Final = "saiproxy.core.schemacheck"
# The child runs this package, wherever it is imported from (a checkout, tests).
_PACKAGE_ROOT: Final = str(Path(__file__).resolve().parent.parent.parent)


class SchemaChecker:
    """The process's schema checker: one child, one check at a time, each within a deadline."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._child: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def problem(self, answer: str, schema: dict[str, Any] | None) -> str | None:
        """Return why ``answer`` is not JSON following ``schema`` (None: any object); None if
        it is, or if it was not judged (in time)."""
        encoded_schema, encoded_answer = orjson.dumps(schema), answer.encode()
        payload = b"".join(
            (_LENGTH.pack(len(encoded_schema)), encoded_schema,
             _LENGTH.pack(len(encoded_answer)), encoded_answer)
        )  # fmt: skip
        try:
            async with asyncio.timeout(self.timeout):
                async with self._lock:
                    reply = await self._ask(payload)
        except TimeoutError:
            log.warning(
                "structured output not validated: the check took too long",
                extra={"timeout_s": self.timeout},
            )
            return None
        if isinstance(reply, dict):
            log.warning(
                "structured output not validated", extra={"reason": str(reply.get("unchecked"))}
            )
            return None
        return reply if isinstance(reply, str) else None

    async def _ask(self, payload: bytes) -> Any:
        done = False
        try:
            child = self._child
            if child is None or child.returncode is not None:
                child = self._child = await _spawn()
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write(payload)
            await child.stdin.drain()
            size = _LENGTH.unpack(await child.stdout.readexactly(_LENGTH.size))[0]
            reply = orjson.loads(await child.stdout.readexactly(size))
            done = True
            return reply
        except (OSError, asyncio.IncompleteReadError, orjson.JSONDecodeError) as exc:
            return {"unchecked": f"the checker failed ({type(exc).__name__})"}
        finally:
            if not done:
                # Cut off mid-check (deadline, client gone, checker dead): what it
                # would answer belongs to nobody, so it goes, and a fresh one comes.
                await self._kill()

    async def _kill(self) -> None:
        child, self._child = self._child, None
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()

    async def close(self) -> None:
        """Stop the child, if one runs."""
        await self._kill()


async def _spawn() -> asyncio.subprocess.Process:
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": _PACKAGE_ROOT + (os.pathsep + path if path else "")}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", _MODULE,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip


# --- the child


def _refuse(uri: str) -> Any:
    from referencing.exceptions import NoSuchResource

    raise NoSuchResource(ref=uri)  # type: ignore[call-arg]


def judge(schema: Any, answer: str) -> Any:
    """Judge an answer as the child does: JSON (fence stripped), an object or following
    ``schema``; return the reply."""
    try:
        value = orjson.loads(strip_fence(answer))
    except orjson.JSONDecodeError as exc:
        return f"the answer is not valid JSON ({exc})"
    if schema is None:
        return None if isinstance(value, dict) else "the answer is not a JSON object"
    return check(schema, value)


def strip_fence(text: str) -> str:
    """Return ``text`` without a code fence around it."""
    fenced = FENCED.match(text)
    return fenced.group(1) if fenced else text.strip()


def check(schema: Any, value: Any) -> Any:
    """Validate ``value`` against ``schema`` as the child does; return the reply."""
    import jsonschema
    from referencing import Registry

    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
        validator = cls(schema, registry=Registry(retrieve=_refuse))  # type: ignore[call-arg]
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    except jsonschema.SchemaError:
        return {"unchecked": "the schema is not one saiproxy can check"}
    except RecursionError:
        return {"unchecked": "the schema or the answer nests too deep"}
    except Exception as exc:  # a reference that does not resolve, and the like
        return {"unchecked": f"{type(exc).__name__}: {str(exc)[:200]}"}
    if error is None:
        return None
    where = "/".join(str(part) for part in error.absolute_path) or "the top level"
    return f"the answer does not follow the schema at {where}: {error.message[:500]}"


def _frame(stream: Any) -> bytes | None:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    return bytes(stream.read(_LENGTH.unpack(head)[0]))


def _serve() -> None:
    import warnings

    warnings.simplefilter("ignore")  # an unknown $schema warns; the parent's stderr is a log
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while (schema := _frame(stdin)) is not None and (answer := _frame(stdin)) is not None:
        reply = orjson.dumps(judge(orjson.loads(schema), answer.decode("utf-8", "replace")))
        stdout.write(_LENGTH.pack(len(reply)) + reply)
        stdout.flush()


if __name__ == "__main__":
    _serve()
