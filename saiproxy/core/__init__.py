"""The protocol-neutral core: one conversation in, one answer out, whatever the wire format.

protocols/<name>.py   parse a request into a Conversation; render an Answer,
      │               its stream and errors in the protocol's own shapes
      ▼
core/exchange.py      credentials, early context check, the SAI call with
      │               retries and fallback, error policy (ERROR_MODE), logs,
      │               metrics; drives the non-streamed and streamed answers
      ├─ core/prompt.py    Conversation → SAI payload (tool and output instructions)
      └─ core/answer.py    SAI's text → prose, tool calls, stop sequences, JSON
      ▼
sai.py                the SAI client: one template execution, status → outcome
"""
