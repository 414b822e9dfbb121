"""The console's door against a real seekgate (real Triton behind it): sign-in, cookies, CSRF, CSP, sign-out."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.frontend.console.pages import CSP, PAGES
from tests.frontend.console.helpers import ConsoleClient
from tests.gateway import Gateway, audit_records, gateway_via, wait_for
from tests.relay import TcpRelay


@pytest.fixture(scope="module")
def gw(relay: TcpRelay, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with gateway_via(tmp_path_factory.mktemp("gw-console"), relay) as g:
        yield g


@pytest.fixture(scope="module")
def admin_key(gw: Gateway) -> str:
    return gw.key(owner="ops-lead", roles=("admin",))[1]


def signed_in(gw: Gateway, key: str) -> ConsoleClient:
    client = ConsoleClient(gw.url)
    status, headers, _ = client.sign_in(key)
    assert status == 303 and headers["Location"] == "/console/", (status, headers)
    return client


def test_sign_in_sets_a_strict_httponly_session_cookie_and_never_the_key(gw: Gateway, admin_key: str) -> None:
    client = signed_in(gw, admin_key)
    cookie = client.last_set_cookie or ""
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
    assert "Secure" not in cookie   # plain HTTP here; on TLS the cookie is Secure (request.secure)
    assert client.cookie and admin_key not in client.cookie and client.cookie.count(".") == 2   # a session JWT
    for page in PAGES:
        status, headers, body = client.request("GET", f"/console/{page}")
        assert status == 200 and headers["Content-Type"].startswith("text/html"), page
        assert admin_key.encode() not in body
        assert b"ops-lead" in body
    def signins() -> list[dict]:
        return [r for r in audit_records(gw) if r.get("admin", {}).get("action") == "console.signin"]
    assert wait_for(lambda: bool(signins()), 5.0)
    records = signins()
    assert records and records[-1]["status"] == "allowed" and records[-1]["resource"] == "console"


def test_every_page_carries_a_strict_csp_and_denies_framing(gw: Gateway, admin_key: str) -> None:
    client = signed_in(gw, admin_key)
    anonymous = ConsoleClient(gw.url)
    answers = [client.request("GET", f"/console/{p}") for p in PAGES]
    answers += [anonymous.request("GET", "/console/signin"), client.request("GET", "/console/static/console.js"),
                anonymous.request("GET", "/console/keys")]   # the redirect too
    for status, headers, _ in answers:
        assert status in (200, 303)
        csp = headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert "frame-ancestors 'none'" in csp and headers["X-Frame-Options"] == "DENY"
        assert headers["Cross-Origin-Opener-Policy"] == headers["Cross-Origin-Resource-Policy"] == "same-origin"
    status, headers, body = client.request("GET", "/console/")
    assert b"<script>" not in body and b" on" + b"click=" not in body   # no inline script or handler


def test_without_a_session_pages_redirect_and_data_calls_get_401(gw: Gateway) -> None:
    anonymous = ConsoleClient(gw.url)
    for page in ("", "keys", "audit"):
        status, headers, _ = anonymous.request("GET", f"/console/{page}")
        assert status == 303 and headers["Location"] == "/console/signin"
    status, body = anonymous.api("GET", "keys")
    assert status == 401 and "error" in body
    status, body = anonymous.api("POST", "keys", {"tier": "user", "owner": "x"})
    assert status == 401
    forged = ConsoleClient(gw.url)
    forged.cookie = "not.a.token"
    assert forged.request("GET", "/console/keys")[0] == 303
    assert forged.api("GET", "keys")[0] == 401


def test_the_console_without_its_trailing_slash_is_sent_to_it(gw: Gateway, admin_key: str) -> None:
    """Its pages' links are relative to /console/: the shell served at /console loaded nothing."""
    for client in (signed_in(gw, admin_key), ConsoleClient(gw.url)):
        status, headers, _ = client.request("GET", "/console")
        assert status == 303 and headers["Location"] == "/console/", (status, headers)


def test_a_user_key_cannot_open_the_console(gw: Gateway) -> None:
    _, user_key = gw.key(owner="bob", roles=("user",))
    client = ConsoleClient(gw.url)
    status, headers, body = client.sign_in(user_key)
    assert status == 403 and client.cookie is None and b"may not use the console" in body
    assert "Set-Cookie" not in headers
    status, _, body = client.sign_in("sgk_not_a_key")
    assert status == 401 and b"not accepted" in body and client.cookie is None


