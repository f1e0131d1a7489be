"""The base layer: settings, the error tree, typed keys, metrics; every layer may import it."""

__all__: list[str] = []
