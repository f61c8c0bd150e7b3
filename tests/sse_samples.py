"""SSE events shared by the parser and relay tests."""

from __future__ import annotations

import orjson


def ev(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


ROLE = ev({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
TOK = [ev({"choices": [{"index": 0, "delta": {"content": f" t{i}"}}]}) for i in range(3)]
USAGE = ev({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}})
DONE = b"data: [DONE]\n\n"
STREAM = ROLE + b"".join(TOK) + USAGE + DONE
