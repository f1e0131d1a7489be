"""HTTP: the application, its middlewares and plain views, the server; no completions."""

__all__: list[str] = []
