"""One replica's limiter in a process of its own, for the cross-process tests of test_redis_limiter.py.

`python -m tests.state.redis_worker burst URL PREFIX START_AT ATTEMPTS`: at START_AT (wall time) fires
ATTEMPTS admissions at each of the four test keys at once, holds every grant, prints what it got as JSON.
`python -m tests.state.redis_worker steady URL PREFIX START_AT ATTEMPTS`: at START_AT, ATTEMPTS admissions
one after another at the rpm, tpm and daily keys in turn (a busy key, served from reserved slots), each
settled at once with its charge; prints what it got, and how much of it from slots, as JSON.
`python -m tests.state.redis_worker hold URL PREFIX LEASE_S`: takes the one concurrency slot of key
"held", prints "held" and waits to be killed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from proxy.quotas import Limits
from proxy.state.limits import OverLimit, Scope
from proxy.state.redis_limiter import RedisLimiter

# The limits the burst test holds three processes to, with the tokens each request charges.
BURST = {
    "rpm": (Limits(rpm=60), 0),
    "tpm": (Limits(tpm=1000), 30),
    "conc": (Limits(concurrency=5), 0),
    "daily": (Limits(daily_tokens=500), 7),
}


async def burst(url: str, prefix: str, start_at: float, attempts: int) -> dict[str, int]:
    limiter = RedisLimiter(url, prefix=prefix, timeout_s=5.0)
    await limiter.start()
    await asyncio.sleep(max(0.0, start_at - time.time()))

    async def one(name: str) -> int:
        limits, tokens = BURST[name]
        try:
            await limiter.acquire([Scope(name, limits)], tokens)   # held, never settled: slots stay taken
        except OverLimit:
            return 0
        return 1

    names = [n for n in BURST for _ in range(attempts)]
    got = await asyncio.gather(*(one(n) for n in names))
    admitted = {n: 0 for n in BURST}
    for n, ok in zip(names, got, strict=True):
        admitted[n] += ok
    await limiter.close()
    return admitted


async def steady(url: str, prefix: str, start_at: float, attempts: int) -> dict[str, int]:
    limiter = RedisLimiter(url, prefix=prefix, timeout_s=5.0)
    await limiter.start()
    await asyncio.sleep(max(0.0, start_at - time.time()))
    admitted = {"rpm": 0, "tpm": 0, "daily": 0}
    from_slots = 0
    for _ in range(attempts):
        for name in admitted:
            limits, tokens = BURST[name]
            try:
                grant = await limiter.acquire([Scope(name, limits)], tokens)
            except OverLimit:
                continue
            admitted[name] += 1
            from_slots += "#" in getattr(grant, "gid", "")
            limiter.settle(grant, tokens)
    await limiter.close()
    return {**admitted, "from_slots": from_slots}


async def hold(url: str, prefix: str, lease_s: float) -> None:
    limiter = RedisLimiter(url, prefix=prefix, lease_s=lease_s)
    await limiter.start()
    await limiter.acquire([Scope("held", Limits(concurrency=1))], 0)
    print("held", flush=True)
    await asyncio.sleep(3600)   # renewing the lease until killed


if __name__ == "__main__":
    cmd, url, prefix, *rest = sys.argv[1:]
    if cmd in ("burst", "steady"):
        run = burst if cmd == "burst" else steady
        print(json.dumps(asyncio.run(run(url, prefix, float(rest[0]), int(rest[1])))), flush=True)
    else:
        asyncio.run(hold(url, prefix, float(rest[0])))
