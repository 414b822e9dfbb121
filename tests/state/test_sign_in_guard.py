"""Tests for proxy.state.sign_in_guard (pure logic, fake clock); the guard in a running server: tests/frontend/test_sign_in_guard.py."""

from __future__ import annotations

import pytest

from proxy.errors import RateLimited
from proxy.settings import AuthSettings
from proxy.state.sign_in_guard import SignInGuard, source_of


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refused_for(guard: SignInGuard, ip: str, token: str = "guess") -> int:
    """The Retry-After a refusal gives; fails the test if `ip` is not refused."""
    with pytest.raises(RateLimited) as err:
        guard.check(ip, token)
    assert err.value.reason == "sign_in_failures" and err.value.http_status == 429
    assert err.value.retry_after is not None
    return err.value.retry_after


def test_a_burst_of_failures_then_one_per_refill_interval() -> None:
    clock = Clock()
    guard = SignInGuard(per_minute=6, burst=3, clock=clock)   # one failure back every 10 s
    for _ in range(3):
        guard.check("10.0.0.1", "guess")
        guard.failed("10.0.0.1", "guess")
    assert refused_for(guard, "10.0.0.1") == 10
    clock.now += 4
    assert refused_for(guard, "10.0.0.1") == 6
    clock.now += 6
    guard.check("10.0.0.1", "guess")  # one try back
    guard.failed("10.0.0.1", "guess")
    assert refused_for(guard, "10.0.0.1") == 10
    guard.check("10.0.0.2", "guess")  # another address is its own
    clock.now += 3600                # refilled to the burst, never beyond
    for _ in range(3):
        guard.check("10.0.0.1", "guess")
        guard.failed("10.0.0.1", "guess")
    refused_for(guard, "10.0.0.1")


def test_ipv6_counts_per_64_and_ipv4_mapped_as_ipv4() -> None:
    assert source_of("2001:db8:1:2:aaaa::1") == source_of("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:3::1") != source_of("2001:db8:1:2::1")
    assert source_of("::ffff:10.0.0.1") == source_of("10.0.0.1") == "10.0.0.1"
    assert source_of("not-an-ip") == "not-an-ip"
    guard = SignInGuard(per_minute=1, burst=1, clock=Clock())
    guard.failed("2001:db8:1:2::1", "guess")
    refused_for(guard, "2001:db8:1:2:ffff::7")


def test_memory_is_bounded_dropping_the_longest_quiet_source() -> None:
    clock = Clock()
    guard = SignInGuard(per_minute=1, burst=1, max_sources=2, clock=clock)
    guard.failed("10.0.0.1", "guess")
    guard.failed("10.0.0.2", "guess")
    guard.failed("10.0.0.1", "guess")  # the most recent again
    guard.failed("10.0.0.3", "guess")  # 10.0.0.2 goes
    assert guard.tracked() == (2, 0)
    guard.check("10.0.0.2", "guess")
    refused_for(guard, "10.0.0.1")
    refused_for(guard, "10.0.0.3")


def test_a_credential_that_succeeded_before_is_never_held_up_until_it_fails() -> None:
    guard = SignInGuard(per_minute=1, burst=1, clock=Clock())
    guard.succeeded("good-token")
    guard.failed("10.0.0.1", "guess")
    refused_for(guard, "10.0.0.1", "guess")
    refused_for(guard, "10.0.0.1", "new-good-token")   # right or not, it was never seen to succeed
    guard.check("10.0.0.1", "good-token")
    guard.failed("10.0.0.1", "good-token")             # revoked since, say: forgotten
    refused_for(guard, "10.0.0.1", "good-token")


def test_remembered_credentials_are_bounded() -> None:
    guard = SignInGuard(per_minute=1, burst=1, max_verified=2, clock=Clock())
    for token in ("a", "b", "a", "c"):   # "b" is the least recently used
        guard.succeeded(token)
    assert guard.tracked() == (0, 2)
    guard.failed("10.0.0.1", "guess")
    guard.check("10.0.0.1", "a")
    guard.check("10.0.0.1", "c")
    refused_for(guard, "10.0.0.1", "b")


def test_unlimited_addresses_are_never_counted() -> None:
    """Loopback by default: a proxy in front of seekgate would otherwise let one guesser lock out every client."""
    guard = SignInGuard.from_settings(AuthSettings(sign_in_failure_burst=1))
    assert guard is not None
    for ip in ("127.0.0.1", "::1", "::ffff:127.0.0.5"):
        guard.failed(ip, "guess")
        guard.failed(ip, "guess")
        guard.check(ip, "guess")
    guard = SignInGuard(per_minute=1, burst=1, unlimited="10.1.0.0/16, 192.0.2.7", clock=Clock())
    for ip in ("10.1.200.3", "192.0.2.7"):
        guard.failed(ip, "guess")
        guard.check(ip, "guess")
    guard.failed("192.0.2.8", "guess")
    refused_for(guard, "192.0.2.8")
    assert guard.tracked() == (1, 0)


def test_settings_0_turns_it_off_and_bad_values_are_refused() -> None:
    assert SignInGuard.from_settings(AuthSettings(sign_in_failures_per_min=0)) is None
    guard = SignInGuard.from_settings(AuthSettings())
    assert guard is not None and (guard.rate_s, guard.burst) == (1.0, 100)
    with pytest.raises(ValueError):
        SignInGuard(per_minute=1, burst=0)
