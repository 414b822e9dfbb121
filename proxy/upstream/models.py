"""The model names Triton serves, from its repository index: what metrics label by name (others are `other`)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable

from .pool import UpstreamError, UpstreamPool

log = logging.getLogger(__name__)

INDEX = "/v2/repository/index"
MAX_MODELS = 64   # label values per model label: a repository of thousands must not become thousands of series
REFRESH_S = 60.0   # models load rarely; each read is one request through to Triton


def model_names(index: object, limit: int = MAX_MODELS) -> list[str]:
    """Distinct names in a repository-index answer (`[{"name": ..., "version": ..., "state": ...}]`), at most `limit`.

    Sorted, so which names make the cut does not depend on the order Triton lists them in.
    Anything that is not a list of objects with a string name yields no names.
    """
    if not isinstance(index, list):
        return []
    names = {entry["name"] for entry in index if isinstance(entry, dict) and isinstance(entry.get("name"), str)}
    return sorted(names)[:limit]


async def repository_models(pool: UpstreamPool, limit: int = MAX_MODELS) -> list[str]:
    """Triton's model names (ready or not) from POST /v2/repository/index; raises UpstreamError if Triton is away."""
    answer = await pool.request("POST", INDEX, (("Content-Type", "application/json"),), b"{}")
    try:
        body = await answer.read()
    finally:
        answer.release()
    if answer.status != 200:
        raise UpstreamError(f"{INDEX} answered {answer.status}")
    try:
        return model_names(json.loads(body), limit)
    except ValueError as exc:
        raise UpstreamError(f"{INDEX}: not JSON ({exc})") from None


async def refresh_models(pool: UpstreamPool, apply: Callable[[Iterable[str]], None]) -> bool:
    """One read of the index handed to `apply`; False (and `apply` not called) while Triton cannot answer."""
    try:
        names = await asyncio.wait_for(repository_models(pool), 5)
    except (UpstreamError, asyncio.TimeoutError) as exc:
        # Triton away is reported by seekgate_upstream_up; here it only means: keep the last names.
        log.debug("reading Triton's model names failed, keeping the last ones: %s", exc)
        return False
    apply(names)
    return True


async def watch_models(pool: UpstreamPool, apply: Callable[[Iterable[str]], None], known: bool,
                       interval: float = REFRESH_S) -> None:
    """Re-reads the index every `interval` (every second until a read succeeded): models loaded later get labels.

    `known`: whether the read at start succeeded.
    """
    while True:
        await asyncio.sleep(interval if known else 1.0)
        known = await refresh_models(pool, apply) or known
