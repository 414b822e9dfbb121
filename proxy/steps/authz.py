"""The authorize step: rules compiled to a deny-overrides casbin enforcer, and hot reload."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import translate
from functools import lru_cache
from pathlib import Path

import casbin
from casbin.model import Model

from ..context import IPAddress, Principal, Resource, client_address
from ..quotas import Limits
from .policy import DEFAULT_DENY, EnvCond, PolicyError, PolicySet, SubjectCond, load_policy_dir, policy_files

log = logging.getLogger(__name__)

# Every rule becomes one casbin policy line: its resource patterns and actions
# joined with `|`, and its subject and environment conditions as canonical JSON
# (readable in a dump). The conditions are evaluated by functions registered on
# the enforcer, compiled once per load, not parsed per request.
CASBIN_MODEL = """
[request_definition]
r = sub, obj, act, env

[policy_definition]
p = obj, act, sub, env, eft, id

[policy_effect]
e = some(where (p.eft == allow)) && !some(where (p.eft == deny))

[matchers]
m = resourceMatch(r.obj, p.obj) && actionMatch(r.act, p.act) && \
subjectMatch(r.sub, r.obj, p.sub) && envMatch(r.env, p.env)
"""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: str          # id of the deciding rule, or "default_deny" when no rule matched


@dataclass(frozen=True, slots=True)
class Env:
    """The request environment a rule may test: client address, UTC minute of day, client certificate, API."""

    ip: IPAddress | None
    minute: int
    certs: tuple[str, ...] = ()   # the identities of the mTLS client certificate (PeerCert.identities)
    api: str = "kserve"

    @classmethod
    def at(cls, client_ip: str, now: datetime, certs: tuple[str, ...] = (), api: str = "kserve") -> Env:
        return cls(client_address(client_ip), _minute_of_day(now), certs, api)


def _minute_of_day(now: datetime) -> int:
    if now.tzinfo is not None and now.tzinfo is not timezone.utc:
        now = now.astimezone(timezone.utc)  # naive datetimes are taken as UTC already
    return now.hour * 60 + now.minute


def subject_matches(cond: SubjectCond, p: Principal, resource: str) -> bool:
    """All conditions present in `cond` hold for principal `p` on `resource`."""
    if cond.roles and not any(r in p.roles for r in cond.roles):
        return False
    if cond.not_roles and any(r in p.roles for r in cond.not_roles):
        return False
    if cond.tiers and p.tier not in cond.tiers:
        return False
    if cond.owners and p.owner not in cond.owners:
        return False
    if any(p.labels.get(k) != v for k, v in cond.labels):
        return False
    if cond.key_may_use_model is not None:
        # Not a model resource: there is nothing to test, so neither value holds.
        if not resource.startswith("model:"):
            return False
        may = not p.models or resource[len("model:"):] in p.models
        return may == cond.key_may_use_model
    return True


def env_matches(cond: EnvCond, env: Env) -> bool:
    """All conditions present in `cond` hold for the request environment."""
    if cond.client_ips and (env.ip is None or not any(env.ip in n for n in cond.client_ips)):
        return False
    if cond.hours and not any(_in_hours(s, e, env.minute) for s, e in cond.hours):
        return False
    if cond.client_certs and not any(c in env.certs for c in cond.client_certs):
        return False   # no certificate (plain TLS, gRPC without mTLS) matches no client_certs condition
    if cond.apis and env.api not in cond.apis:
        return False
    return True


def _in_hours(start: int, end: int, minute: int) -> bool:
    """`minute` of the day lies in [start, end); a start after the end wraps midnight."""
    return (start <= minute < end) if start < end else (minute >= start or minute < end)


def _minute_classes(policy: PolicySet) -> tuple[int, ...]:
    """For each minute of the day, which of the policy's time windows contain it, as a small int.

    Rules read the time only through those windows, so minutes in the same class get the same
    decisions and can share memo entries: the memo then refills when a window opens or closes,
    not every minute.
    """
    windows = sorted({w for r in policy.rules for w in r.environment.hours})
    classes: dict[tuple[bool, ...], int] = {}
    return tuple(classes.setdefault(tuple(_in_hours(s, e, m) for s, e in windows), len(classes))
                 for m in range(24 * 60))


@lru_cache(maxsize=1024)
def _globs(patterns: str) -> re.Pattern[str]:
    """One regex for a rule's `|`-joined resource patterns (`|` is not allowed in a pattern)."""
    return re.compile("|".join(f"(?:{translate(p)})" for p in patterns.split("|")))


@lru_cache(maxsize=1024)
def _actions(actions: str) -> frozenset[str]:
    return frozenset(actions.split("|"))


def _cond_key(cond: SubjectCond | EnvCond) -> str:
    data = {k: getattr(cond, k) for k in cond.__slots__ if getattr(cond, k) not in ((), None)}
    return json.dumps(data, sort_keys=True, default=str)


