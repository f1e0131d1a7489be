"""SAI: the client of its template API, the credential chain, and the fake SAI the demo runs on."""

__all__: list[str] = []