def test_a_sign_in_posted_from_another_site_is_refused(gw: Gateway, admin_key: str) -> None:
    client = ConsoleClient(gw.url)
    client.origin = "https://evil.example"
    status, _, _ = client.sign_in(admin_key)
    assert status == 403 and client.cookie is None


def test_a_cross_site_sign_in_without_an_origin_is_refused_by_its_fetch_metadata(gw: Gateway, admin_key: str) -> None:
    client = ConsoleClient(gw.url)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for site in ("cross-site", "same-site"):
        status, _, _ = client.request("POST", "/console/session", f"key={admin_key}".encode(),
                                      {**form, "Sec-Fetch-Site": site})
        assert status == 403 and client.cookie is None, site
    status, _, _ = client.request("POST", "/console/session", f"key={admin_key}".encode(), form)
    assert status == 303 and client.cookie   # a script sends neither header: it is not a forged post


def test_data_calls_go_through_the_admin_api_and_state_changes_need_the_sessions_csrf_token(
        gw: Gateway, admin_key: str) -> None:
    client, other = signed_in(gw, admin_key), signed_in(gw, admin_key)
    status, listing = client.api("GET", "keys")   # a read needs no CSRF token
    assert status == 200 and "keys" in listing
    spec = {"tier": "user", "owner": "forged-victim", "roles": ["user"]}
    for token in (None, other.csrf(), "x" * 43):
        status, body = client.api("POST", "keys", spec, csrf=token)
        assert status == 403 and body == {"error": "missing or wrong CSRF token"}, (token, status, body)
    assert not any(k["owner"] == "forged-victim" for k in client.api("GET", "keys")[1]["keys"])
    assert wait_for(lambda: sum(r["reason"] == "csrf_token_invalid" for r in audit_records(gw)) >= 3, 5.0)
    refused = [r for r in audit_records(gw) if r["reason"] == "csrf_token_invalid"][-1]
    assert (refused["status"], refused["http_status"], refused["resource"]) == ("denied", 403, "admin:keys")
    assert refused["actor"] == "ops-lead" and refused["path"] == "/console/api/keys"
    status, created = client.api("POST", "keys", spec, csrf=client.csrf())
    assert status == 201 and created["owner"] == "forged-victim" and created["key"].startswith("sgk_")
    # The relayed call is audited like a direct /admin/v1 call: same resource, action and rule.
    assert wait_for(lambda: any(r.get("admin", {}).get("target") == created["key_id"] for r in audit_records(gw)), 5)
    record = next(r for r in audit_records(gw) if r.get("admin", {}).get("target") == created["key_id"])
    assert (record["resource"], record["rule"], record["admin"]["action"]) == ("admin:keys", "admin-all", "keys.create")


def test_a_console_session_gets_no_more_than_the_policy_gives_its_key(gw: Gateway) -> None:
    """A key a policy lets sign in (console) but not administer keys: the console shows it 403s, not data."""
    (Path(gw.policy_dir) / "console-auditors.yaml").write_text(
        "rules:\n  - id: auditors-console\n    effect: allow\n    subject: {roles: [auditor]}\n"
        "    resources: [console, 'admin:audit']\n    actions: [read]\n")
    _, auditor = gw.key(owner="carol", roles=("auditor",))
    client = ConsoleClient(gw.url)
    assert wait_for(lambda: client.sign_in(auditor)[0] == 303, 5.0)
    assert client.api("GET", "audit?limit=1")[0] == 200
    status, body = client.api("GET", "keys")
    assert status == 403
    assert client.api("POST", "crypto/rotate-dek", {}, csrf=client.csrf())[0] == 403
    (Path(gw.policy_dir) / "console-auditors.yaml").unlink()


def test_sign_out_revokes_the_session_and_needs_the_csrf_token(gw: Gateway, admin_key: str) -> None:
    client = signed_in(gw, admin_key)
    token, csrf = client.cookie, client.csrf()
    form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": gw.url}
    status, _, _ = client.request("POST", "/console/session/end", b"csrf=wrong", form)
    assert status == 403 and client.api("GET", "keys")[0] == 200
    status, headers, _ = client.request("POST", "/console/session/end", f"csrf={csrf}".encode(), form)
    assert status == 303 and headers["Location"] == "/console/signin" and client.cookie is None
    client.cookie = token   # the old cookie, replayed: the session itself is dead
    assert client.api("GET", "keys")[0] == 401
    assert client.request("GET", "/console/")[0] == 303


