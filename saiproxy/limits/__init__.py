"""Per-client and global limits, token budgets and usage, in the process or shared by every
replica through Valkey or Redis (docs/limits.md).

``rules`` (what is limited), ``identity`` (who), ``base`` (the Limiter protocol),
``local`` and ``shared`` (the two stores), ``limits`` (the breaker, the leases, the
metrics), ``gate`` (the hook around an answer and the headers), ``usage`` (the CLI).
"""

__all__: list[str] = []
