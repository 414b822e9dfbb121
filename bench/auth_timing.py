#!/usr/bin/env python
"""Does the answer time tell whether a key id exists? Medians of the two failure paths, side by side.

What it does
    Opens a real SQLite key store and the server's keyring (envelope-encrypted pepper) in a temp
    dir, issues 50 user keys, then calls `authn.authenticate` -- with the server's key cache, as
    `serve` runs it -- with two kinds of well-formed keys (valid checksum), interleaved so both
    see the same machine state:

      unknown id     a key id the store has never seen
      wrong secret   the last issued key's id with another secret

    Both must fail with the same 401; the attacker's question is whether one takes longer. A
    third row, that key itself (a success, uncached), is the baseline for scale.

What it prints
    Per path: the median, p10 and p90 in microseconds over --tries calls; then the gap between
    the two failure medians against the issue 14 target (within 5 us), reported, never asserted.

Usage
    python bench/auth_timing.py [--tries 2000] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.errors import Unauthenticated  # noqa: E402
from proxy.keys.cache import KeyCache  # noqa: E402
from proxy.keys.format import PREFIX, _checksum, generate_key, parse_key  # noqa: E402
from proxy.keys.issue import issue_key  # noqa: E402
from proxy.keys.secrets_setup import open_keyring  # noqa: E402
from proxy.paths import store_path  # noqa: E402
from proxy.settings import load_settings  # noqa: E402
from proxy.steps.authn import authenticate  # noqa: E402
from proxy.store.sqlite import SqliteStore  # noqa: E402

TARGET_US = 5.0
KEYS = 50
CLIENT_IP = "127.0.0.1"


def with_id(key_id: str) -> str:
    """A well-formed key (valid checksum) for `key_id` with a fresh random secret."""
    _, token = generate_key()
    secret = token[len(PREFIX):].split("_", 1)[1].rsplit("_", 1)[0]
    body = f"{PREFIX}{key_id}_{secret}_"
    return body + _checksum(body)


async def measure(tries: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="seekgate-authtiming-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        settings = load_settings(None, env={}, overrides={"data_dir": str(data_dir)})
        store = await SqliteStore.open(store_path(data_dir))
        keyring = await open_keyring(settings, data_dir, store)
        try:
            # A store with some keys in it: the one an unknown id stands in for is not the one probed.
            issued = [await issue_key(store, keyring.pepper, tier="user", owner=f"bench{i}", roles=("user",),
                                      expires_in_s=86400, now=time.time()) for i in range(KEYS)]
            rec, token = issued[-1]
            cache = KeyCache.from_settings(settings.auth)
            samples: dict[str, list[float]] = {"unknown id": [], "wrong secret": [], "valid key (uncached)": []}

            async def once(credential: str, use_cache: bool = True) -> float:
                t0 = time.perf_counter()
                try:
                    await authenticate(credential, store, keyring.pepper, CLIENT_IP, time.time(),
                                       keyring.sessions, cache if use_cache else None)
                except Unauthenticated:
                    pass
                return (time.perf_counter() - t0) * 1e6

            for _ in range(200):   # warm-up: SQLite page cache, code paths
                await once(with_id("zzzzzzzzzzzz"))
                await once(with_id(rec.key_id))
            for _ in range(rounds):
                for i in range(tries // rounds):
                    # A fresh credential each call: failures are never cached, and a new one proves it.
                    pair = [("unknown id", with_id(generate_key()[0])), ("wrong secret", with_id(rec.key_id))]
                    for name, credential in (pair if i % 2 else pair[::-1]):
                        parse_key(credential)
                        samples[name].append(await once(credential))
                    samples["valid key (uncached)"].append(await once(token, use_cache=False))
        finally:
            await store.close()
            keyring.close()
    rows = {name: {"median_us": statistics.median(v), "p10_us": statistics.quantiles(v, n=10)[0],
                   "p90_us": statistics.quantiles(v, n=10)[-1], "n": len(v)} for name, v in samples.items()}
    gap = rows["wrong secret"]["median_us"] - rows["unknown id"]["median_us"]
    return {"rows": rows, "gap_us": gap, "target_us": TARGET_US, "met": abs(gap) <= TARGET_US}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tries", type=int, default=2000, help="calls per failure path (default 2000)")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds the tries are split into")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    out = asyncio.run(measure(args.tries, args.rounds))
    print(f"{'path':<24}{'median us':>11}{'p10 us':>9}{'p90 us':>9}{'n':>7}")
    for name, r in out["rows"].items():
        print(f"{name:<24}{r['median_us']:>11.1f}{r['p10_us']:>9.1f}{r['p90_us']:>9.1f}{r['n']:>7}")
    verdict = "met" if out["met"] else "NOT met"
    print(f"\nwrong secret - unknown id: {out['gap_us']:+.1f} us (target: within {TARGET_US:g} us): {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
