"""gRPC forwarding helpers: the method table, request fields, metadata filter, status mapping, token counts."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import grpc
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2

from ..settings import UpstreamSettings
from .forward import _DROPPED_PREFIXES

GRPC_SERVICE = "inference.GRPCInferenceService"

_SERVICE = service_pb2.DESCRIPTOR.services_by_name[GRPC_SERVICE.rsplit(".", 1)[1]]
# Metadata grpc itself sets or that means something only on this hop.
_DROPPED_KEYS = frozenset({"authorization", "user-agent", "te", "content-type", "host", "cookie", "forwarded",
                           "x-real-ip", "x-client-ip", "true-client-ip"})
_DROPPED_KEY_PREFIXES = (":", "grpc-", *_DROPPED_PREFIXES)
# Methods whose `name` field is a model name (in the shared-memory requests it is a region).
_NAME_IS_MODEL = frozenset({"ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics"})
_TOKEN_OUTPUTS = ("input_tokens", "output_tokens")
_INT_FORMATS = {"INT32": "<i", "INT64": "<q", "UINT32": "<I", "UINT64": "<Q"}


def upstream_channel(up: UpstreamSettings, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
    """The one channel to Triton's gRPC endpoint: TLS (verified by up.ca_file or the system's store)
    with upstream.grpc_tls, else plaintext for a Triton on loopback."""
    if not up.grpc_tls:
        return grpc.aio.insecure_channel(up.grpc_target, options=options)
    roots = Path(up.ca_file).read_bytes() if up.ca_file else None
    return grpc.aio.secure_channel(up.grpc_target, grpc.ssl_channel_credentials(root_certificates=roots),
                                   options=options)


@dataclass(frozen=True)
class GrpcMethod:
    """One method of inference.GRPCInferenceService, as the service descriptor declares it."""

    name: str
    path: str
    request_type: type[Message]
    streaming: bool


def service_methods() -> list[GrpcMethod]:
    """Every method of the service that ships with tritonclient: nothing is listed by hand."""
    return [GrpcMethod(m.name, f"/{GRPC_SERVICE}/{m.name}", getattr(service_pb2, m.input_type.name),
                       m.client_streaming or m.server_streaming)
            for m in _SERVICE.methods]


def model_name_of(method: str, request: Message) -> str:
    """The model a request names ("" for none), to be validated by classify_grpc."""
    fields = request.DESCRIPTOR.fields_by_name
    if "model_name" in fields:
        return str(request.model_name)
    if method in _NAME_IS_MODEL:
        return str(request.name)
    return ""


def upstream_metadata(incoming: Iterable[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    """Client metadata minus the credential, identities only seekgate may assert and grpc's own keys."""
    return [(k, v) for k, v in incoming or ()
            if k.lower() not in _DROPPED_KEYS and not k.lower().startswith(_DROPPED_KEY_PREFIXES)]


# The HTTP equivalent of each gRPC code, for the audit record's http_status and the metrics' code
# label (the same mapping Triton uses between its two protocols).
_HTTP_OF: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.UNAUTHENTICATED: 401,
}


def http_status_of(code: grpc.StatusCode | None) -> int:
    return _HTTP_OF.get(code, 500) if code is not None else 500


def client_ip(peer: str) -> str:
    """"ipv4:10.0.0.1:5000" / "ipv6:%5B::1%5D:5000" -> the address; other transports -> "".

    grpc spells the peer as a URI, an IPv6 address's brackets percent-encoded: read raw, "%5B::1%5D" is no
    address, and matches no key's or policy's CIDR.
    """
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return unquote(rest).rsplit(":", 1)[0].strip("[]")
    return ""


def _tensor_int(response: service_pb2.ModelInferResponse, index: int) -> int | None:
    out = response.outputs[index]
    if index < len(response.raw_output_contents):
        fmt = _INT_FORMATS.get(out.datatype)
        raw = response.raw_output_contents[index]
        if fmt is None or len(raw) < struct.calcsize(fmt):
            return None
        return int(struct.unpack_from(fmt, raw)[0])
    contents = out.contents
    for values in (contents.int_contents, contents.int64_contents, contents.uint_contents,
                   contents.uint64_contents):
        if len(values):
            return int(values[0])
    return None


def token_counts(response: service_pb2.ModelInferResponse) -> tuple[int | None, int | None]:
    """(input_tokens, output_tokens) from the model's count outputs, None where absent."""
    found: dict[str, int | None] = {}
    for i, out in enumerate(response.outputs):
        if out.name in _TOKEN_OUTPUTS:
            found[out.name] = _tensor_int(response, i)
    return found.get("input_tokens"), found.get("output_tokens")


class StreamTokenCounter:
    """Token totals over a ModelStreamInfer stream: per request the last response's running totals, summed.

    Requests are told apart by their id; Triton's `triton_final_response` flag closes a request, so
    sequential requests that reuse an id (tritonclient's default "") are still counted separately.
    """

    def __init__(self) -> None:
        self._open: dict[str, tuple[int | None, int | None]] = {}
        self._done: list[tuple[int | None, int | None]] = []
        self.answered = 0   # requests Triton has finished with: a final response or an error

    def feed(self, raw: bytes) -> None:
        msg = service_pb2.ModelStreamInferResponse.FromString(raw)
        if msg.error_message:
            # Triton refused or failed that request: it runs no further (a refusal by Triton itself
            # carries no final flag, one by the model does: counted once either way).
            self.answered += 1
        if not msg.HasField("infer_response"):
            return
        resp = msg.infer_response
        counts = token_counts(resp)
        rid = resp.id
        prev = self._open.get(rid, (None, None))
        self._open[rid] = (counts[0] if counts[0] is not None else prev[0],
                           counts[1] if counts[1] is not None else prev[1])
        final = resp.parameters.get("triton_final_response")
        if final is not None and final.bool_param:
            self._done.append(self._open.pop(rid))
            if not msg.error_message:   # an error counted it already
                self.answered += 1

    def totals(self) -> tuple[int | None, int | None]:
        every = [*self._done, *self._open.values()]

        def total(i: int) -> int | None:
            values = [v for c in every if (v := c[i]) is not None]
            return sum(values) if values else None
        return total(0), total(1)
