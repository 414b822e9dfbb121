"""The crypto operations both doors offer (`seekgate crypto`, /admin/v1/crypto): rotations and status.

The CLI runs them on a keyring of its own, the admin API on its server's, so a rotated
signing key signs there at once; other processes pick a change up within crypto.refresh_interval_s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.keys.rotation import Keyring

ACTIONS: dict[str, tuple[str, Callable[[Keyring], Any]]] = {
    "rotate-dek": ("new data key for new writes; re-encrypt every stored secret under it",
                   lambda k: k.rotate_dek()),
    "rotate-root": ("new root at the KEK provider; re-wrap every data key (secrets untouched)",
                    lambda k: k.rotate_root()),
    "rotate-jwt": ("new session signing key; the old kid verifies for session TTL + leeway",
                   lambda k: k.rotate_jwt()),
    "rotate-pepper": ("new key-hashing pepper; keys are re-hashed on their next successful use",
                      lambda k: k.rotate_pepper()),
    "status": ("root, data keys, signing keys and pepper versions, with rotation times", lambda k: k.status()),
}


async def perform(keyring: Keyring, action: str) -> dict[str, Any]:
    """One ACTIONS entry on `keyring` (the CLI's own, or a server's for the admin API); ids and times only."""
    _, fn = ACTIONS[action]
    result: dict[str, Any] = await fn(keyring)
    if action != "status":
        await keyring.maintain()   # finish what the rotation started (re-wrap, retire)
    return result


def summary(status: dict[str, Any]) -> dict[str, Any]:
    """What a rotation changes, from `status`: an audit record's before/after (ids only, never a secret)."""
    return {"root": status["root"]["key_id"], "dek": status["dek"]["current"],
            "jwt_kid": status["jwt"]["active_kid"], "pepper_versions": status["pepper"]["versions"]}
