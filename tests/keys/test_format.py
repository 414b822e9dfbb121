"""Tests for proxy.keys: token format, checksum, hashing and the pepper file."""

from __future__ import annotations

import stat
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.keys import (
    KeyFormatError,
    ParsedKey,
    generate_key,
    hash_secret,
    key_prefix_and_last4,
    load_or_create_pepper,
    parse_key,
    verify_secret,
)
from proxy.keys.format import TOKEN_LEN

TOKEN_ALPHABET = string.ascii_letters + string.digits + "_-"


def test_generated_key_has_the_documented_shape() -> None:
    key_id, token = generate_key()
    assert len(token) == TOKEN_LEN == 67
    assert token.startswith(f"sgk_{key_id}_")
    assert len(key_id) == 12 and set(key_id) <= set("abcdefghijklmnopqrstuvwxyz234567")
    secret, check = token[17:60], token[61:]
    assert len(secret) == 43 and set(secret) <= set(TOKEN_ALPHABET)
    assert token[60] == "_" and len(check) == 6


def test_generated_keys_round_trip_and_are_unique() -> None:
    keys = [generate_key() for _ in range(200)]
    assert len({k for k, _ in keys}) == 200
    assert len({t for _, t in keys}) == 200
    for key_id, token in keys:
        assert parse_key(token) == ParsedKey(key_id=key_id, token=token)


def test_parsed_key_repr_hides_the_secret() -> None:
    _, token = generate_key()
    assert token not in repr(parse_key(token))


@pytest.mark.parametrize("token", [
    "", "sgk_", "sgk_abc", "ghp_" + "a" * 63, "SGK_" + "a" * 63,
    "sgk_" + "A" * 12 + "_" + "a" * 43 + "_" + "a" * 6,   # key id must be lowercase base32
    "sgk_" + "a" * 12 + "_" + "a" * 43 + "_" + "a" * 5,   # short check
    "sgk_" + "a" * 12 + "-" + "a" * 43 + "_" + "a" * 6,   # wrong separator
    "sgk_" + "a" * 12 + "_" + "a" * 42 + "=_" + "a" * 6,  # padding is not base64url
])
def test_malformed_tokens(token: str) -> None:
    with pytest.raises(KeyFormatError) as err:
        parse_key(token)
    assert err.value.reason == "malformed"


def test_trailing_newline_or_space_is_malformed() -> None:
    _, token = generate_key()
    for bad in (token + "\n", " " + token, token[:-1]):
        with pytest.raises(KeyFormatError, match="malformed"):
            parse_key(bad)


def test_wrong_checksum_is_bad_checksum() -> None:
    _, token = generate_key()
    swapped = token[:-6] + ("000000" if token[-6:] != "000000" else "000001")
    with pytest.raises(KeyFormatError) as err:
        parse_key(swapped)
    assert err.value.reason == "bad_checksum"


def test_non_string_input_is_malformed() -> None:
    for bad in (None, b"sgk_", 42):
        with pytest.raises(KeyFormatError, match="malformed"):
            parse_key(bad)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_arbitrary_text_only_ever_raises_key_format_error(text: str) -> None:
    try:
        parse_key(text)
    except KeyFormatError as exc:
        assert exc.reason in ("malformed", "bad_checksum")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_every_single_character_substitution_is_rejected(data: st.DataObject) -> None:
    _, token = generate_key()
    pos = data.draw(st.integers(0, len(token) - 1))
    # No filter on the random token: hypothesis replays draws and needs them independent of it.
    char = data.draw(st.characters())
    if char == token[pos]:
        char = "!"   # never in a key's alphabet
    mutated = token[:pos] + char + token[pos + 1:]
    with pytest.raises(KeyFormatError) as err:
        parse_key(mutated)
    assert err.value.reason in ("malformed", "bad_checksum")


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_in_alphabet_typos_in_the_secret_are_caught_by_the_checksum(data: st.DataObject) -> None:
    _, token = generate_key()
    pos = data.draw(st.integers(17, 59))  # inside the secret: only the checksum can tell
    shift = data.draw(st.integers(1, len(TOKEN_ALPHABET) - 1))   # any other character of the alphabet
    char = TOKEN_ALPHABET[(TOKEN_ALPHABET.index(token[pos]) + shift) % len(TOKEN_ALPHABET)]
    with pytest.raises(KeyFormatError) as err:
        parse_key(token[:pos] + char + token[pos + 1:])
    assert err.value.reason == "bad_checksum"


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_insertions_and_deletions_are_rejected(data: st.DataObject) -> None:
    _, token = generate_key()
    pos = data.draw(st.integers(0, len(token)))
    if data.draw(st.booleans()) and pos < len(token):
        mutated = token[:pos] + token[pos + 1:]
    else:
        mutated = token[:pos] + data.draw(st.characters()) + token[pos:]
    with pytest.raises(KeyFormatError):
        parse_key(mutated)


def test_prefix_and_last4() -> None:
    key_id, token = generate_key()
    assert key_prefix_and_last4(token) == (f"sgk_{key_id}", token[-4:])
    with pytest.raises(KeyFormatError):
        key_prefix_and_last4("not a key")


def test_hash_and_verify() -> None:
    pepper = b"p" * 32
    _, token = generate_key()
    digest = hash_secret(pepper, token)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert token not in digest
    assert verify_secret(pepper, token, digest)
    assert not verify_secret(b"q" * 32, token, digest)
    _, other = generate_key()
    assert not verify_secret(pepper, other, digest)


@pytest.mark.parametrize("stored", ["", "zz", "é" * 64, "A" * 64])
def test_verify_rejects_garbage_hashes(stored: str) -> None:
    assert not verify_secret(b"p" * 32, "sgk_x", stored)


def test_pepper_is_created_private_and_stable(tmp_path: Path) -> None:
    pepper = load_or_create_pepper(tmp_path)
    assert len(pepper) == 32
    path = tmp_path / "secrets" / "pepper"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_or_create_pepper(tmp_path) == pepper
    assert [p.name for p in path.parent.iterdir()] == ["pepper"]  # no temp files left
    assert load_or_create_pepper(tmp_path / "other") != pepper


def test_truncated_pepper_fails_closed(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "pepper").write_bytes(b"short")
    with pytest.raises(ValueError, match="expected 32 bytes"):
        load_or_create_pepper(tmp_path)
