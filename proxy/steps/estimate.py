"""Reads the `max_tokens` a request asks for (generate JSON, KServe v2 infer, gRPC ModelInferRequest).

The limit step charges this up front and corrects it when the response's counts are
known. Only the small parts needed are parsed: never the prompt, never a large tensor.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from tritonclient.grpc import service_pb2

NAME = "max_tokens"
_JSON_HEAD_LIMIT = 1 << 20   # generate bodies and infer JSON headers are small; bigger is not parsed
_FORMATS = {"INT32": "<i", "INT64": "<q", "UINT32": "<I", "UINT64": "<Q", "INT16": "<h", "UINT16": "<H",
            "INT8": "<b", "UINT8": "<B"}


def _total(values: Any) -> int | None:
    """Sum of the integers in a (nested) list: a batch asks for each row's max_tokens."""
    if isinstance(values, bool):
        return None
    if isinstance(values, (int, float)):
        return max(0, int(values))
    if isinstance(values, list):
        found = [t for t in (_total(v) for v in values) if t is not None]
        return sum(found) if found else None
    return None


def _unpack(datatype: str, raw: bytes) -> int | None:
    fmt = _FORMATS.get(datatype)
    if fmt is None:
        return None
    size = struct.calcsize(fmt)
    values = [struct.unpack_from(fmt, raw, i)[0] for i in range(0, len(raw) - size + 1, size)]
    return sum(max(0, int(v)) for v in values) if values else None


def from_http(path: str, body: bytes, header_length: str | None) -> int | None:
    """max_tokens of an HTTP generate / generate_stream / infer body; None if it names none."""
    if not body or not body.lstrip().startswith(b"{") or NAME.encode() not in body[:_JSON_HEAD_LIMIT]:
        return None
    head_len = int(header_length) if header_length and header_length.isdigit() else None
    head, binary = (body[:head_len], body[head_len:]) if head_len else (body, b"")
    if len(head) > _JSON_HEAD_LIMIT:
        return None
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError):
        return None   # Triton will refuse it; nothing to estimate
    if not isinstance(doc, dict):
        return None
    if path.endswith(("/generate", "/generate_stream")):
        return _total(doc.get(NAME))
    offset = 0
    for tensor in doc.get("inputs") or []:
        if not isinstance(tensor, dict):
            return None
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if tensor.get("name") == NAME:
            if isinstance(size, int):
                return _unpack(str(tensor.get("datatype")), binary[offset:offset + size])
            return _total(tensor.get("data"))
        if isinstance(size, int):
            offset += size
    return None


def from_grpc(request: Any) -> int | None:
    """max_tokens of a gRPC ModelInferRequest (raw_input_contents or typed contents); None if absent."""
    if not isinstance(request, service_pb2.ModelInferRequest):
        return None
    for i, tensor in enumerate(request.inputs):
        if tensor.name != NAME:
            continue
        if i < len(request.raw_input_contents):
            return _unpack(tensor.datatype, request.raw_input_contents[i])
        c = tensor.contents
        for values in (c.int_contents, c.int64_contents, c.uint_contents, c.uint64_contents):
            if len(values):
                return sum(max(0, int(v)) for v in values)
        return None
    return None