def test_a_forged_csrf_token_or_cookie_of_any_characters_is_refused_not_a_server_error(
        gw: Gateway, admin_key: str) -> None:
    """hmac.compare_digest refuses str with non-ASCII characters (TypeError), and a cookie of bytes that are not
    UTF-8 reaches us with lone surrogates, which str.encode refuses: both were a 500 internal_error."""
    client = signed_in(gw, admin_key)
    spec = {"tier": "user", "owner": "forged-latin", "roles": ["user"]}
    # http.client sends a header as Latin-1: é arrives as the byte 0xe9, not UTF-8.
    for token in ("\u00e9", "\u00e9" * 43):
        status, body = client.api("POST", "keys", spec, csrf=token)
        assert status == 403 and body == {"error": "missing or wrong CSRF token"}, (status, body)
    form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": gw.url}
    status, _, body = client.request("POST", "/console/session/end", b"csrf=%C3%A9", form)
    assert status == 403 and b"CSRF" in body, (status, body)
    assert client.api("GET", "keys")[0] == 200   # still signed in: the forged sign-out ended nothing
    garbled = ConsoleClient(gw.url)
    garbled.cookie = "\xff\xfe"   # Latin-1 on the wire: bytes that are not UTF-8
    assert garbled.api("POST", "keys", spec, csrf="x")[0] == 401
    assert garbled.api("GET", "keys")[0] == 401
    assert garbled.request("GET", "/console/keys")[0] == 303
    assert garbled.request("POST", "/console/session/end", b"csrf=x", form)[0] == 303
    # The relay re-sends the request's headers to /admin/v1, which needs each to be UTF-8: a header that is
    # not (a Latin-1 User-Agent) is a 400 that says so, on a live session too.
    status, _, body = client.request("GET", "/console/api/keys", headers={"User-Agent": "caf\u00e9"})
    assert status == 400 and b"UTF-8" in body, (status, body)
    assert not [r for r in audit_records(gw) if str(r.get("reason", "")).startswith("internal_error")]


