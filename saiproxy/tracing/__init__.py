"""OpenTelemetry traces of each request, with the GenAI conventions (docs/operations.md#tracing).

Tracing is on when the standard variables configure an exporter
(:func:`saiproxy.base.otel.tracing_config`). Off, nothing here imports OpenTelemetry, no
middleware is installed, and the request path pays one ``is None`` check
where a span would be touched. On, :mod:`.sdk` (which needs the ``otel``
extra) builds each process's provider in a ``cleanup_ctx``, after the fork,
and flushes it in the drain.

The settings read the variables (:mod:`saiproxy.base.otel`); :mod:`.hooks`
holds the middleware and what the exchange and the SAI client call with a
span in hand.
"""

__all__: list[str] = []
