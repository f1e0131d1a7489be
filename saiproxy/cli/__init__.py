"""The command line: ``saiproxy`` serves; ``check``, ``trace`` and ``usage`` are its tools."""

__all__: list[str] = []
