"""The limit step end to end, against the real Triton over HTTP and gRPC: 429 / RESOURCE_EXHAUSTED,
headers, audit reasons, shared concurrency slots, token budgets, and nothing forwarded when refused."""

from __future__ import annotations

import functools
import gzip
import http.client
import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import yaml
from tritonclient.grpc import service_pb2_grpc

from proxy.frontend import http as http_server
from proxy.local.triton import TritonProcess
from proxy.state.limits import LocalLimiter
from tests.conftest import free_ports
from tests.frontend.test_grpc import STREAM_MODEL, infer_request, md, quiet
from tests.frontend.test_http import call
from tests.gateway import Gateway, audit_records, gateway_via, wait_for
from tests.relay import TcpRelay

GEN = "/v2/models/deepseek/generate"


@pytest.fixture(scope="module")
def gw(relays: tuple[TcpRelay, TcpRelay], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # The estimate for a body without max_tokens is below the model's default (16) on purpose.
    overrides = {"limits.max_tokens_by_role": "capped=4,roomy=16", "limits.default_estimate_tokens": 1}
    with gateway_via(tmp_path_factory.mktemp("gw-limits"), *relays, **overrides) as g:
        yield g


@pytest.fixture(scope="module")
def stub(gw: Gateway) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{gw.settings.server.grpc_port}") as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def generate(gw: Gateway, key: str, text: str, max_tokens: int = 3) -> tuple[int, dict[str, str], bytes]:
    return call(gw.url + GEN, "POST", {"text_input": text, "max_tokens": max_tokens}, key)


def reasons(gw: Gateway, key_id: str, count: int) -> list[str]:
    """The audit reasons of a key's first `count` records, oldest first."""
    assert wait_for(lambda: sum(r["key_id"] == key_id for r in audit_records(gw)) >= count, 3.0)
    mine = sorted((r for r in audit_records(gw) if r["key_id"] == key_id), key=lambda r: r["timestamp"])
    return [r["reason"] for r in mine]


def test_rpm_exceeded_is_429_with_headers_audited_and_never_forwarded(gw: Gateway, relays: Any) -> None:
    key_id, key = gw.key(owner="rpm", limits={"rpm": 2})
    status, headers, _ = generate(gw, key, "one")
    assert status == 200 and headers["X-RateLimit-Limit"] == "2" and headers["X-RateLimit-Remaining"] == "1"
    status, headers, _ = generate(gw, key, "two")
    assert status == 200 and headers["X-RateLimit-Remaining"] == "0"
    relays[0].clear()
    marker = f"refused-{uuid.uuid4().hex}"
    status, headers, body = generate(gw, key, marker)
    assert status == 429 and json.loads(body) == {"error": "rate limit exceeded"}
    assert headers["X-RateLimit-Limit"] == "2" and headers["X-RateLimit-Remaining"] == "0"
    assert 1 <= int(headers["Retry-After"]) <= 60 and 1 <= int(headers["X-RateLimit-Reset"]) <= 60
    assert marker.encode() not in relays[0].seen()
    assert reasons(gw, key_id, 3)[-1] == "rate_limited:rpm"
    rec = [r for r in audit_records(gw) if r["key_id"] == key_id][-1]
    assert rec["status"] == "denied" and rec["http_status"] == 429


def test_token_budget_exhausted_after_a_known_generate(gw: Gateway) -> None:
    _, free = gw.key(owner="probe")
    status, _, raw = generate(gw, free, "budget prompt", 4)
    counts = json.loads(raw)
    used = counts["input_tokens"] + counts["output_tokens"]
    assert status == 200 and counts["output_tokens"] == 4
    # One token more than that generate costs: the first fits its 4-token estimate, then the
    # real count is charged and the next 4-token estimate no longer fits.
    key_id, key = gw.key(owner="budget", limits={"daily_tokens": used + 1})
    assert generate(gw, key, "budget prompt", 4)[0] == 200
    status, headers, _ = generate(gw, key, "budget prompt", 4)
    assert status == 429 and headers["X-RateLimit-Remaining"] == "1"
    assert headers["X-RateLimit-Limit"] == str(used + 1) and 1 <= int(headers["Retry-After"]) <= 86400
    assert generate(gw, key, "budget prompt", 1)[0] == 200   # the last token still fits
    assert reasons(gw, key_id, 3) == ["", "rate_limited:daily_tokens", ""]


PROMPT = "hello " * 40   # ~164 tokens, 240 bytes: two plain requests fit 300 tokens, not three
INFER = "/v2/models/deepseek/infer"


def infer_body(outputs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [
        {"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": [PROMPT]},
        {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [4]}]}
    if outputs is not None:
        body["outputs"] = outputs
    return body


CLASSIFIED = [{"name": "text_output"}, {"name": "input_tokens", "parameters": {"classification": 1}},
              {"name": "output_tokens", "parameters": {"classification": 1}}]


@pytest.mark.parametrize("outputs", [[{"name": "text_output"}], CLASSIFIED], ids=["only-text-output", "classified"])
def test_an_infer_answer_without_readable_counts_is_charged_its_bound_not_its_max_tokens(
        gw: Gateway, outputs: Any) -> None:
    """The client shapes Triton's answer; one it made unreadable is charged the prompt's bytes plus
    max_tokens (over its ~168 real tokens), never only the 4 of max_tokens."""
    _, plain = gw.key(owner="meter-plain", limits={"daily_tokens": 300})
    assert [call(gw.url + INFER, "POST", infer_body(), plain)[0] for _ in range(3)] == [200, 200, 429]
    _, key = gw.key(owner="meter-hidden", limits={"daily_tokens": 300})
    assert call(gw.url + INFER, "POST", infer_body(outputs), key)[0] == 200
    assert call(gw.url + INFER, "POST", infer_body(outputs), key)[0] == 429


def test_the_bound_of_a_request_without_max_tokens_counts_the_models_default(gw: Gateway) -> None:
    """Prompt 11 bytes: bound 11 + 64 + the model's default 16 = 91, not 11 + 64 + 1 (the estimate)."""
    body = {"inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": ["hello there"]}],
            "outputs": [{"name": "text_output"}]}
    _, key = gw.key(owner="meter-default", limits={"daily_tokens": 90})
    assert call(gw.url + INFER, "POST", body, key)[0] == 200
    assert call(gw.url + INFER, "POST", body, key)[0] == 429


