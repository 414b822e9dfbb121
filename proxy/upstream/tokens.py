"""Reads input/output token counts from Triton responses without re-serialising them."""

from __future__ import annotations

import json
import re
import struct
import zlib
from typing import Any

# Generate responses and SSE events are flat JSON objects: a regex is enough and
# avoids decoding a large text_output just to read two integers.
_INPUT = re.compile(rb'"input_tokens"\s*:\s*(\d+)')
_OUTPUT = re.compile(rb'"output_tokens"\s*:\s*(\d+)')


def inflated(body: bytes, coding: str | None, limit: int) -> bytes | None:
    """A copy of a response body with its Content-Encoding undone, for counting only (the client gets
    Triton's bytes); None when it cannot be read within `limit` bytes: the meter then settles at the
    request's bound. A client chooses the coding (Accept-Encoding), so it must not hide the counts."""
    coding = (coding or "identity").strip().lower()
    if coding == "identity":
        return body
    if coding not in ("gzip", "deflate"):
        return None
    decoder = zlib.decompressobj(32 + zlib.MAX_WBITS)   # gzip or zlib framing, as Triton writes either
    try:
        out = decoder.decompress(body, limit)
    except zlib.error:
        return None
    return out if decoder.eof else None   # cut at the limit, or truncated


def from_generate(body: bytes) -> tuple[int | None, int | None]:
    """Counts from a generate response or one generate_stream event."""
    i, o = _INPUT.search(body), _OUTPUT.search(body)
    return (int(i.group(1)) if i else None, int(o.group(1)) if o else None)


def _output_value(output: dict[str, Any], binary: bytes, offset: int) -> tuple[int | None, int]:
    size = (output.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        chunk = binary[offset:offset + int(size)]
        value = struct.unpack_from("<i", chunk)[0] if output.get("datatype") == "INT32" and len(chunk) >= 4 else None
        return value, offset + int(size)
    data = output.get("data")
    while isinstance(data, list) and data:
        data = data[0]
    return (int(data) if isinstance(data, (int, float)) else None), offset


def from_infer(body: bytes, header_length: int | None) -> tuple[int | None, int | None]:
    """Counts from a KServe v2 infer response, JSON or with the binary tensor extension."""
    header, binary = (body[:header_length], body[header_length:]) if header_length else (body, b"")
    if b"output_tokens" not in header:
        return None, None
    try:
        outputs = json.loads(header).get("outputs") or []
    except (ValueError, AttributeError):
        return None, None
    counts: dict[str, int | None] = {}
    offset = 0
    for output in outputs:
        value, offset = _output_value(output, binary, offset)
        counts[output.get("name", "")] = value
    return counts.get("input_tokens"), counts.get("output_tokens")


class SseTokenCounter:
    """Follows a generate_stream body chunk by chunk; the last event holds the running totals."""

    def __init__(self) -> None:
        self._tail = b""
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None

    def feed(self, chunk: bytes) -> None:
        data = self._tail + chunk
        events = data.split(b"\n\n")
        self._tail = events.pop()[-4096:]
        for event in events:
            i, o = from_generate(event)
            if i is not None:
                self.input_tokens = i
            if o is not None:
                self.output_tokens = o
