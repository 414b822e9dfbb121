"""The console's door: sign-in and sign-out, pages behind the session cookie, and the relay to /admin/v1.

Every data call the console makes, `/console/api/<rest>`, is answered by replaying it as
`/admin/v1/<rest>` with the session token as its bearer credential through the same request path
(authenticate, classify, authorize, limit, audit) a script calling /admin/v1 takes: the console is
a client of the admin API, not a way around it. A state change also needs the session's CSRF token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from ...context import RequestContext, Resource
from ...errors import (
    BadRequest,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unauthenticated,
    UpstreamUnavailable,
)
from ...keys.sessions import MINTING_TIERS
from ...steps.app_state import AppState
from ...steps.classify import classify_http
from ...steps.pipeline import admit, limit, refuse
from ...store.backend import open_secret_rows
from ..http_guard import read_body
from .pages import PAGES, SECURITY_HEADERS, STATIC_TYPES, shell_page, signin_page, static_file, unavailable_page
from .session import COOKIE, CSRF_FIELD, CSRF_HEADER, csrf_token, csrf_valid

log = logging.getLogger("seekgate.console")

Answer = Callable[[web.Request, AppState, RequestContext], Awaitable[web.StreamResponse]]
_PUBLIC = Resource("console", "read", public=True)   # the sign-in page and the static files
_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_FORM_BYTES = 4096


def is_console(path: str) -> bool:
    return path == "/console" or path.startswith("/console/")


async def answer_console(request: web.Request, state: AppState, ctx: RequestContext, path: str,
                         answer: Answer) -> web.StreamResponse:
    """One /console request. `answer` is the HTTP request path, which the relay to /admin/v1 re-enters."""
    base = state.settings.server.base_path
    if path == "/console":
        # The pages link their script, styles, data calls and sign-out relative to /console/: served
        # at /console they resolved to /static/..., /api/..., and the page never left "Loading…".
        ctx.resource = _PUBLIC
        return _redirect(f"{base}/console/")
    rest = path[len("/console"):].lstrip("/")
    if rest.startswith("api/"):
        return await _relay(request, state, ctx, rest[len("api/"):], answer)
    if rest.startswith("static/") and request.method in ("GET", "HEAD"):
        name = rest[len("static/"):]
        body = static_file(name)
        if body is None:
            raise NotFound("console_static_unknown")
        ctx.resource = _PUBLIC
        return web.Response(body=body, content_type=STATIC_TYPES[name],
                            headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})
    if rest == "signin" and request.method == "GET":
        ctx.resource = _PUBLIC
        return _html(signin_page(), 200)
    try:
        if rest == "session" and request.method == "POST":
            return await _sign_in(request, state, ctx, base)
        if rest == "session/end" and request.method == "POST":
            return await _sign_out(request, state, ctx, base)
        return await _page(request, state, ctx, rest)
    except UpstreamUnavailable as err:
        # The store (or the audit log) is out, or this process is draining: a browser that navigated
        # here gets a page saying so and when to retry, not the API's JSON error as its whole window.
        refuse(ctx, err)
        page = _html(unavailable_page(err.public_message, err.retry_after or 1), err.http_status)
        page.headers.update(err.headers())
        return page


async def _page(request: web.Request, state: AppState, ctx: RequestContext, rest: str) -> web.StreamResponse:
    """GET /console/<page>: the page shell for a live session, else a redirect to the sign-in form."""
    base = state.settings.server.base_path
    page = rest or "overview"
    if page not in PAGES or request.method != "GET":
        raise NotFound("console_page_unknown")
    token = request.cookies.get(COOKIE)
    try:
        if not token:
            raise Unauthenticated("console_no_session")
        await admit(state, ctx, f"Bearer {token}", lambda: Resource("console", "read"))
        await limit(state, ctx, None)   # a page view counts against the key's rates like any request
    except (Unauthenticated, Forbidden) as err:
        # A page without a live session: back to the sign-in form (the refusal is audited all the same).
        ctx.status, ctx.reason, ctx.http_status = "denied", err.reason, 303
        return _redirect(f"{base}/console/signin")
    assert ctx.principal is not None and token is not None
    return _html(shell_page(page, csrf_token(token), ctx.principal.owner), 200)


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={**SECURITY_HEADERS, "Location": location})


def _html(text: str, status: int) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", headers=SECURITY_HEADERS)


async def _form(request: web.Request, state: AppState) -> dict[str, str]:
    """A small urlencoded form, read whole within its own cap (a sign-in form is a few hundred bytes).

    Read as every body is (http_guard.read_body): content.read(n) returns only what has arrived so
    far, which cut a form whose body came in a later segment than its headers; and a trickled
    form is ended at read_timeout_s like any other body."""
    if request.content_type != "application/x-www-form-urlencoded":
        raise BadRequest("console_form_type", public_message="send an application/x-www-form-urlencoded form")
    if (request.content_length or 0) > MAX_FORM_BYTES:
        raise BadRequest("console_form_too_large", public_message="form too large")
    try:
        raw = await read_body(request, MAX_FORM_BYTES, state.settings.server.read_timeout_s)
    except PayloadTooLarge:
        raise BadRequest("console_form_too_large", public_message="form too large") from None
    try:
        fields = parse_qs(raw.decode(), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise BadRequest("console_form_encoding", public_message="form must be UTF-8") from None
    return {k: v[0] for k, v in fields.items()}


def _same_origin(request: web.Request, state: AppState) -> bool:
    """A browser's Origin, when it sends one, must be ours: a sign-in or sign-out posted from another site is refused.

    Without an Origin, a browser's own Sec-Fetch-Site still says where the post came from (a client that
    sends neither is a script, not a page another site made a browser submit)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return request.headers.get("Sec-Fetch-Site", "same-origin") in ("same-origin", "none")
    if origin == f"{request.scheme}://{request.host}":
        return True
    # Behind a proxy that ends TLS (the setting says so), the browser's page is https://<host> though
    # seekgate is reached over plain HTTP: that is our origin too (the proxy must keep the Host header).
    return state.settings.console.cookie_secure == "always" and origin == f"https://{request.host}"


