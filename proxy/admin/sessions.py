"""POST /v1/sessions: exchange an admitted user or app key for a short-lived session token."""

from __future__ import annotations

import time

from aiohttp import web

from ..context import RequestContext
from ..errors import Unauthenticated
from ..keys.sessions import SessionAuthority


def handle_sessions(ctx: RequestContext, sessions: SessionAuthority | None,
                    now: float | None = None) -> web.Response:
    """Answers {"token", "expires_at", "jti"}. The caller was admitted already (tier checked in admit).

    The body is ignored: the token's scope is the parent key's, with no way to widen it.
    """
    if ctx.principal is None or sessions is None:
        raise Unauthenticated("sessions_unavailable")
    minted = sessions.mint(ctx.principal, time.time() if now is None else now)
    # The mint record is the only list of a key's sessions there is (tokens are not stored):
    # GET /admin/v1/keys/<id>/sessions and the console's key tree read it back.
    ctx.extra["admin_action"] = "sessions.mint"
    ctx.extra["admin_target"] = minted.jti
    return web.json_response({"token": minted.token, "expires_at": minted.expires_at, "jti": minted.jti},
                             headers={"Cache-Control": "no-store", "X-Request-Id": ctx.request_id})
