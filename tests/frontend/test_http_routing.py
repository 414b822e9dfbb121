"""Pure helpers of the HTTP front end: base paths and the request body cap."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.context import RequestContext, Resource
from proxy.errors import BadRequest, NotFound
from proxy.frontend.http import body_view, route_path
from proxy.upstream.forward import response_headers, upstream_headers


def test_route_path_keeps_the_raw_path_after_the_base() -> None:
    assert route_path("/v2/models/deepseek/infer?x=1", "") == "/v2/models/deepseek/infer"
    assert route_path("/base/v2/models/deep%2fseek", "/base") == "/v2/models/deep%2fseek"
    with pytest.raises(NotFound):
        route_path("/other/v2", "/base")
    with pytest.raises(NotFound):
        route_path("/basement/v2", "/base")


def test_upstream_headers_drop_credentials_identity_and_hop_by_hop() -> None:
    incoming = CIMultiDictProxy(CIMultiDict([
        ("Authorization", "Bearer sgk_x"), ("X-Forwarded-For", "1.2.3.4"), ("Forwarded", "for=1.2.3.4"),
        ("X-Seekgate-Owner", "root"), ("seekgate-internal", "guess"), ("Connection", "keep-alive, X-Private"),
        ("X-Private", "1"), ("Transfer-Encoding", "chunked"), ("Content-Encoding", "gzip"),
        ("Inference-Header-Content-Length", "120"), ("Content-Type", "application/octet-stream"),
        ("triton-grpc-protocol-seekgate-internal", "guess"), ("X-Real-IP", "6.6.6.6"), ("X-Client-IP", "6.6.6.6"),
        ("True-Client-IP", "6.6.6.6"),
    ]))
    out = upstream_headers(incoming)
    assert sorted(name for name, _ in out) == ["Content-Encoding", "Content-Type", "Inference-Header-Content-Length"]


def test_response_headers_drop_hop_by_hop_those_connection_names_and_what_aiohttp_frames() -> None:
    upstream = CIMultiDictProxy(CIMultiDict([
        ("Connection", "keep-alive, X-Hop-Private"), ("Keep-Alive", "timeout=5"), ("X-Hop-Private", "1"),
        ("Transfer-Encoding", "chunked"), ("Trailer", "X-Checksum"), ("Upgrade", "h2c"), ("TE", "trailers"),
        ("Proxy-Authenticate", "Basic"), ("Proxy-Connection", "keep-alive"), ("Content-Length", "12"),
        ("Server", "triton"), ("Date", "today"),
        ("Content-Type", "text/event-stream"), ("Inference-Header-Content-Length", "40"), ("X-Kept", "yes"),
    ]))
    out = response_headers(upstream)
    assert sorted(out) == ["Content-Type", "Inference-Header-Content-Length", "X-Kept"]


def test_an_inference_route_without_a_body_view_is_refused() -> None:
    """Should classify ever mark another route as infer, its body is refused, never forwarded unread."""
    ctx = RequestContext(request_id="r", client_ip="127.0.0.1")
    ctx.resource = Resource("model:m", "infer", model="m")
    request = make_mocked_request("POST", "/v2/models/m/embed")
    with pytest.raises(BadRequest, match="no view for inference route"):
        body_view(request, ctx, "/v2/models/m/embed", b'{"parameters": {"shared_memory_region": "r"}}', 1 << 20)
    ctx.resource = Resource("model:m", "read", model="m")   # not an inference: only the size is capped
    assert body_view(request, ctx, "/v2/models/m/embed", b"{}", 1 << 20).parameters == ()
