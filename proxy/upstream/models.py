"""What seekgate reads of Triton's models: names from its repository index (metrics label by name,
others are `other`), and a model's own max_tokens default and cap from its config (the role cap counts the
default; the OpenAI door's chat default is the cap)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import quote

from .pool import UpstreamError, UpstreamPool

log = logging.getLogger(__name__)

INDEX = "/v2/repository/index"
MAX_MODELS = 64   # label values per model label: a repository of thousands must not become thousands of series
REFRESH_S = 60.0   # models load rarely; each read is one request through to Triton


def model_names(index: object, limit: int = MAX_MODELS, ready_only: bool = False) -> list[str]:
    """Distinct names in a repository-index answer (`[{"name": ..., "version": ..., "state": ...}]`), at most `limit`.

    Sorted, so which names make the cut does not depend on the order Triton lists them in.
    Anything that is not a list of objects with a string name yields no names. `ready_only`: only
    those with a READY version (an entry that states no state counts as ready: older Tritons list none).
    """
    if not isinstance(index, list):
        return []
    names = {entry["name"] for entry in index if isinstance(entry, dict) and isinstance(entry.get("name"), str)
             and (not ready_only or entry.get("state", "READY") == "READY")}
    return sorted(names)[:limit]


async def repository_index(pool: UpstreamPool) -> object:
    """Triton's answer to POST /v2/repository/index, decoded; raises UpstreamError if Triton is away."""
    answer = await pool.request("POST", INDEX, (("Content-Type", "application/json"),), b"{}")
    try:
        body = await answer.read()
    finally:
        answer.release()
    if answer.status != 200:
        raise UpstreamError(f"{INDEX} answered {answer.status}")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise UpstreamError(f"{INDEX}: not JSON ({exc})") from None


async def repository_models(pool: UpstreamPool, limit: int = MAX_MODELS) -> list[str]:
    """Triton's model names (ready or not) from its repository index; raises UpstreamError if Triton is away."""
    return model_names(await repository_index(pool), limit)


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


# Datatypes Triton's classification extension reads as scores. It is refused on any other output:
# classifying a TYPE_STRING output (deepseek's text_output) kills tritonserver 2.51 outright.
CLASSIFIABLE_TYPES = frozenset({"TYPE_INT8", "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_UINT8",
                                "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_FP32", "TYPE_FP64"})


@dataclass(frozen=True, slots=True)
class MaxTokensDefault:
    """Whether a model takes a `max_tokens` input, what it generates when a request names none
    (its config's `default_max_tokens` parameter; None: it declares none), which of its outputs
    may be classified (numeric ones: CLASSIFIABLE_TYPES), and the most max_tokens it accepts (its
    `max_tokens_cap` parameter; None: it declares none)."""

    takes_max_tokens: bool
    default: int | None
    classifiable: frozenset[str] = frozenset()
    cap: int | None = None


def max_tokens_default(config: object) -> MaxTokensDefault | None:
    """From a model-config answer (`{"input": [{"name": ...}], "parameters": {k: {"string_value": v}}}`);
    None when the answer is not such an object."""
    if not isinstance(config, dict) or not isinstance(config.get("input", []), list):
        return None
    takes = any(isinstance(i, dict) and i.get("name") == "max_tokens" for i in config.get("input", []))
    params = config.get("parameters")
    default = _int_parameter(params, "default_max_tokens")
    cap = _int_parameter(params, "max_tokens_cap")
    outputs = config.get("output", [])
    classifiable = frozenset(o["name"] for o in (outputs if isinstance(outputs, list) else [])
                             if isinstance(o, dict) and isinstance(o.get("name"), str)
                             and o.get("data_type") in CLASSIFIABLE_TYPES)
    return MaxTokensDefault(takes, default, classifiable, cap or None)   # a cap of 0 states none


def _int_parameter(params: object, key: str) -> int | None:
    """A config parameter's `{"string_value": "512"}` as an int; None when absent or not digits."""
    value = params.get(key) if isinstance(params, dict) else None
    text = value.get("string_value") if isinstance(value, dict) else None
    return int(text) if isinstance(text, str) and text.strip().isdigit() else None


class MaxTokensDefaults:
    """Per model, read from GET /v2/models/<name>/config when first needed and kept REFRESH_S.

    Only readable answers are kept (model names come from clients: failures are not remembered),
    and at most MAX_MODELS of them."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._known: dict[str, tuple[float, MaxTokensDefault]] = {}

    async def get(self, model: str) -> MaxTokensDefault | None:
        """The model's default, or None when Triton cannot say (away, unknown model, unreadable)."""
        now = time.monotonic()
        kept = self._known.get(model)
        if kept is not None and now - kept[0] < REFRESH_S:
            return kept[1]
        try:
            answer = await asyncio.wait_for(self._read(model), 5)
        except (UpstreamError, asyncio.TimeoutError, ValueError):
            return None
        if answer is not None:
            if len(self._known) >= MAX_MODELS:
                self._known.clear()
            self._known[model] = (now, answer)
        return answer

    async def _read(self, model: str) -> MaxTokensDefault | None:
        answer = await self._pool.request("GET", f"/v2/models/{quote(model, safe='')}/config", ())
        try:
            body = await answer.read()
        finally:
            answer.release()
        return max_tokens_default(json.loads(body)) if answer.status == 200 else None
