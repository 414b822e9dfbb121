"""/admin/v1 audit search, one record, JSONL export, usage and overview, through a real seekgate and Triton."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from proxy.admin.audit import MAX_EXPORT
from proxy.audit.index import AuditIndex
from tests.frontend.test_http import call
from tests.gateway import Gateway, audit_records, gateway_via, wait_for
from tests.relay import TcpRelay


@pytest.fixture(scope="module")
def traffic(gw: Gateway) -> dict[str, Any]:
    """Two served generate calls and one policy refusal by one key, indexed before the tests read them."""
    key_id, key = gw.key(owner="svc-a", roles=("user",), limits={"daily_tokens": 1000})
    started = time.time()
    for text in ("Hello", "World"):
        assert call(gw.url + "/v2/models/deepseek/generate", "POST", {"text_input": text, "max_tokens": 3}, key)[0] == 200
    assert call(gw.url + "/v2/repository/index", "POST", {}, key)[0] == 403
    assert wait_for(lambda: sum(r["key_id"] == key_id for r in audit_records(gw)) == 3, 5.0)
    time.sleep(0.5)   # the index is written just after the JSONL line
    return {"key_id": key_id, "started": started}


def search(gw: Gateway, admin: str, **params: Any) -> tuple[int, Any]:
    status, _, raw = call(gw.url + "/admin/v1/audit?" + urlencode(params), key=admin)
    return status, json.loads(raw) if params.get("format") != "jsonl" else raw


def test_search_filters_pages_and_shows_one_record(gw: Gateway, admin: str, traffic: dict[str, Any]) -> None:
    status, page = search(gw, admin, key_id=traffic["key_id"])
    assert status == 200 and page["total"] == 3 and len(page["records"]) == 3
    assert [r["status"] for r in page["records"]] == ["denied", "allowed", "allowed"]   # newest first
    assert search(gw, admin, owner="svc-a", status="denied")[1]["total"] == 1
    assert search(gw, admin, key_id=traffic["key_id"], reason="policy")[1]["total"] == 1
    assert search(gw, admin, key_id=traffic["key_id"], model="deepseek")[1]["total"] == 2
    assert search(gw, admin, key_id=traffic["key_id"], client_ip="127.0.0.1")[1]["total"] == 3
    assert search(gw, admin, key_id=traffic["key_id"], since=traffic["started"] + 3600)[1]["total"] == 0
    second = search(gw, admin, key_id=traffic["key_id"], limit=1, offset=1)[1]
    assert second["total"] == 3 and second["records"] == page["records"][1:2]
    event_id = page["records"][0]["event_id"]
    status, _, raw = call(gw.url + f"/admin/v1/audit/{event_id}", key=admin)
    assert status == 200 and json.loads(raw) == page["records"][0]
    assert call(gw.url + "/admin/v1/audit/nope", key=admin)[0] == 404


def test_search_by_api_and_openai_endpoint(gw: Gateway, admin: str) -> None:
    key_id, key = gw.key(owner="svc-oa", roles=("user",))
    body = {"model": "deepseek", "prompt": "Hi", "max_tokens": 2}
    assert call(gw.url + "/v1/completions", "POST", body, key)[0] == 200
    assert call(gw.url + "/v2/models/deepseek/generate", "POST", {"text_input": "Hi", "max_tokens": 2}, key)[0] == 200
    assert wait_for(lambda: search(gw, admin, key_id=key_id)[1]["total"] == 2, 5.0)
    (oa,) = search(gw, admin, key_id=key_id, protocol="openai")[1]["records"]
    assert oa["openai"] == {"endpoint": "/v1/completions", "user": None, "runs_on": "deepseek_stream"}
    assert search(gw, admin, key_id=key_id, endpoint="/v1/completions")[1]["records"] == [oa]
    assert search(gw, admin, key_id=key_id, endpoint="/v1/chat/completions")[1]["total"] == 0
    (kserve,) = search(gw, admin, key_id=key_id, protocol="http")[1]["records"]
    assert kserve["path"] == "/v2/models/deepseek/generate" and kserve["openai"] is None


def test_export_is_jsonl_of_every_match(gw: Gateway, admin: str, traffic: dict[str, Any]) -> None:
    status, raw = search(gw, admin, key_id=traffic["key_id"], format="jsonl")
    assert status == 200
    lines = [json.loads(line) for line in raw.decode().splitlines()]
    assert len(lines) == 3 and {r["key_id"] for r in lines} == {traffic["key_id"]}


@pytest.mark.parametrize("params, message", [
    ({"colour": "red"}, "unknown filter(s): colour"),
    ({"status": "ok"}, "status must be allowed, denied or error"),
    ({"client_ip": "10.0.0.300"}, "client_ip: '10.0.0.300' is not an IP address"),
    ({"since": "yesterday"}, "since: 'yesterday' is neither an ISO 8601 time nor epoch seconds"),
    ({"since": "2026-01-02", "until": "2026-01-01"}, "until must be after since"),
    ({"since": "nan"}, "since: 'nan' is not a time"),   # matched nothing: an empty answer, not an error
    ({"until": "1e400"}, "until: '1e400' is not a time"),
    ({"limit": "501"}, "limit must be a whole number from 0 to 500"),
    ({"limit": "\u00b2"}, "limit must be a whole number from 0 to 500"),   # isdigit(), yet no int
    ({"limit": "\uff11"}, "limit must be a whole number from 0 to 500"),   # a fullwidth 1
    ({"offset": "9" * 5000}, "offset must be a whole number from 0 to"),   # past int()'s 4300 digits
    ({"owner": "ops\x00"}, "owner must not contain a NUL character"),
])
def test_bad_filters_get_400_and_say_which(gw: Gateway, admin: str, params: dict[str, str], message: str) -> None:
    status, doc = search(gw, admin, **params)
    assert status == 400 and doc["error"].startswith(message), doc


def test_usage_sums_served_tokens_per_key_with_its_budget(gw: Gateway, admin: str, traffic: dict[str, Any]) -> None:
    status, _, raw = call(gw.url + "/admin/v1/usage?group=key&period=day", key=admin)
    doc = json.loads(raw)
    assert status == 200
    rows = [r for r in doc["rows"] if r["key"] == traffic["key_id"]]
    assert len(rows) == 1 and rows[0]["requests"] == 2   # the refusal is not usage
    served = [r for r in audit_records(gw) if r["key_id"] == traffic["key_id"] and r["status"] == "allowed"]
    assert rows[0]["tokens"] == sum((r["input_tokens"] or 0) + (r["output_tokens"] or 0) for r in served) > 0
    assert doc["budgets"][traffic["key_id"]] == {"daily_tokens": 1000}
    by_owner = json.loads(call(gw.url + "/admin/v1/usage?group=owner&period=month", key=admin)[2])
    assert any(r["owner"] == "svc-a" and r["tokens"] == rows[0]["tokens"] for r in by_owner["rows"])
    assert call(gw.url + "/admin/v1/usage?group=colour", key=admin)[0] == 400
    assert call(gw.url + "/admin/v1/usage?days=%C2%B2", key=admin)[0] == 400   # "²": isdigit(), yet no int


def test_overview_counts_the_last_hour_and_names_top_keys(gw: Gateway, admin: str, traffic: dict[str, Any]) -> None:
    status, _, raw = call(gw.url + "/admin/v1/overview", key=admin)
    doc = json.loads(raw)
    assert status == 200 and len(doc["per_minute"]) == 60 and len(doc["tokens_per_day"]) == 14
    assert sum(p["requests"] for p in doc["per_minute"]) >= 3 and sum(p["errors"] for p in doc["per_minute"]) >= 1
    assert any(k["name"] == traffic["key_id"] and k["requests"] == 3 for k in doc["top_keys"])
    assert doc["triton_up"] in (True, None)


def test_only_a_key_the_policy_allows_reads_the_audit(gw: Gateway, traffic: dict[str, Any]) -> None:
    _, user = gw.key(owner="bob", roles=("user",))
    for path in ("/admin/v1/audit", "/admin/v1/usage", "/admin/v1/overview", "/admin/v1/policies"):
        assert call(gw.url + path, key=user)[0] == 403, path
    assert call(gw.url + "/admin/v1/audit")[0] == 401


def test_an_export_that_would_be_cut_short_says_so_instead(relay: TcpRelay, tmp_path: Path) -> None:
    """More matches than an export carries: a 400 naming the count, never the newest 100000 passed off as all."""
    with gateway_via(tmp_path, relay) as gw:
        admin = gw.key(owner="ops", roles=("admin",))[1]
        index = AuditIndex(gw.data_dir / "audit" / "audit.db")   # the real index the writer keeps
        start = time.time() - 2 * 86400
        index.insert([{"timestamp": datetime.fromtimestamp(start + i / 100, timezone.utc).isoformat(),
                       "event_id": f"bulk{i:028x}", "key_id": "bulkbulkbulk", "status": "denied",
                       "http_status": 403, "reason": "policy_denied", "client_ip": "10.0.0.1"}
                      for i in range(MAX_EXPORT + 1)])
        index.close()
        status, raw = search(gw, admin, key_id="bulkbulkbulk", format="jsonl")
        assert status == 400, status
        assert json.loads(raw)["error"].startswith(f"{MAX_EXPORT + 1} records match; an export carries at most")
        status, raw = search(gw, admin, key_id="bulkbulkbulk", format="jsonl", limit="3", offset=str(MAX_EXPORT - 1))
        assert status == 200 and [json.loads(line)["event_id"] for line in raw.decode().splitlines()] == [
            f"bulk{1:028x}", f"bulk{0:028x}"]   # the oldest, paged to on purpose
        status, raw = search(gw, admin, key_id="bulkbulkbulk", format="jsonl", offset="1")
        assert status == 200 and len(raw.decode().splitlines()) == MAX_EXPORT


def test_a_nul_in_a_filter_is_a_400_on_the_shared_postgresql_index(relay: TcpRelay, pg_url: str,
                                                                    tmp_path: Path) -> None:
    """PostgreSQL's text refuses a NUL: the search reached it and answered 500, not which filter was wrong."""
    with gateway_via(tmp_path, relay, **{"store.url": pg_url, "store.auto_migrate": True}) as gw:
        admin = gw.key(owner="ops", roles=("admin",))[1]
        assert search(gw, admin, owner="ops")[0] == 200   # the shared index answers
        for name in ("owner", "key_id", "model", "reason", "endpoint", "protocol"):
            status, doc = search(gw, admin, **{name: "a\x00b"})
            assert status == 400 and doc == {"error": f"{name} must not contain a NUL character"}, (name, status, doc)