def test_the_key_never_reaches_the_logs(gw: Gateway, admin_key: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("DEBUG"):
        client = signed_in(gw, admin_key)
        client.request("GET", "/console/keys")
    assert admin_key not in caplog.text
    audit_text = "".join(p.read_text() for p in (gw.data_dir / "audit").glob("*.jsonl"))
    assert admin_key not in audit_text and (client.cookie or "") not in audit_text


def test_the_keys_rate_limit_binds_console_sign_ins_and_pages(gw: Gateway) -> None:
    _, key = gw.key(owner="limited-admin", roles=("admin",), limits={"rpm": 3})
    client = signed_in(gw, key)   # 1
    assert client.request("GET", "/console/keys")[0] == 200   # 2: the session counts against its parent key
    assert client.api("GET", "keys")[0] == 200   # 3
    status, headers, _ = client.request("GET", "/console/audit")
    assert status == 429 and "Retry-After" in headers


def test_data_calls_are_never_cached_sniffed_or_framed(gw: Gateway, admin_key: str) -> None:
    """Audit records, key listings and exports are secrets too: the browser keeps none of them."""
    client = signed_in(gw, admin_key)
    for path in ("keys", "audit?limit=2", "audit?format=jsonl&limit=2", "overview", "policies", "no-such-call"):
        status, headers, _ = client.request("GET", "/console/api/" + path)
        assert status in (200, 404), (path, status)
        assert headers.get("Cache-Control") == "no-store", (path, headers)
        assert headers.get("X-Content-Type-Options") == "nosniff", (path, headers)
        assert headers.get("Content-Security-Policy") == CSP, (path, headers)


def test_signing_out_of_a_dead_session_still_drops_the_cookie(gw: Gateway, admin_key: str) -> None:
    """Sign-out after the session expired or was revoked elsewhere: back to the sign-in form, cookie gone."""
    client = signed_in(gw, admin_key)
    token, csrf = client.cookie, client.csrf()
    form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": gw.url}
    assert client.request("POST", "/console/session/end", f"csrf={csrf}".encode(), form)[0] == 303
    client.cookie = token   # a second tab still holds the old cookie, and signs out too
    status, headers, _ = client.request("POST", "/console/session/end", f"csrf={csrf}".encode(), form)
    assert status == 303 and headers["Location"] == "/console/signin", (status, headers)
    assert client.cookie is None and "Max-Age=0" in (client.last_set_cookie or "")
    assert wait_for(lambda: any(r["path"] == "/console/session/end" and r["status"] == "denied"
                                for r in audit_records(gw)), 5.0)


def test_signing_in_again_ends_the_session_the_browser_held(gw: Gateway, admin_key: str) -> None:
    client = signed_in(gw, admin_key)
    first = client.cookie
    assert client.sign_in(admin_key)[0] == 303 and client.cookie not in (None, first)
    assert client.api("GET", "keys")[0] == 200   # the new session works
    stale = ConsoleClient(gw.url)
    stale.cookie = first   # whoever copied the old cookie holds nothing now
    assert stale.api("GET", "keys")[0] == 401


def test_the_session_a_sign_in_ends_is_named_in_its_audit_record(gw: Gateway) -> None:
    """Who revoked what: the sign-in that revokes the browser's prior session says so, as sessions.revoke would."""
    key = gw.key(owner="ops-signs-in-twice", roles=("admin",))[1]   # its own owner: its records alone

    def signins() -> list[dict]:
        return [r for r in audit_records(gw) if r.get("admin", {}).get("action") == "console.signin"
                and r.get("actor") == "ops-signs-in-twice"]
    client = signed_in(gw, key)
    assert wait_for(lambda: len(signins()) == 1, 5.0)
    first = signins()[0]["admin"]["target"]
    assert "detail" not in signins()[0]["admin"]   # a fresh browser ended nothing
    assert client.sign_in(key)[0] == 303
    assert wait_for(lambda: len(signins()) == 2, 5.0)
    record = signins()[1]
    assert record["admin"].get("detail") == {"ended_session": first}, record
    assert record["key_id"] and record["status"] == "allowed"   # and who did it


def test_console_refusals_carry_the_pages_security_headers(gw: Gateway, admin_key: str) -> None:
    """A 404, 401 or 403 from the console reaches a browser too: never cached, sniffed or framed."""
    client, anonymous = signed_in(gw, admin_key), ConsoleClient(gw.url)
    answers = [client.request("GET", "/console/no-such-page"), client.request("GET", "/console/static/x.js"),
               anonymous.request("GET", "/console/api/keys"),
               client.request("POST", "/console/api/keys", b"{}", {"Content-Type": "application/json"}),
               client.request("POST", "/console/session", b"key=x", {"Origin": "https://evil.example",
                                                                    "Content-Type": "application/x-www-form-urlencoded"})]
    assert [status for status, _, _ in answers] == [404, 404, 401, 403, 403]
    for status, headers, _ in answers:
        assert headers.get("Content-Security-Policy") == CSP and headers.get("X-Frame-Options") == "DENY", status
        assert headers.get("Cache-Control") == "no-store" and headers.get("X-Content-Type-Options") == "nosniff"


def test_a_sign_in_form_that_arrives_in_pieces_is_read_whole(gw: Gateway, admin_key: str) -> None:
    """The browser's body may come in a later TCP segment (or TLS record) than its headers, and split."""
    body = f"key={admin_key}".encode()
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /console/session HTTP/1.1\r\nHost: " + f"{host}:{port}".encode() +
                     b"\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
        for piece in (body[:20], body[20:]):
            time.sleep(0.2)
            sock.sendall(piece)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 303"), answer[:200]
    assert b"seekgate_console=" in answer


def test_a_trickled_sign_in_form_is_ended_at_read_timeout_s(relay: TcpRelay, tmp_path: Path) -> None:
    with gateway_via(tmp_path, relay, **{"server.read_timeout_s": 1.0}) as quick:
        host, port = quick.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /console/session HTTP/1.1\r\nHost: " + f"{host}:{port}".encode() +
                         b"\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nk")
            started = time.monotonic()
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5, answer[:100]


def test_an_expiry_beyond_any_date_is_refused_and_the_key_listing_keeps_working(gw: Gateway, admin_key: str) -> None:
    """A typo'd "99999999d" was stored, then every listing 500'd on its date: the Keys page was gone for good."""
    client = signed_in(gw, admin_key)
    csrf = client.csrf()
    for expires in ("99999999d", "9" * 400 + "d"):
        status, body = client.api("POST", "keys", {"tier": "app", "owner": "far-future", "expires": expires}, csrf=csrf)
        assert status == 400 and "duration" in body["error"], (expires, status, body)
    status, made = client.api("POST", "keys", {"tier": "app", "owner": "forever", "expires": "never"}, csrf=csrf)
    assert status == 201
    status, body = client.api("POST", f"keys/{made['key_id']}/rotate", {"grace": "99999999d"}, csrf=csrf)
    assert status == 400 and "century" in body["error"], body
    status, listing = client.api("GET", "keys")
    assert status == 200 and not any(k["owner"] == "far-future" for k in listing["keys"])
    assert client.request("GET", "/console/api/keys?expiring=" + "9" * 400 + "d")[0] == 400