def build_enforcer(policy: PolicySet) -> casbin.Enforcer:
    """Compile rules into a casbin enforcer; no rules means every request is denied."""
    subjects: dict[str, SubjectCond] = {}
    envs: dict[str, EnvCond] = {}
    deny: list[list[str]] = []
    allow: list[list[str]] = []
    for r in policy.rules:
        sk, ek = _cond_key(r.subject), _cond_key(r.environment)
        subjects[sk], envs[ek] = r.subject, r.environment
        line = ["|".join(r.resources), "|".join(r.actions), sk, ek, r.effect, r.id]
        (deny if r.effect == "deny" else allow).append(line)
    model = Model()
    model.load_model_from_text(CASBIN_MODEL)
    enforcer = casbin.Enforcer(model)
    # With no policy lines casbin evaluates the matcher once with empty strings:
    # every function must return False for "" so that an empty policy denies.
    enforcer.add_function("resourceMatch", lambda obj, pat: bool(pat) and _globs(pat).match(obj) is not None)
    enforcer.add_function("actionMatch",
                          lambda act, pat: bool(pat) and (act in _actions(pat) or "*" in _actions(pat)))
    enforcer.add_function("subjectMatch",
                          lambda sub, obj, key: key in subjects and subject_matches(subjects[key], sub, obj))
    enforcer.add_function("envMatch", lambda env, key: key in envs and env_matches(envs[key], env))
    # casbin explains a decision with the last matching line and stops at the first
    # deny: denies go first and allows reversed, so the reported allow rule is the
    # first matching one in load order.
    lines = deny + allow[::-1]
    if lines:
        enforcer.add_named_policies("p", lines)
    return enforcer


@dataclass(frozen=True, slots=True)
class _Loaded:
    policy: PolicySet
    enforcer: casbin.Enforcer
    version: int
    # Decisions memoised per load: casbin walks every line through simpleeval (about 100-200 us
    # a call), while keys with the same attributes call the same routes all day.
    cache: OrderedDict[tuple[object, ...], Decision] = field(default_factory=OrderedDict)
    # Whether any rule reads the client address / the time: if none does, neither is part of
    # the memo key, so one decision serves every address and every minute.
    uses_ip: bool = False
    uses_time: bool = False
    uses_certs: bool = False
    minute_class: tuple[int, ...] = ()   # minute of day -> which time windows hold (_minute_classes)
    rule_limits: dict[str, Limits] = field(default_factory=dict)   # rule id -> what it imposes

    @classmethod
    def compile(cls, policy: PolicySet, version: int) -> _Loaded:
        return cls(policy, build_enforcer(policy), version,
                   uses_ip=any(r.environment.client_ips for r in policy.rules),
                   uses_time=any(r.environment.hours for r in policy.rules),
                   uses_certs=any(r.environment.client_certs for r in policy.rules),
                   minute_class=_minute_classes(policy),
                   rule_limits={r.id: Limits(**dict(r.limits)) for r in policy.rules if r.limits})


# Distinct (attributes, route, environment) combinations, least recently used out. Sized above the
# principals of a large fleet (10k users with an owner each, a few routes apiece): an LRU smaller
# than its working set misses on every request once keys cycle, and every miss is a cold casbin
# evaluation (~200 us) plus an entry allocated and evicted. Full, it holds on the order of 10 MiB.
_CACHE_MAX = 32768


