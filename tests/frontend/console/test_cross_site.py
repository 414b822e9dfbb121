"""The console against pages of another site, in a real headless Chromium: what a forged post can still do.

The console is served at http://127.0.0.1:<port>; the attacker's page at http://localhost:<other port>, which
is another site, so the SameSite=Strict session cookie is not sent with its posts. The browser matters here:
whether it applies a cookie a cross-site response sets is the browser's rule, not the server's.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest
from playwright.sync_api import BrowserContext, sync_playwright

from tests.frontend.console.test_browser import ARGS, CHROMIUM
from tests.gateway import Gateway, audit_records, gateway_via, wait_for
from tests.relay import TcpRelay


@pytest.fixture(scope="module")
def gw(relay: TcpRelay, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with gateway_via(tmp_path_factory.mktemp("gw-console-cross-site"), relay) as g:
        yield g


@pytest.fixture(scope="module")
def admin_key(gw: Gateway) -> str:
    return gw.key(owner="ops-cross-site", roles=("admin",))[1]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, admin_key: str) -> Iterator[BrowserContext]:
    # Playwright's sync API runs an event loop in this thread: the key is made before it starts.
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True, args=ARGS)
        context.set_default_timeout(15_000)
        try:
            yield context
        finally:
            context.close()


class _AttackerSite:
    """An HTTP server on localhost serving one page: a form that posts to the console at 127.0.0.1."""

    def __init__(self, html: bytes) -> None:
        class Page(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(html)

            def log_message(self, *_: object) -> None:   # quiet: the test's output is the assertions
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
        self.url = f"http://localhost:{self.server.server_address[1]}/"

    def __enter__(self) -> _AttackerSite:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_sign_out_posted_from_another_site_leaves_the_operator_signed_in(
        browser: BrowserContext, gw: Gateway, admin_key: str) -> None:
    """Logout CSRF: the cross-site post carries no cookie, and the dead-session answer used to clear the cookie
    anyway; Chromium applies a Set-Cookie on a top-level navigation, so any site could sign an operator out."""
    page = browser.new_page()
    page.goto(gw.url + "/console/signin")
    page.get_by_label("Admin key").fill(admin_key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(gw.url + "/console/")
    assert any(c["name"] == "seekgate_console" for c in browser.cookies())
    form = (f'<form method="post" action="{gw.url}/console/session/end">'
            '<input type="hidden" name="csrf" value="guess"><button type="submit">Win a prize</button></form>')
    with _AttackerSite(form.encode()) as site:
        attacker = browser.new_page()
        attacker.goto(site.url)
        with attacker.expect_navigation():
            attacker.get_by_role("button", name="Win a prize").click()
        assert attacker.url.startswith(gw.url)   # the post did reach the console
        attacker.close()
    assert any(c["name"] == "seekgate_console" for c in browser.cookies())
    page.goto(gw.url + "/console/keys")
    assert page.url == gw.url + "/console/keys"   # still signed in: no redirect to the sign-in form

    def refused() -> list[dict]:
        return [r for r in audit_records(gw) if r.get("reason") == "console_cross_origin"
                and r.get("http_status") == 403]
    assert wait_for(lambda: bool(refused()), 5.0)   # the forged post is on the record


def test_a_console_another_site_opened_is_cut_off_from_it(browser: BrowserContext, gw: Gateway) -> None:
    """Tabnabbing: a site that window.open()s the console kept a handle on it, with which it could later send
    that tab, signed in by then, to a look-alike "session expired, sign in again" page that collects the admin
    key. Cross-Origin-Opener-Policy: same-origin severs the handle both ways."""
    opener = ('<button type="button" id="open">Open the console</button><script>'
              f'document.getElementById("open").onclick = () => {{ window.console_tab = window.open("{gw.url}/console/signin"); }};'
              '</script>')
    with _AttackerSite(opener.encode()) as site:
        attacker = browser.new_page()
        attacker.goto(site.url)
        with browser.expect_page() as opened:
            attacker.get_by_role("button", name="Open the console").click()
        console = opened.value
        console.wait_for_load_state()
        assert console.url == gw.url + "/console/signin"
        assert console.evaluate("() => window.opener === null")   # the console cannot be reached from its opener
        assert attacker.evaluate("() => window.console_tab.closed")   # nor the opener's handle reach the console
        attacker.close()
        console.close()
