"""Logging: JSON or text lines tagged with the request ID, off the event loop.

One module per job:

- ``format``: what a line looks like (JSON or text), and the facts readers
  share: file names, time format, field spacing.
- ``mask``: no credential value reaches a line.
- ``batch``: records are noted on the hot path and formatted a batch at a
  time on the event loop (``event`` for the per-request lifecycle lines).
- ``write``: a thread writes the lines to stdout and to a rotating file whose
  name is unique per process, so replicas sharing a directory never rotate
  each other's file.
- ``setup``: the process's root logging, started and stopped with the app.
"""

from .batch import event, request_id_var, trace_var
from .format import (
    FILE_GLOB,
    LOGGER_PREFIX,
    RESPONSE_FINISHED,
    bound,
    escape_controls,
    json_field,
    log_file_name,
    parse_time,
    request_tag,
    serialise,
)
from .mask import MASK, MIN_SECRET_LENGTH, Masker
from .setup import LogSetup
from .write import write_failures

__all__ = [
    "FILE_GLOB",
    "LOGGER_PREFIX",
    "MASK",
    "MIN_SECRET_LENGTH",
    "RESPONSE_FINISHED",
    "LogSetup",
    "Masker",
    "bound",
    "escape_controls",
    "event",
    "json_field",
    "log_file_name",
    "parse_time",
    "request_id_var",
    "request_tag",
    "serialise",
    "trace_var",
    "write_failures",
]
