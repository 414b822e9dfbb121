"""The benchmark's pieces, for correctness only (no timing): passthrough, policy, load generator, report."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from bench import burstclient, inprocess, loadgen, matrix, memory, micro, report, stack
from bench.passthrough import build_app
from proxy.context import Principal, Resource
from proxy.local.triton import TritonProcess
from proxy.steps.authz import Authorizer
from proxy.steps.policy import load_policy_dir
from tests.conftest import start_triton

NOON = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def bench_triton(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    """Triton on the bench's repository (deepseek + trivial): the session `triton` serves triton_models/ only."""
    root = tmp_path_factory.mktemp("bench-triton")
    proc = start_triton(root / "data", tiny_checkpoint, repository=stack.model_repository(root))
    yield proc
    proc.stop()


def bench_principal(**overrides: Any) -> Principal:
    fields: dict[str, Any] = {"key_id": "benchkey0001", "tier": "user", "owner": "bench",
                              "roles": stack.BENCH_ROLES, "labels": dict(stack.BENCH_LABELS),
                              "models": stack.BENCH_MODELS}
    return Principal(**{**fields, **overrides})


# ---------------------------------------------------------------- passthrough (b)

# pytest-aiohttp's aiohttp_client lives on the session loop (the fixture loop scope in pyproject).
@pytest.mark.asyncio(loop_scope="session")
async def test_passthrough_forwards_to_real_triton(bench_triton: TritonProcess, aiohttp_client: Any) -> None:
    client: TestClient = await aiohttp_client(build_app(bench_triton.http_url))
    path, body = matrix.request_for("trivial", 8)
    async with client.post(path, data=body, headers={"Content-Type": "application/json"}) as r:
        assert r.status == 200
        out = await r.json()
    assert out["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]

    path, body = matrix.request_for("deepseek", 4)
    async with client.post(path, data=body) as r:
        assert r.status == 200
        proxied = await r.json()
    status, direct = post(bench_triton.http_url + path, body)
    assert status == 200 and proxied["output_tokens"] == 4
    assert proxied["text_output"] == json.loads(direct)["text_output"]

    # Triton's own refusals pass through with their status and body.
    status, direct = post(bench_triton.http_url + "/v2/models/nope/infer", b"{}")
    async with client.post("/v2/models/nope/infer", data=b"{}") as r:
        assert (r.status, await r.read()) == (status, direct) and status >= 400


def post(url: str, body: bytes) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=60) as r:
            return r.status, bytes(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, bytes(exc.read())


def test_passthrough_process_under_wrk(bench_triton: TritonProcess, tmp_path: Path) -> None:
    """`python -m bench.passthrough` serves, and the load generator's POST is a valid request (no errors)."""
    service = stack.start_passthrough(bench_triton.http_url, tmp_path / "passthrough.log")
    try:
        load = matrix.load_for(service.url, "trivial", 8, key=None)
        measured = loadgen.measure(loadgen.find_tool(), load, concurrency=2, seconds=1)
    finally:
        service.stop()
    assert measured.errors == 0, measured.first_error
    assert measured.requests > 0 and measured.p50_ms is not None and measured.p99_ms is not None


# ---------------------------------------------------------------- seekgate (c), as the matrix starts it

def test_seekgate_with_bench_policy_and_cli_key(bench_triton: TritonProcess, tmp_path: Path) -> None:
    config = stack.seekgate_config(tmp_path / "gate", stack.upstream_of(bench_triton))
    key = stack.create_key(config)
    gate = stack.start_seekgate(config)
    try:
        for model in ("trivial", "deepseek"):
            matrix.check_once(matrix.load_for(gate.url, model, 2, key))
        with pytest.raises(RuntimeError, match="answered 401"):
            matrix.check_once(matrix.load_for(gate.url, "trivial", 2, key=None))
    finally:
        gate.stop()
    records = [json.loads(line) for line in (tmp_path / "gate" / "data" / "audit" / "audit.jsonl").open()]
    # The allowed request was decided by the bench key's rule, late in the list; the keyless one refused.
    assert any(r.get("model") == "trivial" and r.get("status") == "allowed" and r.get("rule") == "bench-loopback"
               for r in records)
    assert any(r.get("status") == "denied" and r.get("http_status") == 401 for r in records)


def test_seekgate_that_cannot_start_is_unavailable(tmp_path: Path) -> None:
    config = stack.seekgate_config(tmp_path / "gate", {"http_url": "http://127.0.0.1:9"},
                                   policy_dir=tmp_path / "missing")
    with pytest.raises(stack.Unavailable, match="exited with"):
        stack.start_seekgate(config)


# ---------------------------------------------------------------- the 50-rule policy

def test_bench_policy_allows_the_bench_key_late_and_denies_others() -> None:
    policy = load_policy_dir(stack.POLICY_DIR)
    ids = [r.id for r in policy.rules]
    assert len(ids) == 50 and ids.index("bench-loopback") >= 45
    authz = Authorizer(policy)
    infer = Resource("model:trivial", "infer", model="trivial")

    def decide(p: Principal, resource: Resource = infer, ip: str = "127.0.0.1") -> tuple[bool, str]:
        d = authz.authorize(p, resource, ip, NOON)
        return d.allowed, d.rule

    assert decide(bench_principal()) == (True, "bench-loopback")
    assert decide(bench_principal(), Resource("model:deepseek", "infer", model="deepseek"), "::1") == \
        (True, "bench-loopback")
    assert decide(bench_principal(roles=("guest",))) == (False, "default_deny")
    assert decide(bench_principal(labels={"team": "perf"})) == (False, "default_deny")
    assert decide(bench_principal(), ip="10.9.9.9") == (False, "default_deny")
    assert decide(bench_principal(models=("deepseek",))) == (False, "default_deny")
    assert decide(bench_principal(roles=("bench", "offboarded"))) == (False, "deny-offboarded")
    assert decide(bench_principal(), Resource("repository", "admin")) == (False, "deny-triton-admin")


# ---------------------------------------------------------------- load generator output

def test_wrk_script_and_parsers() -> None:
    script = loadgen.wrk_script(loadgen.Load("http://x/y", b'{"a": "]]"}', (("Authorization", "Bearer k"),)))
    assert 'wrk.body = [=[{"a": "]]"}]=]' in script and "wrk.headers[ [[Authorization]] ] = [[Bearer k]]" in script
    wrk_out = ("Running 1s test\n"
               'BENCHJSON {"requests": 110, "duration_us": 2000000, "p50_us": 1500, "p99_us": 9000, '
               '"connect": 0, "read": 0, "write": 0, "status": 10, "timeout": 0}\n')
    m = loadgen.parse_wrk(wrk_out, 4)
    assert (m.requests, m.errors, m.requests_per_s, m.p50_ms, m.p99_ms) == (110, 10, 50.0, 1.5, 9.0)
    assert m.first_error is not None and "10 non-2xx" in m.first_error
    hey_out = ("response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset\n"
               + "".join(f"0.00{i},0,0,0,0,0,200,0.1\n" for i in range(1, 10)) + "0.5,0,0,0,0,0,503,0.2\n")
    h = loadgen.parse_hey_csv(hey_out, 2, 3.0)
    assert (h.requests, h.errors, h.requests_per_s, h.p50_ms) == (10, 1, 3.0, 5.0)
    # Rounds of one cell: counts and time summed, req/s over the summed time, median percentiles.
    both = loadgen.combine([m, loadgen.Measured("wrk", 4, 300, 0, 3.0, 100.0, 2.5, 7.0)])
    assert (both.requests, both.errors, both.seconds, both.requests_per_s) == (410, 10, 5.0, 80.0)
    assert (both.p50_ms, both.p99_ms) == (2.0, 8.0) and both.first_error == m.first_error


def test_burst_client_reads_sized_chunked_and_error_answers_on_one_connection() -> None:
    peers: list[Any] = []

    async def sized(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        return web.json_response({"echo": await request.json(), "auth": request.headers.get("Authorization")})

    async def chunked(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b'{"a":', b" 1}"):
            await response.write(part)
        await response.write_eof()
        return response

    async def exchange() -> list[burstclient.Response]:
        app = web.Application()
        app.router.add_post("/sized", sized)
        app.router.add_get("/chunked", chunked)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        conn = await burstclient.Connection.open(url)
        try:
            return [await conn.send(burstclient.build_request("POST", url + "/sized", {"Authorization": "Bearer k"},
                                                              {"x": 1})),
                    await conn.send(burstclient.build_request("GET", url + "/chunked")),
                    await conn.send(burstclient.build_request("GET", url + "/nothing?q=1")),
                    await conn.send(burstclient.build_request("POST", url + "/sized", body=[2]))]
        finally:
            await conn.close()
            await runner.cleanup()

    sized_answer, chunked_answer, missing, again = stack.run_loop(exchange())
    assert (sized_answer.status, sized_answer.json()) == (200, {"echo": {"x": 1}, "auth": "Bearer k"})
    assert (chunked_answer.status, chunked_answer.json()) == (200, {"a": 1})
    assert missing.status == 404 and b"Not Found" in missing.body
    assert (again.status, again.json()) == (200, {"echo": [2], "auth": None})
    assert len(peers) == 3 and len(set(peers)) == 1   # every request on the one kept-alive connection


def test_config_parameters_reads_a_config_pbtxts_string_parameters() -> None:
    text = (Path(__file__).resolve().parent.parent / "triton_models" / "deepseek" / "config.pbtxt").read_text()
    params = inprocess.config_parameters(text)
    assert params["scheduling"] == "inflight" and params["max_running_sequences"] == "32"
    assert params["admit_wait_ms"] == "5" and "checkpoint" in params


def test_the_in_process_engine_path_runs_both_modes_from_their_repositories(tiny_checkpoint: Path,
                                                                             tmp_path: Path) -> None:
    from bench import batching

    configs = {mode: batching.repository(tmp_path, mode, gpu=False) / "deepseek" / "config.pbtxt"
               for mode in ("static", "inflight")}
    engines = inprocess.InProcessEngines(tiny_checkpoint, configs, gpu=False)
    try:
        assert {mode: e.settings.scheduling for mode, e in engines.engines.items()} == {
            "static": "static", "inflight": "inflight"}
        plan = batching.workload("burst", 4, 2, 6, 0)
        for mode in ("static", "inflight"):
            got = engines.run(mode, plan, short=2)
            # Two short and two long requests run to max_tokens: 5 decode steps after the prefill.
            assert (got["requests"], got["failed"], got["tokens"], got["steps"]) == (4, 0, 16, 5), (mode, got)
            assert got["short_p50_s"] and got["long_p50_s"] and got["ttft_p50_s"]
        refused = engines.run("inflight", [(0.0, "too long", 300)], short=2)   # over the 256-token context
        assert refused["failed"] == 1 and "token budget" in refused["errors"][0]
    finally:
        engines.close()


def test_batching_engine_only_runs_no_server_and_reports_the_engine_path(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from bench import batching

    out = tmp_path / "out.json"
    assert batching.main(["--engine-only", "--device", "cpu", "--rounds", "1", "--burst", "4", "--poisson", "4",
                          "--gap-ms", "5", "--short", "2", "--long", "6", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert sorted((r["workload"], r["path"], r["mode"]) for r in rows) == [
        ("burst", "engine", "inflight"), ("burst", "engine", "static"),
        ("poisson", "engine", "inflight"), ("poisson", "engine", "static")]
    assert all(r["m"]["failed"] == 0 and r["m"]["tokens"] == 16 for r in rows)
    assert "short p50 >= 10x lower (tiny burst engine)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        batching.parse_args(["--engine-only", "--no-engine"])


# ---------------------------------------------------------------- the table and the JSON

def rows_for_report() -> list[report.Row]:
    def m(rps: float, p50: float) -> dict[str, Any]:
        return {"requests_per_s": rps, "p50_ms": p50, "p99_ms": p50 * 3, "requests": int(rps * 10), "errors": 0}
    return report.add_ratios([
        report.cell("trivial", 1, "a", m(1000, 1.0)), report.cell("trivial", 1, "b", m(800, 1.2)),
        report.cell("trivial", 1, "c", m(400, 1.7), proxy_cpu_ms_per_request=0.5),
        report.cell("trivial", 1, "d", unavailable="seekgate x2 exited with 2: no --workers"),
        report.cell("deepseek", 32, "a", m(100, 50.0)), report.cell("deepseek", 32, "b", m(99, 51.0)),
        report.cell("deepseek", 32, "c", m(98, 52.0)),
    ])


def test_report_has_ratio_columns_and_targets() -> None:
    rows = rows_for_report()
    c = next(r for r in rows if (r["model"], r["path"]) == ("trivial", "c"))
    assert (c["ratio_vs_b"], c["ratio_vs_a"], c["added_p50_ms_vs_a"]) == (0.5, 0.4, 0.7)
    table = report.format_table(rows)
    header = table.splitlines()[0].split()
    assert {"req/s", "/b", "/a", "+p50/a"} <= set(header)
    c_line = next(line for line in table.splitlines() if line.startswith("trivial") and " c seekgate " in line)
    assert "0.50" in c_line and "0.40" in c_line and "+0.70" in c_line
    assert "unavailable: seekgate x2 exited with 2" in table
    # trivial c1 c/b 0.5, trivial c32 (no rows), trivial c1 +0.7 ms, deepseek c32 c/a 0.98
    assert [t["verdict"] for t in report.targets(rows)] == ["NOT MET", "n/a", "NOT MET", "MET"]
    doc = json.loads(json.dumps(report.document(rows, {"duration_s": 1}, {"cpu_count": 2}, "now")))
    assert doc["results"][2]["ratio_vs_b"] == 0.5 and doc["targets"][-1]["verdict"] == "MET"
    b = next(r for r in rows if (r["model"], r["path"]) == ("trivial", "b"))
    assert b["ratio_vs_a"] == 0.8 and "ratio_vs_b" not in b   # the passthrough's own cost of the hop
    assert doc["targets"][-1]["passthrough_vs_a"] == 0.99
    assert "(measured 0.98; the bare passthrough: b/a 0.99)" in report.format_targets(report.targets(rows))
    rows[0]["rounds_requests_per_s"] = [900.0, 1100.0]
    rows[1]["rounds_requests_per_s"] = [100.0, 1500.0]
    assert report.noisy(rows) == ["trivial c1 b: rounds 100, 1500 req/s"]


# ---------------------------------------------------------------- the commands, scaled down

def test_matrix_end_to_end_on_a_running_triton(bench_triton: TritonProcess, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "matrix.json"
    code = matrix.main(["--triton-url", bench_triton.http_url, "--triton-grpc",
                        f"127.0.0.1:{bench_triton.launch.grpc_port}", "--models", "trivial",
                        "--concurrency", "1,2", "--duration", "1", "--warmup", "0", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    cells = {(r["concurrency"], r["path"]): r for r in doc["results"]}
    assert set(cells) == {(c, p) for c in (1, 2) for p in "abcd"}
    for conc in (1, 2):
        assert all(cells[conc, p]["requests"] > 0 and cells[conc, p]["errors"] == 0 for p in "abc")
        assert cells[conc, "c"]["ratio_vs_b"] is not None and cells[conc, "c"]["ratio_vs_a"] is not None
        d = cells[conc, "d"]
        assert d["unavailable"] or (d["requests"] > 0 and d["errors"] == 0)
    assert "/b" in capsys.readouterr().out


def test_model_cpus_take_some_but_never_all_of_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert matrix.cpu_list("0") == {0} and matrix.cpu_list("0,2") == {0, 2} and matrix.cpu_list("1-3") == {1, 2, 3}
    for bad in ("0-3", "4", "7-9", "x", ""):
        with pytest.raises(ValueError):
            matrix.cpu_list(bad)
    assert matrix.parse_args(["--model-cpus", "0-1"]).model_cpus == {0, 1}
    with pytest.raises(SystemExit):   # an external Triton cannot be placed
        matrix.parse_args(["--model-cpus", "0", "--triton-url", "http://127.0.0.1:8000"])


def test_micro_runs_every_operation(tmp_path: Path) -> None:
    assert micro.main(["--seconds", "0.02", "--json", str(tmp_path / "micro.json")]) == 0
    rows = json.loads((tmp_path / "micro.json").read_text())["results"]
    names = {r["name"] for r in rows}
    assert {"key verify, cold", "key verify, cached r0", "session verify, cold", "session verify, cached r0",
            "ABAC decision, cold", "ABAC decision, cached"} <= names
    # The configured interval has its own row (the one the target reads), unless it is 0 already.
    assert any(r["name"].startswith("key verify, cached") and r["note"].endswith("(the default)") for r in rows)
    assert all(r["ops"] > 0 for r in rows)


def test_memory_drives_the_request_path_with_many_keys(tmp_path: Path) -> None:
    assert memory.main(["--requests", "300", "--keys", "30", "--json", str(tmp_path / "mem.json")]) == 0
    out = json.loads((tmp_path / "mem.json").read_text())
    assert set(out["marks"]) == {"30", "300"}
    assert out["marks"]["300"]["key_cache"] == 30 and out["marks"]["300"]["limiter_keys"] == 30
    assert out["verdict"] in ("MET", "NOT MET")