async def _sign_in(request: web.Request, state: AppState, ctx: RequestContext, base: str) -> web.StreamResponse:
    """POST /console/session (form field `key`): the key through admit (console resource), then a session cookie."""
    if not _same_origin(request, state):
        raise Forbidden("console_cross_origin")
    key = (await _form(request, state)).get("key", "").strip()
    try:
        await admit(state, ctx, f"Bearer {key}", lambda: classify_http("POST", "/console/session"))
        assert ctx.principal is not None
        if ctx.principal.tier not in MINTING_TIERS or state.sessions is None:
            raise Unauthenticated("console_key_tier")   # a session or device key cannot open the console
        await limit(state, ctx, None)   # the key's rates bind its sign-ins too
    except (Unauthenticated, Forbidden, RateLimited) as err:
        ctx.status, ctx.reason = "denied", err.reason
        ctx.http_status = err.http_status
        if isinstance(err, RateLimited):   # the key's own rates, or this address's failed sign-ins
            page = _html(signin_page(f"Too many sign-ins. Try again in {err.retry_after or 1} s."), err.http_status)
            page.headers.update(err.headers())
            return page
        message = ("That key may not use the console." if isinstance(err, Forbidden)
                   else "That key was not accepted.")
        return _html(signin_page(message), err.http_status)
    now = time.time()
    ended = await _end_prior_session(state, request.cookies.get(COOKIE), now)
    minted = state.sessions.mint(ctx.principal, now)
    ctx.extra["admin_action"] = "console.signin"
    ctx.extra["admin_target"] = minted.jti
    if ended is not None:   # a revocation is an admin action too: the record says which session it ended
        ctx.extra["admin_detail"] = {"ended_session": ended}
    ctx.http_status = 303
    response = _redirect(f"{base}/console/")
    response.set_cookie(COOKIE, minted.token, path=f"{base}/console", httponly=True, samesite="Strict",
                        secure=_secure(request, state), max_age=max(1, minted.expires_at - int(time.time())))
    return response


async def _end_prior_session(state: AppState, prior: str | None, now: float) -> str | None:
    """A sign-in replaces the browser's session: the one its cookie still names is revoked, not left live
    until it expires for whoever copied that cookie. Only a token we signed names a session to revoke.
    Returns the jti this call revoked, None if it revoked nothing."""
    if not prior or state.sessions is None:
        return None
    try:
        jti = state.sessions.verify(prior, now).jti
    except Unauthenticated:
        return None   # expired, forged or not a session token: nothing of ours to end
    added = await (await open_secret_rows(state.store)).revoke_session(jti, now)
    return jti if added else None