def test_a_gzipped_infer_answer_is_relayed_as_is_and_charged_its_real_count(gw: Gateway) -> None:
    key_id, key = gw.key(owner="meter-gzip", limits={"daily_tokens": 300})
    gz = {"Accept-Encoding": "gzip"}
    status, got, raw = call(gw.url + INFER, "POST", infer_body(), key, gz)
    counts = {o["name"]: o["data"][0] for o in json.loads(gzip.decompress(raw))["outputs"]}
    assert status == 200 and got["Content-Encoding"] == "gzip"   # Triton's gzip bytes, as they were
    assert wait_for(lambda: any(r["key_id"] == key_id for r in audit_records(gw)), 3.0)
    rec = next(r for r in audit_records(gw) if r["key_id"] == key_id)
    assert (rec["input_tokens"], rec["output_tokens"]) == (counts["input_tokens"], counts["output_tokens"])
    assert [call(gw.url + INFER, "POST", infer_body(), key, gz)[0] for _ in range(2)] == [200, 429]


def test_grpc_infer_whose_outputs_leave_out_the_counts_is_charged_its_bound(gw: Gateway, stub: Any) -> None:
    def request() -> Any:
        req = infer_request("deepseek", text=PROMPT, max_tokens=4)
        req.outputs.add(name="text_output")
        return req
    _, key = gw.key(owner="meter-grpc", limits={"daily_tokens": 300})
    stub.ModelInfer(request(), metadata=md(key))
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request(), metadata=md(key))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_grpc_stream_messages_hiding_their_counts_add_their_bound(gw: Gateway, stub: Any) -> None:
    """On a stream the first message's counts are read; a later one that hides its own is charged its bound."""
    hidden = infer_request(STREAM_MODEL, text=PROMPT, max_tokens=4)
    hidden.outputs.add(name="text_output")
    _, key = gw.key(owner="meter-stream", limits={"daily_tokens": 300})
    list(stub.ModelStreamInfer(iter([infer_request(STREAM_MODEL, max_tokens=2), hidden]), metadata=md(key)))
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(infer_request("deepseek", max_tokens=2), metadata=md(key))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_grpc_stream_cut_short_is_charged_the_bound_of_what_it_sent(gw: Gateway, stub: Any,
                                                                      relays: tuple[TcpRelay, TcpRelay]) -> None:
    """Triton runs what a stream sent to the end, cancelled call or not: a client that cancels once the
    first answer is in is charged the bound of every message it sent (the second's alone, 240 + 64 + 4,
    is over the 300 budget), never only the few tokens of the one answer it read."""
    grpc_relay = relays[1]
    key_id, key = gw.key(owner="meter-cut", limits={"daily_tokens": 300})
    quiet(grpc_relay)
    grpc_relay.hold_after(b"text_output")   # the later answers wait in the relay: surely unread at the cancel
    done = threading.Event()

    def messages() -> Iterator[Any]:
        yield infer_request("deepseek", max_tokens=1)
        yield infer_request("deepseek", text=PROMPT, max_tokens=4)
        done.wait(30)   # the stream stays open until the client cancels it
    try:
        responses = stub.ModelStreamInfer(messages(), metadata=md(key))
        assert next(responses)
        # Both messages reached Triton before the cancel: on a loaded machine the client's second one
        # could still be on its way when the first answer came, and then it was never sent (nor charged).
        assert grpc_relay.wait_seen(lambda seen: PROMPT.encode() in seen, 30)
        responses.cancel()
    finally:
        done.set()
        grpc_relay.let_flow()
    assert wait_for(lambda: any(r["key_id"] == key_id for r in audit_records(gw)), 30.0)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(infer_request("deepseek", max_tokens=2), metadata=md(key))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_device_keys_are_bound_by_their_app_keys_limits(gw: Gateway) -> None:
    app_id, app_key = gw.key(tier="app", owner="fleet", limits={"rpm": 2})
    dev_id, dev_key = gw.key(tier="device", owner="sensor", parent_id=app_id)
    _, dev2_key = gw.key(tier="device", owner="sensor-2", parent_id=app_id)
    assert generate(gw, dev_key, "a")[0] == 200
    assert generate(gw, dev2_key, "b")[0] == 200
    assert generate(gw, dev_key, "c")[0] == 429      # the app key's window is shared by its devices
    assert generate(gw, app_key, "d")[0] == 429
    assert reasons(gw, dev_id, 2)[-1] == f"rate_limited:rpm@{app_id}"


