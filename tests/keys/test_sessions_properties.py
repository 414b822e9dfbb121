"""Property tests for the session-token front check (proxy.keys.sessions.verify, behind authn.parse_bearer).

Whatever arrives as a bearer token, verify answers with the claims or raises Unauthenticated, never
anything else; and a token verifies only if it is the minted one, byte for byte: the signature's
spelling too (base64url has one spelling per value once the unused low bits must be zero).
"""

from __future__ import annotations

import json
import string

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from jwt.utils import base64url_decode

from proxy.context import Principal
from proxy.errors import Unauthenticated
from proxy.keys.sessions import MAX_TOKEN_CHARS, SessionAuthority
from proxy.steps.authn import parse_bearer
from tests.sessiontokens import b64, raw_token

KID = "00112233445566aa"
NOW = 1_800_000_000.0
KEY = Ed25519PrivateKey.generate()
AUTH = SessionAuthority({KID: KEY}, KID, issuer="seekgate", audience="seekgate", ttl_s=900)
PARENT = Principal(key_id="abcdefghijkl", tier="user", owner="alice", roles=("user",))
TOKEN = AUTH.mint(PARENT, NOW).token
HEADER, PAYLOAD, SIGNATURE = TOKEN.split(".")
B64URL = string.ascii_letters + string.digits + "-_"
B64URL_ORDER = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"   # value 0..63
# Any text at all, lone surrogates (U+D800-DFFF) included: verify refuses non-ASCII before PyJWT sees it.
TEXT = st.characters()
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def refused(token: str) -> str:
    """verify's reason for refusing `token`; any other exception fails the test."""
    with pytest.raises(Unauthenticated) as info:
        AUTH.verify(token, NOW)
    return info.value.reason


def test_the_minted_token_verifies() -> None:
    assert AUTH.verify(TOKEN, NOW).parent == PARENT.key_id


def test_the_signature_spelled_with_its_unused_bits_set_is_refused() -> None:
    # 64 signature bytes are 86 base64url characters: the last one carries 4 bits that encode nothing.
    last = B64URL_ORDER.index(SIGNATURE[-1])
    respelled = SIGNATURE[:-1] + B64URL_ORDER[last ^ 0b0001]
    assert base64url_decode(respelled) == base64url_decode(SIGNATURE)   # the same bytes, another spelling
    assert refused(f"{HEADER}.{PAYLOAD}.{respelled}") == "malformed"
    assert refused(f"{HEADER}.{PAYLOAD}.{SIGNATURE}==") == "malformed"   # padded: another spelling too


@SETTINGS
@given(st.text(TEXT, max_size=3000))
@example("")
@example("...")
@example("eyJ" + "A" * (MAX_TOKEN_CHARS - 3))
@example(HEADER + "." + PAYLOAD)       # no signature segment
@example(TOKEN + ".")                  # a fourth segment
def test_any_text_is_refused_with_unauthenticated(text: str) -> None:
    assume(text != TOKEN)
    refused(text)


@SETTINGS
@given(st.binary(max_size=3000))
def test_any_bytes_read_as_text_are_refused(data: bytes) -> None:
    refused(data.decode("latin-1"))


@SETTINGS
@given(st.integers(min_value=MAX_TOKEN_CHARS + 1, max_value=200_000), st.sampled_from(["A", ".", "é", "\x00"]))
def test_huge_tokens_are_refused_before_parsing(size: int, char: str) -> None:
    assert refused(char * size) == "session_token_too_large"


def mutate(segment: str, data: st.DataObject) -> str:
    kind = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate", "replace", "unicode"]))
    i = data.draw(st.integers(0, max(0, len(segment) - 1)))
    if kind == "flip" and segment:
        return segment[:i] + data.draw(st.sampled_from(B64URL)) + segment[i + 1:]
    if kind == "insert":
        return segment[:i] + data.draw(st.text(TEXT, min_size=1, max_size=8)) + segment[i:]
    if kind == "delete" and segment:
        return segment[:i] + segment[i + 1:]
    if kind == "truncate":
        return segment[:i]
    if kind == "unicode":
        return segment[:i] + data.draw(st.characters(min_codepoint=0x80)) \
            + segment[i + 1:]
    return data.draw(st.text(alphabet=B64URL, max_size=120))


@SETTINGS
@given(st.data())
def test_a_mutated_token_verifies_only_if_unchanged(data: st.DataObject) -> None:
    parts = [HEADER, PAYLOAD, SIGNATURE]
    for index in data.draw(st.sets(st.sampled_from([0, 1, 2]), min_size=1)):
        parts[index] = mutate(parts[index], data)
    token = ".".join(parts)
    if token == TOKEN:   # a flip to the same character
        assert AUTH.verify(token, NOW).parent == PARENT.key_id
    else:
        refused(token)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@SETTINGS
@given(st.one_of(json_values, st.dictionaries(st.sampled_from(["alg", "typ", "kid", "jku", "crit", "b64"]),
                                              json_values, max_size=4)),
       st.one_of(json_values, st.fixed_dictionaries({}, optional={
           "iss": json_values, "aud": json_values, "exp": json_values, "iat": json_values,
           "roles": json_values, "tier": json_values})))
def test_forged_headers_and_payloads_signed_with_the_real_key_are_refused(header: object, claims: object) -> None:
    """Even the right signature never carries a header or payload the front check did not expect."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    token = f"{signing_input}.{b64(KEY.sign(signing_input.encode()))}"
    refused(token)


@SETTINGS
@given(st.text(max_size=200))
@example("\ud800.\udfff.x")
@example(TOKEN + "\udcff")
def test_the_bearer_front_passes_on_only_tokens_that_verify_refuses_cleanly(header: str) -> None:
    """What HTTP and gRPC do first: parse_bearer, then verify; both fail only with Unauthenticated."""
    try:
        token = parse_bearer("Bearer " + header)
    except Unauthenticated:
        return
    assume(token != TOKEN)
    refused(token)


def test_hand_built_token_with_the_real_key_and_good_claims_verifies() -> None:
    """The forging helper itself is sound: with the real header and claims it makes a valid token."""
    header = json.loads(base64url_decode(HEADER))
    claims = json.loads(base64url_decode(PAYLOAD))
    assert AUTH.verify(raw_token(header, claims, KEY.sign), NOW).parent == PARENT.key_id
