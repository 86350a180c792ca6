"""Server-sent event framing for streaming responses, as OpenAI and vLLM frame them.

A stream is a sequence of `data: <json>\\n\\n` events ending in `data: [DONE]\\n\\n`. No
`event:` lines: the official client treats a data event whose JSON has an "error" key as
a failure and raises `openai.APIError` with its message. So a stream that fails midway
sends `sse_error(...)` and then `SSE_DONE`.
"""

from __future__ import annotations

from typing import Any

import msgspec
from pydantic import BaseModel

from router.protocol import error_body

SSE_DONE = b"data: [DONE]\n\n"

# Characters JSON leaves raw that line readers other than SSE's own (Python's
# str.splitlines, httpx's iter_lines) take for line breaks, cutting an event in two:
# sent as \uXXXX escapes instead, which every JSON reader decodes back.
_LINE_BREAKERS = {c.encode(): f"\\u{ord(c):04x}".encode() for c in "\x1c\x1d\x1e\x85\u2028\u2029"}

_encode = msgspec.json.Encoder().encode


def json_bytes(obj: BaseModel | dict[str, Any] | list[Any]) -> bytes:
    """A response body: pydantic models without their None fields (the official client
    reads an absent field as None; a stream choice keeps `finish_reason: null`), plain
    dicts/lists as they are."""
    if isinstance(obj, BaseModel):
        return obj.__pydantic_serializer__.to_json(obj, exclude_none=True)
    return _encode(obj)


def sse_data(obj: BaseModel | dict[str, Any] | str) -> bytes:
    """One event. A `str` is sent as-is (already JSON, or a marker); a multi-line string
    becomes one `data:` line per line, which SSE readers join back with newlines."""
    if isinstance(obj, str):
        return b"".join(b"data: " + line.encode() + b"\n" for line in obj.split("\n")) + b"\n"
    data = json_bytes(obj)
    for raw, escaped in _LINE_BREAKERS.items():
        if raw in data:
            data = data.replace(raw, escaped)
    return b"data: " + data + b"\n\n"


def sse_error(message: str, type: str = "internal_server_error", code: int = 500) -> bytes:
    """An error event in OpenAI's shape; send `SSE_DONE` after it and close the stream."""
    return sse_data(error_body(message, type, code))