def test_role_cap_on_max_tokens(gw: Gateway, relays: Any) -> None:
    _, key = gw.key(owner="capped", roles=("capped",))
    assert generate(gw, key, "small", 4)[0] == 200
    relays[0].clear()
    status, _, body = generate(gw, key, "too-big-marker", 5)
    assert status == 400 and json.loads(body) == {"error": "max_tokens is over this key's cap of 4"}
    assert b"too-big-marker" not in relays[0].seen()


@pytest.mark.parametrize("body, error", [
    # The model's own default_max_tokens (16, triton_models/deepseek/config.pbtxt) is over the cap.
    ({"text_input": "no-cap-marker"}, "max_tokens is required under this key's cap of 4 (the model's default is 16)"),
    ({"text_input": "no-cap-marker", "max_tokens": []}, "max_tokens is required under this key's cap of 4"),
], ids=["absent", "empty"])
def test_role_cap_holds_when_max_tokens_is_left_out(gw: Gateway, relays: Any, body: dict[str, Any],
                                                    error: str) -> None:
    _, key = gw.key(owner="capped", roles=("capped",))
    relays[0].clear()
    status, _, raw = call(gw.url + GEN, "POST", body, key)
    assert status == 400 and json.loads(raw) == {"error": error}
    assert b"no-cap-marker" not in relays[0].seen()
    _, roomy = gw.key(owner="roomy", roles=("roomy",))   # a cap the default fits: it goes through
    status, _, raw = call(gw.url + GEN, "POST", {"text_input": "hello there"}, roomy)
    assert status == 200 and json.loads(raw)["output_tokens"] <= 16


