"""The /admin/v1/crypto API: rotate the data key, root, session signing key or pepper, and show their state.

The same operations as `seekgate crypto` (keys/crypto_ops.py ACTIONS), run on this server's own keyring, so
a rotated signing key signs here at once; other processes pick it up within crypto.refresh_interval_s.
Audited by the pipeline's record for the call: `admin.action` is `crypto.<operation>`, `admin.detail`
what it answered, `admin.before` / `admin.after` the root, data key, signing kid and pepper versions
(ids only, never a secret).
"""

from __future__ import annotations

from aiohttp import web

from ..keys.crypto_ops import perform, summary
from ..keys.envelope import EnvelopeError
from ..keys.kek import KekError
from ..steps.app_state import STATE
from .keys import Reply, error_reply, note, optional_json


async def handle_crypto(request: web.Request, body: bytes | None = None) -> web.Response:
    """One /admin/v1/crypto/<operation> request; classify.CRYPTO_OPS has already checked the route and method."""
    operation = request.path.rsplit("/", 1)[1]
    action = f"crypto.{operation}"
    note(request, action)
    try:
        if optional_json(await request.read() if body is None else body):
            raise Reply(400, f"{operation} takes no body (or {{}})")
        keyring = request.app[STATE].keyring
        if keyring is None:
            raise Reply(503, "this process holds no keyring")
        if operation == "status":
            return web.json_response(await perform(keyring, operation))
        before = summary(await keyring.status())
        try:
            result = await perform(keyring, operation)
        except (KekError, EnvelopeError) as exc:   # the KMS or HSM refused: nothing was rotated
            raise Reply(503, f"{operation} failed: {exc}") from None
        note(request, action, detail=result, before=before, after=summary(await keyring.status()))
        return web.json_response(result)
    except Reply as r:
        return error_reply(r.status, r.message, r.headers)
