"""Console test helpers: a cookie-aware HTTP client that does not follow redirects, and sign-in."""

from __future__ import annotations

import http.client
import json
import re
from typing import Any
from urllib.parse import urlencode, urlsplit


class ConsoleClient:
    """One browser-like client: keeps the seekgate_console cookie, follows nothing, says its Origin."""

    def __init__(self, base_url: str, base_path: str = "") -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.origin = base_url
        self.base = base_path   # server.base_path: every console path is under it
        self.cookie: str | None = None
        self.last_set_cookie: str | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            h = dict(headers or {})
            if self.cookie:
                h["Cookie"] = f"seekgate_console={self.cookie}"
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            data = r.read()
            out = {k: v for k, v in r.getheaders()}
            set_cookie = r.getheader("Set-Cookie")
            if set_cookie and set_cookie.startswith("seekgate_console="):
                self.last_set_cookie = set_cookie
                value = set_cookie.split(";", 1)[0].split("=", 1)[1].strip('"')
                self.cookie = value or None
            return r.status, out, data
        finally:
            conn.close()

    def sign_in(self, key: str) -> tuple[int, dict[str, str], bytes]:
        return self.request("POST", self.base + "/console/session", urlencode({"key": key}).encode(),
                            {"Content-Type": "application/x-www-form-urlencoded", "Origin": self.origin})

    def csrf(self) -> str:
        status, _, page = self.request("GET", self.base + "/console/")
        assert status == 200, status
        found = re.search(rb'<meta name="csrf-token" content="([^"]+)"', page)
        assert found is not None
        return found.group(1).decode()

    def api(self, method: str, path: str, body: Any = None, csrf: str | None = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if csrf is not None:
            headers["X-CSRF-Token"] = csrf
        status, _, raw = self.request(method, self.base + "/console/api/" + path,
                                      None if body is None else json.dumps(body).encode(), headers)
        return status, json.loads(raw) if raw else None