def _secure(request: web.Request, state: AppState) -> bool | None:
    """Whether the session cookie is Secure. request.secure only sees TLS that ends here: behind a
    proxy that ends TLS itself and forwards plain HTTP, `console.cookie_secure: always` says so
    (X-Forwarded-Proto is a client's header, dropped by the context step, so it never decides)."""
    return True if state.settings.console.cookie_secure == "always" or request.secure else None


async def _sign_out(request: web.Request, state: AppState, ctx: RequestContext, base: str) -> web.StreamResponse:
    """POST /console/session/end (form field `csrf`): the session token is revoked, the cookie cleared."""
    if not _same_origin(request, state):
        # Before the cookie is looked at: a post from another site carries no SameSite=Strict cookie, so it
        # would reach the dead-session answer below, whose Set-Cookie the browser applies all the same
        # (a top-level navigation): any site could sign an operator out.
        raise Forbidden("console_cross_origin")
    token = request.cookies.get(COOKIE)
    try:
        if not token:
            raise Unauthenticated("console_no_session")
        await admit(state, ctx, f"Bearer {token}", lambda: Resource("console", "read"))
    except Unauthenticated as err:
        # The session ended already (expired, revoked, another sign-out): nothing to revoke, so no CSRF
        # token to ask for. The browser is still told to drop the dead cookie and sent to the sign-in
        # form, not left holding it in front of a JSON 401 (the refusal is audited all the same).
        ctx.status, ctx.reason, ctx.http_status = "denied", err.reason, 303
        ended = _redirect(f"{base}/console/signin")
        ended.del_cookie(COOKIE, path=f"{base}/console")
        return ended
    if not csrf_valid(token, (await _form(request, state)).get(CSRF_FIELD)):
        raise Forbidden("csrf_token_invalid", public_message="missing or wrong CSRF token")
    assert ctx.principal is not None
    jti = ctx.principal.key_id   # a session principal's key id is its jti
    rows = await open_secret_rows(state.store)
    # The revocation moves the store revision, which every process's key cache checks on the next request.
    await rows.revoke_session(jti, time.time())
    ctx.extra["admin_action"] = "console.signout"
    ctx.extra["admin_target"] = jti
    ctx.http_status = 303
    response = _redirect(f"{base}/console/signin")
    response.del_cookie(COOKIE, path=f"{base}/console")
    return response


def _relayed_headers(request: web.Request, bearer: str) -> CIMultiDict[str]:
    """The data call's headers as the /admin/v1 request gets them: the session as its bearer, no cookie.

    request.clone re-encodes every header as UTF-8; one that arrived as other bytes (a Latin-1 value,
    held with lone surrogates) would raise there, a 500: it is refused first, saying why."""
    headers = CIMultiDict(request.headers)
    headers.pop("Cookie", None)
    headers["Authorization"] = bearer
    for name, value in headers.items():
        try:
            name.encode(), value.encode()
        except UnicodeEncodeError:
            raise BadRequest("console_header_encoding", public_message="a request header is not UTF-8") from None
    return headers


async def _relay(request: web.Request, state: AppState, ctx: RequestContext, rest: str,
                 answer: Answer) -> web.StreamResponse:
    """/console/api/<rest> as /admin/v1/<rest>, the session token as bearer; a state change needs the CSRF token."""
    token = request.cookies.get(COOKIE)
    if not token:
        raise Unauthenticated("console_no_session")   # 401: a data call is not redirected
    if not token.isascii():
        # A session token is ASCII (a JWT); other bytes are no session of ours, and would not survive the
        # re-encoding of the relayed request's headers below.
        raise Unauthenticated("console_session_malformed")
    bearer = f"Bearer {token}"
    target = f"{state.settings.server.base_path}/admin/v1/{rest}"
    if request.method in _STATE_CHANGING and not csrf_valid(token, request.headers.get(CSRF_HEADER)):
        # Who tried is worth knowing: the session is authenticated first, so the refusal's record names it.
        await admit(state, ctx, bearer, lambda: classify_http(request.method, target))
        raise Forbidden("csrf_token_invalid", public_message="missing or wrong CSRF token")
    headers = _relayed_headers(request, bearer)
    query = request.raw_path.partition("?")[2]
    relayed = request.clone(rel_url=URL(target + ("?" + query if query else ""), encoded=True), headers=headers)
    response = await answer(relayed, state, ctx)
    if not response.prepared:
        # The admin API's answers carry audit records, key listings and reports: given to a browser they
        # are kept out of its caches (no-store) and never sniffed, framed or run, like the console's pages.
        response.headers.update(SECURITY_HEADERS)
    return response

