"""The console behind a reverse proxy: under server.base_path (in a real Chromium), and its cookie Secure
when TLS ends at the proxy (console.cookie_secure: always) though seekgate itself is reached over plain HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlencode

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.frontend.console.helpers import ConsoleClient
from tests.frontend.console.test_browser import ARGS, CHROMIUM
from tests.frontend.test_http import call
from tests.gateway import Gateway, gateway_via
from tests.relay import TcpRelay

BASE = "/gate"


@pytest.fixture(scope="module")
def gw(relay: TcpRelay, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with gateway_via(tmp_path_factory.mktemp("gw-console-base"), relay, **{"server.base_path": BASE}) as g:
        yield g


@pytest.fixture(scope="module")
def admin(gw: Gateway) -> tuple[str, str]:
    return gw.key(owner="ops-base", roles=("admin",))


@pytest.fixture
def page(admin: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    # Function-scoped and after `admin`: Playwright's sync API runs an event loop in this thread while
    # it is open, and keys are issued with asyncio.run (before it opens, or after it closed).
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True, args=ARGS,
            viewport={"width": 1280, "height": 800})
        context.set_default_timeout(15_000)
        try:
            yield context.new_page()
        finally:
            context.close()


def test_the_console_works_under_a_base_path(gw: Gateway, admin: tuple[str, str], page: Page) -> None:
    admin_id, admin_key = admin
    root = gw.url + BASE + "/console/"
    page.goto(root)
    expect(page).to_have_url(root + "signin")
    page.get_by_label("Admin key").fill(admin_key)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(root)
    expect(page.get_by_text("Upstream is")).to_be_visible()   # console.js loaded, /console/api relayed
    cookie = next(c for c in page.context.cookies() if c["name"] == "seekgate_console")
    assert cookie["path"] == BASE + "/console"
    page.get_by_role("navigation", name="Console pages").get_by_role("link", name="Keys").click()
    expect(page).to_have_url(root + "keys")
    expect(page.locator(f'[data-key-id="{admin_id}"]')).to_be_visible()
    page.get_by_role("button", name=f"Sessions of {admin_id}").click()
    expect(page.get_by_role("list", name=f"Live sessions of {admin_id}")).to_contain_text("console.signin")
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(root + "signin")
    # Without the prefix there is no console: the base path is the only way in.
    assert call(gw.url + "/console/signin")[0] == 404


@pytest.mark.parametrize("mode, secure", [("auto", False), ("always", True)])
def test_cookie_secure_always_marks_the_cookie_behind_a_tls_terminating_proxy(
        relay: TcpRelay, tmp_path_factory: pytest.TempPathFactory, mode: str, secure: bool) -> None:
    with gateway_via(tmp_path_factory.mktemp(f"gw-console-{mode}"), relay, **{"console.cookie_secure": mode}) as gw:
        _, admin_key = gw.key(owner="ops-tls", roles=("admin",))
        client = ConsoleClient(gw.url)
        # A proxy's (or anyone's) X-Forwarded-Proto is a client header seekgate drops: it never decides.
        status, headers, _ = client.request(
            "POST", "/console/session", urlencode({"key": admin_key}).encode(),
            {"Content-Type": "application/x-www-form-urlencoded", "Origin": gw.url, "X-Forwarded-Proto": "https"})
        assert status == 303 and headers["Location"] == "/console/"
        attributes = [a.strip().lower() for a in (client.last_set_cookie or "").split(";")]
        assert ("secure" in attributes) is secure and "httponly" in attributes
        # The browser's page is https://<host> at the TLS proxy: its sign-in is ours under `always` only.
        status, _, _ = client.request(
            "POST", "/console/session", urlencode({"key": admin_key}).encode(),
            {"Content-Type": "application/x-www-form-urlencoded",
             "Origin": "https://" + gw.url.removeprefix("http://")})
        assert status == (303 if secure else 403), (mode, status)