class Authorizer:
    """Holds the compiled policy; `authorize` is synchronous and does no I/O."""

    def __init__(self, policy: PolicySet | None = None) -> None:
        self._state = _Loaded.compile(PolicySet(), 0)
        # The policy files as they were just before from_dir read them: the watcher's baseline. Its own
        # look at start-up came seconds later (store, keyring, Triton in between), and an edit made
        # meanwhile counted as already loaded: never installed until the next edit.
        self.loaded_files: Snapshot = None
        if policy is not None:
            self.install(policy)

    @classmethod
    def from_dir(cls, path: Path) -> Authorizer:
        """Load at start-up; raises PolicyError so a broken policy stops the server (fail closed)."""
        files = _snapshot(Path(path))
        authorizer = cls(load_policy_dir(Path(path)))
        authorizer.loaded_files = files
        return authorizer

    @property
    def version(self) -> int:
        return self._state.version

    @property
    def policy(self) -> PolicySet:
        return self._state.policy

    def install(self, policy: PolicySet) -> None:
        """Compile and swap in `policy` as one step; requests see the old or the new, never a mix."""
        state = _Loaded.compile(policy, self._state.version + 1)
        if not policy.rules:
            log.warning("policy has no rules: every request will be denied")
        self._state = state

    def rule_limits(self, rule_id: str | None) -> Limits | None:
        """The limits the allow rule `rule_id` imposes on the keys it allows; None if none."""
        return self._state.rule_limits.get(rule_id) if rule_id else None

    def reload(self, path: Path) -> None:
        """Load `path` and install it; on PolicyError the current policy stays in force."""
        self.install(load_policy_dir(Path(path)))

    def authorize(self, principal: Principal, resource: Resource, client_ip: str,
                  now: datetime, certs: tuple[str, ...] = ()) -> Decision:
        """Decide (principal, resource, action) in the environment (client_ip, now in UTC, the
        identities of the client certificate)."""
        state, p = self._state, principal
        minute_class = state.minute_class[_minute_of_day(now)] if state.uses_time else None
        if minute_class is not None and state.cache and next(reversed(state.cache))[-1] != minute_class:
            # The most recently used entry is of another class: a time window opened or closed
            # since. The entries decided before would sit unused until the same windows hold again
            # (hours away), as much memory again as the live ones.
            state.cache.clear()
        # Everything a rule can read, and nothing else (not the key id: keys alike share an
        # entry). Extend this key with any new condition.
        key = (p.tier, p.owner, p.roles, tuple(sorted(p.labels.items())), p.models,
               resource.resource, resource.action, resource.api, client_ip if state.uses_ip else None,
               certs if state.uses_certs else None, minute_class)   # minute_class last: read above
        decision = state.cache.get(key)
        if decision is not None:
            state.cache.move_to_end(key)
            return decision
        allowed, explain = state.enforcer.enforce_ex(p, resource.resource, resource.action,
                                                     Env.at(client_ip, now, certs, resource.api))
        if not explain or (not allowed and explain[4] != "deny"):
            decision = Decision(False, DEFAULT_DENY)
        else:
            decision = Decision(bool(allowed), explain[5])
        state.cache[key] = decision
        if len(state.cache) > _CACHE_MAX:
            state.cache.popitem(last=False)
        return decision


Snapshot = tuple[tuple[str, int, int], ...] | None


def _snapshot(path: Path) -> Snapshot:
    try:
        return tuple((p.name, st.st_mtime_ns, st.st_size)
                     for p in policy_files(path) for st in (p.stat(),))
    except OSError:
        return None


class PolicyWatcher:
    """Polls a policy directory and reloads the Authorizer when its files change.

    A change is loaded once the directory has looked the same for two polls in a
    row, so a file caught half-written by an editor is not loaded. A broken edit
    keeps the last good policy in force and is reported once through `on_error`.
    """

    def __init__(self, authorizer: Authorizer, path: Path, *, interval: float = 0.5,
                 on_reload: Callable[[], None] | None = None,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.authorizer = authorizer
        self.path = Path(path)
        self.interval = interval
        self.on_reload = on_reload
        self.on_error = on_error
        self._seen: Snapshot = None
        self._pending: Snapshot = None
        self._task: asyncio.Task[None] | None = None
        # The last reload's outcome, for the console's policy page: {"at", "ok", "version", "error"}; None: none yet.
        self.last_reload: dict[str, object] | None = None

    async def start(self) -> None:
        self._pending = await asyncio.to_thread(_snapshot, self.path)
        # Files changed since the authorizer read them are a change to load at the first poll.
        loaded = self.authorizer.loaded_files
        self._seen = self._pending if loaded is None else loaded
        self._task = asyncio.create_task(self._run(), name="policy-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll()
            except Exception:  # the watcher must outlive any surprise; the old policy stays
                log.exception("policy watcher poll failed")

    async def poll(self) -> bool:
        """One poll; returns True when a new policy was installed."""
        snap = await asyncio.to_thread(_snapshot, self.path)
        if snap == self._seen:
            self._pending = snap
            return False
        if snap != self._pending:
            self._pending = snap  # changed since the last poll: wait until it settles
            return False
        self._seen = snap
        try:
            await asyncio.to_thread(self.authorizer.reload, self.path)
        except Exception as e:  # PolicyError, or a surprise from the compiler: fail safe either way
            detail = str(e) if isinstance(e, PolicyError) else f"{type(e).__name__}: {e}"
            msg = f"policy reload failed, keeping version {self.authorizer.version}:\n{detail}"
            log.error("%s", msg)
            self.last_reload = {"at": time.time(), "ok": False, "version": self.authorizer.version, "error": msg}
            self._call(self.on_error, msg)
            return False
        log.info("policy reloaded: version %d, %d rules", self.authorizer.version,
                 len(self.authorizer.policy.rules))
        self.last_reload = {"at": time.time(), "ok": True, "version": self.authorizer.version, "error": None}
        self._call(self.on_reload)
        return True

    @staticmethod
    def _call(fn: Callable[..., None] | None, *args: str) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:
            log.exception("policy watcher callback failed")