def test_role_cap_holds_when_max_tokens_is_left_out_over_grpc(gw: Gateway, stub: Any) -> None:
    _, key = gw.key(owner="capped", roles=("capped",))
    req = infer_request("deepseek")
    del req.inputs[1]
    del req.raw_input_contents[1]
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req, metadata=md(key))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, roomy = gw.key(owner="roomy", roles=("roomy",))
    stub.ModelInfer(req, metadata=md(roomy))
    second = infer_request(STREAM_MODEL)
    del second.inputs[1]
    del second.raw_input_contents[1]
    with pytest.raises(grpc.RpcError) as info:   # on a stream, each message is held to the cap
        list(stub.ModelStreamInfer(iter([infer_request(STREAM_MODEL, max_tokens=2), second]), metadata=md(key)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_admin_api_creates_a_key_with_limits_that_bind(gw: Gateway) -> None:
    _, admin = gw.key(owner="ops", roles=("admin",))
    status, _, raw = call(gw.url + "/admin/v1/keys", "POST",
                          {"tier": "user", "name": "limited", "roles": ["user"], "limits": {"rpm": 1}}, admin)
    made = json.loads(raw)
    assert status == 201 and made["limits"] == {"rpm": 1}
    assert generate(gw, made["key"], "x")[0] == 200
    assert generate(gw, made["key"], "y")[0] == 429


def test_grpc_over_the_limit_is_resource_exhausted_and_never_forwarded(gw: Gateway, stub: Any,
                                                                       relays: Any) -> None:
    key_id, key = gw.key(owner="grpc-rpm", limits={"rpm": 1})
    stub.ModelInfer(infer_request("deepseek"), metadata=md(key))
    quiet(relays[1])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(infer_request("deepseek", text="grpc-refused-marker"), metadata=md(key))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(info.value.trailing_metadata())
    assert trailers["x-ratelimit-limit"] == "1" and 1 <= int(trailers["retry-after"]) <= 60
    assert b"grpc-refused-marker" not in relays[1].seen()
    assert reasons(gw, key_id, 2)[-1] == "rate_limited:rpm"


class HeldStream:
    """A ModelStreamInfer call kept open after its first request: it holds a concurrency slot."""

    def __init__(self, stub: Any, key: str) -> None:
        self.q: queue.Queue[Any] = queue.Queue()
        self.q.put(infer_request(STREAM_MODEL, max_tokens=2))
        self.responses = stub.ModelStreamInfer(iter(self.q.get, None), metadata=md(key))
        next(self.responses)   # the server has admitted it

    def close(self) -> None:
        self.q.put(None)
        for _ in self.responses:   # ends when the server's handler has finished (and settled)
            pass


def test_concurrency_is_shared_by_parallel_streams_over_both_protocols(gw: Gateway, stub: Any,
                                                                       relays: Any) -> None:
    key_id, key = gw.key(owner="conc", limits={"concurrency": 2})
    first, second = HeldStream(stub, key), HeldStream(stub, key)
    try:
        with pytest.raises(grpc.RpcError) as info:
            HeldStream(stub, key)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        relays[0].clear()
        status, headers, _ = call(gw.url + "/v2/models/deepseek_stream/generate_stream", "POST",
                                  {"text_input": "http-conc-marker", "max_tokens": 2}, key)
        assert status == 429 and headers["X-RateLimit-Limit"] == "2"
        assert b"http-conc-marker" not in relays[0].seen()
        first.close()
        third = HeldStream(stub, key)   # the freed slot is usable at once
        third.close()
    finally:
        second.close()
    assert generate(gw, key, "after")[0] == 200
    assert reasons(gw, key_id, 3).count("rate_limited:concurrency") == 2


def test_client_dropping_an_sse_stream_frees_its_slot(gw: Gateway) -> None:
    key_id, key = gw.key(owner="dropper", limits={"concurrency": 1})
    conn = http.client.HTTPConnection("127.0.0.1", gw.settings.server.http_port, timeout=30)
    conn.request("POST", "/v2/models/deepseek_stream/generate_stream",
                 json.dumps({"text_input": "drop me", "max_tokens": 200}),
                 {"Authorization": f"Bearer {key}"})
    response = conn.getresponse()
    assert response.status == 200 and response.read1(64)
    conn.close()   # mid-stream
    assert wait_for(lambda: generate(gw, key, "next")[0] == 200, 10.0)
    # Records reach the file a batch (audit.batch_linger_ms) after their responses: wait for the drop's.
    assert wait_for(lambda: any(r["key_id"] == key_id and r["status"] == "error" for r in audit_records(gw)), 3.0)
    dropped = min((r for r in audit_records(gw) if r["key_id"] == key_id), key=lambda r: r["timestamp"])
    assert dropped["status"] == "error" and dropped["output_tokens"] < 200   # cut short, and settled
    assert dropped["reason"] == "client_disconnected" and dropped["http_status"] == 499


def test_token_budget_survives_a_restart(triton: TritonProcess, tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("gw-restart")
    first = Gateway(root, triton.http_url, free_ports(3)).start()
    try:
        key_id, key = first.key(owner="restart", limits={"daily_tokens": 100, "monthly_tokens": 1000})
        status, _, raw = generate(first, key, "before the restart", 4)
        assert status == 200
        counts = json.loads(raw)
        used = counts["input_tokens"] + counts["output_tokens"]
    finally:
        first.stop()   # the shutdown flush writes the settled charge
    second = Gateway(root, triton.http_url, free_ports(3)).start()
    try:
        left = 100 - used
        status, headers, _ = generate(second, key, "after the restart", left + 1)
        assert status == 429, "the restart forgot the day's usage"
        assert headers["X-RateLimit-Limit"] == "100" and headers["X-RateLimit-Remaining"] == str(left)
        assert wait_for(lambda: any(r["key_id"] == key_id and r["reason"] == "rate_limited:daily_tokens"
                                    and r["http_status"] == 429 for r in audit_records(second)), 3.0)
        assert generate(second, key, "what is left", left)[0] == 200
    finally:
        second.stop()


def test_requests_triton_never_got_are_not_charged(triton: TritonProcess,
                                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    """A dead Triton (nothing listens) must not spend the budgets of the clients retrying against it:
    each refused connection is a 503 (UNAVAILABLE) charged nothing, on /v2, /v1 and gRPC, and the
    day's budget is whole after."""
    root = tmp_path_factory.mktemp("gw-dead-triton")
    http_port, grpc_port = free_ports(2)
    dead = Gateway(root, f"http://127.0.0.1:{http_port}", free_ports(3),
                   **{"upstream.grpc_target": f"127.0.0.1:{grpc_port}"}).start()
    try:
        key_id, key = dead.key(owner="retrying", limits={"daily_tokens": 100})
        # Each asks for 16 and is bounded at ~90 (prompt bytes + 64 + 16): charged at either, the
        # budget would run out within seven tries and the rest be 429.
        statuses = [generate(dead, key, "x" * 10, 16)[0] for _ in range(6)]
        statuses += [call(dead.url + "/v1/completions", "POST",
                          {"model": "deepseek", "prompt": "x" * 10, "max_tokens": 16}, key)[0] for _ in range(2)]
        assert statuses == [503] * 8
        with grpc.insecure_channel(f"127.0.0.1:{dead.settings.server.grpc_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as info:
                    stub.ModelInfer(infer_request("deepseek", "x" * 10, 16), metadata=md(key))
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                with pytest.raises(grpc.RpcError) as info:
                    list(stub.ModelStreamInfer(iter([infer_request(STREAM_MODEL, "x" * 10, 16)]), metadata=md(key)))
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        dead.stop()   # the shutdown flush writes whatever was charged
    live = Gateway(root, triton.http_url, free_ports(3)).start()
    try:
        status, headers, _ = generate(live, key, "after the outage", 101)   # one over the day's budget
        assert status == 429 and headers["X-RateLimit-Remaining"] == "100"
        assert generate(live, key, "after the outage", 16)[0] == 200
    finally:
        live.stop()


def test_minting_sessions_counts_against_the_presenting_keys_rpm(gw: Gateway, relays: Any) -> None:
    key_id, key = gw.key(owner="minter", limits={"rpm": 3})
    status, headers, raw = call(gw.url + "/v1/sessions", "POST", b"", key)
    assert status == 200 and headers["X-RateLimit-Limit"] == "3" and headers["X-RateLimit-Remaining"] == "2"
    session = json.loads(raw)["token"]
    assert call(gw.url + "/v1/sessions", "POST", b"", key)[0] == 200
    # A session is bound by its parent's limits: its inference takes the parent's last place...
    assert generate(gw, session, "as the session")[0] == 200
    # ...so neither minting another session nor using one gets round the parent's rpm.
    status, headers, body = call(gw.url + "/v1/sessions", "POST", b"", key)
    assert status == 429 and json.loads(body) == {"error": "rate limit exceeded"} and "Retry-After" in headers
    assert generate(gw, session, "still the session")[0] == 429
    assert wait_for(lambda: any(r["key_id"] == key_id and r["reason"] == "rate_limited:rpm"
                                and r["resource"] == "sessions" for r in audit_records(gw)), 3.0)


def test_a_policy_rule_imposes_limits_on_the_keys_it_allows(gw: Gateway, relays: Any) -> None:
    rule_file = gw.policy_dir / "00-interns.yaml"   # sorts first: the rule that allows interns
    rule_file.write_text(yaml.safe_dump({"rules": [{
        "id": "interns-slow", "effect": "allow", "subject": {"roles": ["intern"]},
        "resources": ["model:*"], "actions": ["infer", "read"], "limits": {"rpm": 2}}]}))
    try:
        intern_id, intern = gw.key(owner="intern", roles=("intern", "user"))   # no limits of its own
        _, other = gw.key(owner="not-an-intern", roles=("user",))
        assert wait_for(lambda: generate(gw, intern, "probe")[0] == 429, 5.0)   # the reload took effect
        status, headers, _ = generate(gw, intern, "again")
        assert status == 429 and headers["X-RateLimit-Limit"] == "2"
        # The probe loop made an unknown number of requests, so wait for the refusal's own record
        # rather than for a count: a count can be met by earlier probes before it is written.
        expected = f"rate_limited:rpm@rule:interns-slow:{intern_id}"
        assert wait_for(lambda: reasons(gw, intern_id, 1)[-1] == expected, 3.0)
        # A session minted from the key counts against the same per-key rule window.
        minted = json.loads(call(gw.url + "/v1/sessions", "POST", b"", key=intern)[2])
        assert generate(gw, minted["token"], "via session")[0] == 429
        assert all(generate(gw, other, f"free {i}")[0] == 200 for i in range(3))   # the rule is not theirs
    finally:
        rule_file.unlink()


def test_a_tier_default_binds_a_key_without_limits_of_its_own(triton: TritonProcess,
                                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    g = Gateway(tmp_path_factory.mktemp("gw-tier"), triton.http_url, free_ports(3),
                **{"limits.user_rpm": 2}).start()
    try:
        key_id, key = g.key(tier="user", owner="tiered")   # no limits of its own
        assert [generate(g, key, f"tier {i}")[0] for i in range(2)] == [200, 200]
        status, headers, _ = generate(g, key, "tier 2")
        assert status == 429 and headers["X-RateLimit-Limit"] == "2"
        assert reasons(g, key_id, 3)[-1] == "rate_limited:rpm"
        _, other = g.key(tier="app", owner="other tier", roles=("user",))   # the user tier's default only
        assert [generate(g, other, f"app {i}")[0] for i in range(3)] == [200, 200, 200]
    finally:
        g.stop()


class SteppedClock:
    """The limiter's wall clock, moved by the test: window edges are hit exactly, never by sleeping."""

    def __init__(self) -> None:
        self.t = float(int(time.time()))

    def __call__(self) -> float:
        return self.t


def test_rpm_window_boundary_end_to_end(triton: TritonProcess, relays: Any,
                                        tmp_path_factory: pytest.TempPathFactory,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # A request leaves the window when it turns exactly 60 s old: at t0 + 60 the request of t0 no
    # longer counts, one of t0 + 30 still does. The clock is the only thing replaced.
    clock = SteppedClock()
    monkeypatch.setattr(http_server, "LocalLimiter", functools.partial(LocalLimiter, clock))
    with gateway_via(tmp_path_factory.mktemp("gw-rpm-edge"), *relays) as g:
        key_id, key = g.key(owner="edge", limits={"rpm": 2})
        t0 = clock.t

        def at(offset: float, text: str) -> tuple[int, dict[str, str]]:
            clock.t = t0 + offset
            status, headers, _ = generate(g, key, text)
            return status, headers

        assert at(0, "t0")[0] == 200
        status, headers = at(30, "t30")
        assert status == 200 and headers["X-RateLimit-Remaining"] == "0"
        relays[0].clear()
        status, headers = at(59.5, "edge-refused-59")
        assert status == 429 and headers["Retry-After"] == "1"   # t0 leaves in half a second
        assert b"edge-refused-59" not in relays[0].seen()
        status, headers = at(60, "t60")   # exactly 60 s after t0: t0 has left the window
        assert status == 200 and headers["X-RateLimit-Remaining"] == "0"
        relays[0].clear()
        status, headers = at(60, "edge-refused-60")   # t30 and t60 fill it
        assert status == 429 and headers["Retry-After"] == "30"
        assert b"edge-refused-60" not in relays[0].seen()
        assert at(90, "t90")[0] == 200   # t30 gone at exactly 90 s
        assert reasons(g, key_id, 6) == ["", "", "rate_limited:rpm", "", "rate_limited:rpm", ""]
