"""Protocol adapters: each parses its wire format into the core's Conversation and renders
the core's Answer, stream and errors in its own shapes. Adding a protocol touches its
module here and the routes in ``app.py``; the core stays as it is.
"""

__all__: list[str] = []
