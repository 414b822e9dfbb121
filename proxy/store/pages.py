"""Every key (or every key in an expiry window) read page by page through KeyStore.page_keys, in bounded memory."""

from __future__ import annotations

from collections.abc import AsyncIterator

from proxy.store import KeyRecord, KeyStore

# Keys per query: the admin API's largest page, so a listing of a large fleet holds at most this many at once.
PAGE_SIZE = 1000


async def each_key(store: KeyStore, expiring: tuple[float, float] | None = None,
                   page_size: int | None = None) -> AsyncIterator[KeyRecord]:
    """Every key in key id order (`expiring` as in page_keys), one page in memory at a time.

    Keyset paging, as the admin API's listing: each page resumes after the last key id of the one
    before, so keys created meanwhile are neither skipped nor repeated.
    """
    size = PAGE_SIZE if page_size is None else page_size   # read at each call: a test makes pages small
    after: str | None = None
    while True:
        page = await store.page_keys(size, after, expiring)
        for rec in page:
            yield rec
        if len(page) < size:
            return
        after = page[-1].key_id
