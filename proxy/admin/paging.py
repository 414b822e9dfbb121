"""Kong-style paging of an admin listing: `size` and an opaque `offset` cursor in, a `next` link out."""

from __future__ import annotations

import base64
import binascii

from yarl import URL

from ..keys.issue import is_key_id

DEFAULT_SIZE = 100
MAX_SIZE = 1000
# Versioned, so a later change of order (and of what a cursor holds) can refuse old cursors by name.
_CURSOR_TAG = "k1:"
_BAD_CURSOR = "offset is not a cursor from this API: pass the previous page's `next` link as it is"


def parse_size(value: str | None) -> int:
    """The page size asked for; ValueError with the message a client gets as a 400."""
    if value is None:
        return DEFAULT_SIZE
    # ASCII digits only, and no more of them than MAX_SIZE has: int() also takes "+5", " 5", "٥" and "1_0".
    if not (value.isascii() and value.isdigit()) or len(value) > len(str(MAX_SIZE)) \
            or not 1 <= int(value) <= MAX_SIZE:
        raise ValueError(f"size must be a whole number from 1 to {MAX_SIZE}, got {value!r}")
    return int(value)


def encode_cursor(key_id: str) -> str:
    """The cursor resuming after `key_id`: opaque to clients, so what it holds may change."""
    return base64.urlsafe_b64encode((_CURSOR_TAG + key_id).encode()).rstrip(b"=").decode()


def decode_cursor(value: str | None) -> str | None:
    """The key id a cursor resumes after (None: no cursor, the first page); ValueError if it is not one."""
    if value is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode("ascii")
    except (binascii.Error, ValueError):   # bad base64, padding, or non-ASCII (UnicodeDecodeError)
        raise ValueError(_BAD_CURSOR) from None
    key_id = raw.removeprefix(_CURSOR_TAG)
    # Re-encoded, it must be what came: b64decode skips characters outside its alphabet, so "a!b" would pass.
    if not raw.startswith(_CURSOR_TAG) or not is_key_id(key_id) or encode_cursor(key_id) != value:
        raise ValueError(_BAD_CURSOR)
    return key_id


def next_link(rel_url: URL, last_key_id: str) -> str:
    """This request's path and query (base path, size and filters kept), resuming after `last_key_id`."""
    return str(rel_url.update_query(offset=encode_cursor(last_key_id)))
