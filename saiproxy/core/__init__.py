"""The protocol-neutral core: one conversation in, one answer out, whatever the wire format.

protocols/<name>.py   parse a request into a Conversation; render an Answer,
      │               its stream and errors in the protocol's own shapes
      ▼
core/exchange.py      credentials, early context check, the SAI call with
      │               retries and fallback, error policy (ERROR_MODE), repair;
      │               answers non-streamed requests; one skeleton for every answer
      ├─ core/fanout.py    several conversations in one response (one choice each)
      ├─ core/ledger.py    what an exchange learned and cost: tokens, log lines, metrics
      ├─ core/relay.py     the streamed answer: keep-alive, relay, the one failure ladder
      ├─ core/ending.py    how an answer ended (status, outcome, finish): one value
      ├─ core/inflight.py  in-flight and open-stream counts, shutdown's cut
      ├─ core/prompt.py    Conversation → SAI payload (tool and output instructions)
      ├─ core/toolcache.py parsed tools and their instructions, by content, bounded in bytes
      ├─ core/bounds.py    depth, stop sequences, output schemas: what a request may carry
      ├─ core/answer.py    SAI's text → prose, tool calls, stop sequences, JSON
      └─ core/schemacheck.py  the answer against the client's schema, in a child process
      ▼
upstream/sai.py       the SAI client: one template execution, status → outcome
"""

__all__: list[str] = []
