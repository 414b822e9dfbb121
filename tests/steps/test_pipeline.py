"""pipeline's audit finish: commit_audit (strict audit's durable record) and finish() together, on a real writer."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from proxy.audit.writer import AuditWriter
from proxy.context import RequestContext
from proxy.metrics import Metrics
from proxy.steps.pipeline import commit_audit, finish


async def test_a_commit_cancelled_while_its_record_is_written_leaves_one_record(tmp_path: Path) -> None:
    """Strict audit: a stream's end waits for its record (commit_audit); a client that leaves then cancels the
    wait (cancel_on_leave), and request_path's finish() runs with 499. The record already queued is written
    all the same: finish() must not add a second record for the same request."""
    writer = AuditWriter(tmp_path, durability="strict")
    await writer.start()
    state: Any = SimpleNamespace(audit=writer, metrics=Metrics())
    ctx = RequestContext(request_id="r-cancelled-commit", client_ip="127.0.0.1", protocol="openai", method="POST",
                         path="/v1/chat/completions", http_status=200, input_tokens=5, output_tokens=7)
    commit = asyncio.create_task(commit_audit(state, ctx))
    await asyncio.sleep(0)   # queued, its write under way
    commit.cancel()          # the client left meanwhile
    with pytest.raises(asyncio.CancelledError):
        await commit
    ctx.status, ctx.reason, ctx.http_status = "error", "client_disconnected", 499   # as request_path sets it
    finish(state, ctx)
    await writer.close()
    records = [json.loads(line) for line in writer.jsonl_path.read_text().splitlines()]
    assert [(r["request_id"], r["input_tokens"], r["output_tokens"]) for r in records] == [
        ("r-cancelled-commit", 5, 7)]
