"""The console while its PostgreSQL store is stopped: the browser gets a page that says so, not a JSON error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backends import PrivatePostgres
from tests.frontend.console.helpers import ConsoleClient
from tests.gateway import gateway_via, wait_for
from tests.relay import TcpRelay


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()   # this test's own: it is stopped under a serving seekgate
    pg.start()
    try:
        yield pg
    finally:
        pg.destroy()


def test_pages_and_forms_say_the_store_is_out_in_html(relay: TcpRelay, private_pg: PrivatePostgres,
                                                      tmp_path: Path) -> None:
    with gateway_via(tmp_path, relay, **{"store.url": private_pg.url, "store.auto_migrate": True,
                                                  "auth.key_cache_ttl_s": 1.0}) as gw:
        _, key = gw.key(owner="ops-lead", roles=("admin",))
        client = ConsoleClient(gw.url)
        assert client.sign_in(key)[0] == 303
        csrf = client.csrf()
        private_pg.stop()
        # Past the key cache's TTL the session's key cannot be checked: 503 (fail closed), shown as a page.
        assert wait_for(lambda: client.request("GET", "/console/keys")[0] == 503, 10.0)
        form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": gw.url}
        answers = {"page": client.request("GET", "/console/keys"), "sign-in": ConsoleClient(gw.url).sign_in(key),
                   "sign-out": client.request("POST", "/console/session/end", f"csrf={csrf}".encode(), form)}
        for what, (status, headers, body) in answers.items():
            assert status == 503 and headers["Content-Type"].startswith("text/html"), (what, status, headers, body)
            assert headers["Retry-After"] and headers["Cache-Control"] == "no-store", (what, headers)
            assert b"The console is unavailable: service temporarily unavailable. Try again in" in body, (what, body)
        assert client.cookie is not None   # the session is not dropped for the store's outage
        status, body = client.api("GET", "keys")   # the page's script still gets JSON it can show
        assert status == 503 and body == {"error": "service temporarily unavailable"}
