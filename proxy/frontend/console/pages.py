"""The console's HTML: the sign-in page, the page shell the script fills, the static files, the security headers."""

from __future__ import annotations

from functools import lru_cache
from html import escape
from importlib import resources

# Scripts and styles only from our own origin (no inline script, no eval), no framing, forms post only
# here, nothing fetched from anywhere else: the console works offline and an injected tag runs nothing.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: with no-referrer Chromium posts forms with `Origin: null`, which the
    # sign-in refuses as cross-site; same-origin still tells other sites nothing.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    # A console opened by another site's window.open is cut off from it, both ways: that site could otherwise
    # send the signed-in tab to a look-alike sign-in page later (tabnabbing) or count its frames.
    "Cross-Origin-Opener-Policy": "same-origin",
    # No other origin (a sibling port is the same site, so it gets the Strict cookie) may embed a console
    # response, an API answer included, with <script>, <img> or the like.
    "Cross-Origin-Resource-Policy": "same-origin",
}
PAGES = {"overview": "Overview", "keys": "Keys", "usage": "Usage", "audit": "Audit",
         "policies": "Policies", "crypto": "Crypto"}
STATIC_TYPES = {"console.js": "text/javascript", "console.css": "text/css"}


@lru_cache(maxsize=len(STATIC_TYPES))
def static_file(name: str) -> bytes | None:
    """One of the shipped files (package data), or None: only the names above are ever served."""
    if name not in STATIC_TYPES:
        return None
    return resources.files(__package__).joinpath("static", name).read_bytes()


def _head(title: str) -> str:
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)} · seekgate console</title>"
            "<link rel=\"stylesheet\" href=\"static/console.css\">")


def signin_page(message: str | None = None) -> str:
    """The sign-in form: the key is posted once, over the form, and never kept by the page."""
    error = f'<p class="error" role="alert">{escape(message)}</p>' if message else ""
    return (_head("Sign in") + "</head><body class=\"signin\"><main>"
            "<h1>seekgate console</h1>"
            f"{error}<form method=\"post\" action=\"session\" autocomplete=\"off\">"
            "<label for=\"key\">Admin key</label>"
            "<input id=\"key\" name=\"key\" type=\"password\" required autofocus autocomplete=\"off\" "
            "spellcheck=\"false\" placeholder=\"sgk_…\">"
            "<button type=\"submit\">Sign in</button></form>"
            "<p class=\"hint\">The key is exchanged for a 15-minute session; it is not stored in this browser.</p>"
            "</main></body></html>")


def unavailable_page(why: str, retry_after: int) -> str:
    """What a browser sees when seekgate cannot check a session or key now (its store is out, or it drains)."""
    return (_head("Unavailable") + "</head><body class=\"signin\"><main>"
            "<h1>seekgate console</h1>"
            f'<p class="error" role="alert">The console is unavailable: {escape(why)}. '
            f"Try again in {retry_after} s.</p>"
            "</main></body></html>")


def shell_page(page: str, csrf: str, owner: str) -> str:
    """A signed-in page: navigation and an empty main the script fills from /console/api (= /admin/v1)."""
    current = ' aria-current="page"'
    nav = "".join(f'<a href="{p}"{current if p == page else ""}>{t}</a>' for p, t in PAGES.items())
    return (_head(PAGES[page]) + f'<meta name="csrf-token" content="{escape(csrf)}">'
            '<script src="static/console.js" defer></script></head>'
            f'<body data-page="{page}"><header><span class="brand">seekgate</span>'
            f'<nav aria-label="Console pages">{nav}</nav>'
            f'<span class="who">signed in as <b>{escape(owner)}</b></span>'
            '<form method="post" action="session/end" class="signout">'
            f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
            '<button type="submit">Sign out</button></form></header>'
            f'<main id="main" tabindex="-1"><h1>{PAGES[page]}</h1><div id="content" aria-live="polite">Loading…</div>'
            '</main></body></html>')
