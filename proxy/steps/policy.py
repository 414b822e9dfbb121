"""YAML policy files: load and validate into plain Rule data, every error with file and line."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

from ..quotas import LIMIT_FIELDS, parse_limits

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Kept closed on purpose: a typo ("infr", "repositry") must fail the load, not
# silently never match. Extend these when the classifier grows new routes.
ACTIONS = frozenset({"infer", "read", "admin", "create"})
RESOURCES = frozenset({"server", "repository", "sharedmemory", "trace", "logging",
                       "statistics", "admin:keys", "admin:crypto", "sessions",
                       "admin:audit", "admin:policies", "console"})
TIERS = frozenset({"app", "device", "user", "session"})
DEFAULT_DENY = "default_deny"

_RULE_KEYS = {"id", "effect", "description", "subject", "resources", "actions", "environment", "limits"}
_SUBJECT_LISTS = ("roles", "not_roles", "tiers", "owners")
_SUBJECT_KEYS = {*_SUBJECT_LISTS, "labels", "key_may_use_model"}
_ENV_KEYS = {"client_ips", "hours", "client_certs", "apis"}
APIS = frozenset({"kserve", "openai"})   # which API a request came through (Resource.api)
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_GLOB_RE = re.compile(r"^[A-Za-z0-9_.:*?\[\]!/-]+$")
_HOURS_RE = re.compile(r"^(\d\d):(\d\d)-(\d\d):(\d\d)$")


class PolicyError(ValueError):
    """A policy that cannot be loaded; `errors` lists every problem as `file:line: message`."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class SubjectCond:
    """All present conditions must hold; an absent one always holds."""

    roles: tuple[str, ...] = ()
    not_roles: tuple[str, ...] = ()
    tiers: tuple[str, ...] = ()
    owners: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    key_may_use_model: bool | None = None


@dataclass(frozen=True, slots=True)
class EnvCond:
    client_ips: tuple[IPNetwork, ...] = ()
    hours: tuple[tuple[int, int], ...] = ()  # [start, end) in minutes; start > end wraps midnight
    # mTLS: the request's client certificate has one of these identities, its subject (RFC 4514,
    # "CN=billing,O=example") or a SAN as OpenSSL spells it ("URI:spiffe://example.org/billing").
    client_certs: tuple[str, ...] = ()
    apis: tuple[str, ...] = ()               # kserve | openai: the API the request came through


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    effect: str                      # allow | deny
    resources: tuple[str, ...]
    actions: tuple[str, ...]
    subject: SubjectCond = SubjectCond()
    environment: EnvCond = EnvCond()
    description: str = ""
    source: str = ""                 # file:line, for messages
    # Allow rules only: limits (limits.LIMIT_FIELDS) every key this rule allows is held to, per key,
    # on top of the key's own; e.g. interns get rpm 10 whatever their keys say.
    limits: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class PolicySet:
    rules: tuple[Rule, ...] = ()
    files: tuple[Path, ...] = ()


# ---------------------------------------------------------------- YAML with lines

class _LineDict(dict):
    line: int = 0
    key_lines: dict[Any, int]
    dupes: list[tuple[Any, int]]


class _LineList(list):
    line: int = 0
    item_lines: list[int]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key and list item."""


def _construct_map(loader: yaml.SafeLoader, node: yaml.MappingNode) -> _LineDict:
    own = sum(1 for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge")
    loader.flatten_mapping(node)  # puts `<<: *x` pairs first; written keys may override them
    out = _LineDict()
    out.line, out.key_lines, out.dupes = node.start_mark.line + 1, {}, []
    written: set[Any] = set()
    for i, (knode, vnode) in enumerate(node.value):
        key = loader.construct_object(knode, deep=True)
        try:
            hash(key)
        except TypeError:
            key = repr(key)
        if i >= len(node.value) - own:
            if key in written:
                out.dupes.append((key, knode.start_mark.line + 1))
            written.add(key)
        out[key] = loader.construct_object(vnode, deep=True)
        out.key_lines[key] = knode.start_mark.line + 1
    return out


def _construct_seq(loader: yaml.SafeLoader, node: yaml.SequenceNode) -> _LineList:
    out = _LineList(loader.construct_object(n, deep=True) for n in node.value)
    out.line, out.item_lines = node.start_mark.line + 1, [n.start_mark.line + 1 for n in node.value]
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


def _key_line(d: Any, key: Any, default: int) -> int:
    return getattr(d, "key_lines", {}).get(key, default)


def _item_line(seq: Any, i: int, default: int) -> int:
    lines = getattr(seq, "item_lines", None)
    return lines[i] if lines and i < len(lines) else default


# ---------------------------------------------------------------- validation

class _Checker:
    """Validates raw rule data, collecting every error instead of stopping at the first."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[str] = []
        self.prefix = ""

    def err(self, line: int, msg: str) -> None:
        self.errors.append(f"{self.source}:{line}: {self.prefix}{msg}")

    def strings(self, val: Any, what: str, line: int) -> tuple[str, ...]:
        if not isinstance(val, list) or not val:
            self.err(line, f"{what} must be a non-empty list of strings")
            return ()
        out = []
        for i, item in enumerate(val):
            if not isinstance(item, str) or not item:
                self.err(_item_line(val, i, line), f"{what}: {item!r} is not a non-empty string")
            else:
                out.append(item)
        return tuple(out)

    def mapping(self, val: Any, what: str, keys: set[str], line: int) -> dict[Any, Any]:
        if not isinstance(val, dict):
            self.err(line, f"{what} must be a mapping")
            return {}
        for key, dline in getattr(val, "dupes", []):
            self.err(dline, f"duplicate key {key!r} in {what}")
        for key in val:
            if key not in keys:
                self.err(_key_line(val, key, line), f"unknown key {key!r} in {what} "
                         f"(expected one of: {', '.join(sorted(keys))})")
        return val

    def rule(self, raw: Any, line: int) -> Rule | None:
        self.prefix = ""
        if not isinstance(raw, dict):
            self.err(line, f"a rule must be a mapping, got {type(raw).__name__}")
            return None
        line = getattr(raw, "line", line)
        rid = raw.get("id")
        if not isinstance(rid, str) or not _ID_RE.match(rid) or rid == DEFAULT_DENY:
            self.err(_key_line(raw, "id", line), f"rule id {rid!r} must be a string of letters, "
                     f"digits, '_.:-' (and not {DEFAULT_DENY!r})")
            rid = None
        self.prefix = f"rule {rid!r}: " if rid else ""
        n_err = len(self.errors)
        self.mapping(raw, "rule", _RULE_KEYS, line)
        kl = lambda k: _key_line(raw, k, line)  # noqa: E731
        effect: Any = raw.get("effect")   # checked below; a bad one ends in None, not a Rule
        if effect not in ("allow", "deny"):
            self.err(kl("effect"), f"unknown effect {effect!r} (expected allow or deny)")
        desc = raw.get("description", "")
        if not isinstance(desc, str):
            self.err(kl("description"), "description must be a string")
        resources = self.strings(raw.get("resources"), "resources", kl("resources"))
        for i, pat in enumerate(resources):
            if not _valid_resource_pattern(pat):
                self.err(_item_line(raw.get("resources"), i, kl("resources")),
                         f"unknown resource {pat!r} (known: model:<name>, {', '.join(sorted(RESOURCES))})")
        actions = self.strings(raw.get("actions"), "actions", kl("actions"))
        for i, act in enumerate(actions):
            if act != "*" and act not in ACTIONS:
                self.err(_item_line(raw.get("actions"), i, kl("actions")),
                         f"unknown action {act!r} (expected *, {', '.join(sorted(ACTIONS))})")
        subject = self.subject(raw.get("subject", {}), kl("subject"))
        env = self.environment(raw.get("environment", {}), kl("environment"))
        limits = self.limits(raw, effect, kl("limits"))
        if len(self.errors) > n_err or rid is None:
            return None
        return Rule(rid, effect, resources, actions, subject, env, desc, f"{self.source}:{line}", limits)

    def limits(self, raw: dict[Any, Any], effect: Any, line: int) -> tuple[tuple[str, int], ...]:
        if "limits" not in raw:
            return ()
        if effect == "deny":
            self.err(line, "limits on a deny rule would never apply (it refuses the request)")
            return ()
        value = raw["limits"]
        try:
            if not isinstance(value, dict) or not value:
                raise ValueError(f"limits must be a non-empty mapping of {', '.join(LIMIT_FIELDS)}")
            return tuple(sorted(parse_limits(value).items()))
        except ValueError as exc:
            self.err(line, str(exc))
            return ()

    def subject(self, raw: Any, line: int) -> SubjectCond:
        raw = self.mapping(raw, "subject", _SUBJECT_KEYS, line)
        lists = {k: self.strings(raw[k], f"subject.{k}", _key_line(raw, k, line))
                 for k in _SUBJECT_LISTS if k in raw}
        for i, tier in enumerate(lists.get("tiers", ())):
            if tier not in TIERS:
                self.err(_item_line(raw["tiers"], i, _key_line(raw, "tiers", line)), f"unknown tier {tier!r}")
        labels: list[tuple[str, str]] = []
        if "labels" in raw:
            lab = raw["labels"]
            if not isinstance(lab, dict):
                self.err(_key_line(raw, "labels", line), "subject.labels must be a mapping")
                lab = {}
            for k, v in lab.items():
                if not isinstance(k, str) or not isinstance(v, str):
                    self.err(_key_line(lab, k, line), f"label {k!r}: {v!r} must map a string to a "
                             "string (quote values like yes, 1, on)")
                else:
                    labels.append((k, v))
        may = raw.get("key_may_use_model")
        if may is not None and not isinstance(may, bool):
            self.err(_key_line(raw, "key_may_use_model", line), "key_may_use_model must be true or false")
            may = None
        return SubjectCond(labels=tuple(sorted(labels)), key_may_use_model=may, **lists)

    def environment(self, raw: Any, line: int) -> EnvCond:
        raw = self.mapping(raw, "environment", _ENV_KEYS, line)
        nets: list[IPNetwork] = []
        if "client_ips" in raw:
            cl = _key_line(raw, "client_ips", line)
            for i, cidr in enumerate(self.strings(raw["client_ips"], "environment.client_ips", cl)):
                try:
                    nets.append(ipaddress.ip_network(cidr, strict=False))
                except ValueError:
                    self.err(_item_line(raw["client_ips"], i, cl), f"bad CIDR {cidr!r}")
        hours: list[tuple[int, int]] = []
        if "hours" in raw:
            hl, hval = _key_line(raw, "hours", line), raw["hours"]
            for i, spec in enumerate(self.strings([hval] if isinstance(hval, str) else hval,
                                                  "environment.hours", hl)):
                rng = _parse_hours(spec)
                if rng is None:
                    self.err(_item_line(hval, i, hl), f"bad hour range {spec!r} "
                             "(expected HH:MM-HH:MM in UTC, start != end, end may be 24:00)")
                else:
                    hours.append(rng)
        certs: tuple[str, ...] = ()
        if "client_certs" in raw:
            certs = self.strings(raw["client_certs"], "environment.client_certs",
                                 _key_line(raw, "client_certs", line))
        apis: tuple[str, ...] = ()
        if "apis" in raw:
            al = _key_line(raw, "apis", line)
            apis = self.strings(raw["apis"], "environment.apis", al)
            for i, api in enumerate(apis):
                if api not in APIS:
                    self.err(_item_line(raw["apis"], i, al), f"unknown api {api!r} (expected one of: "
                             f"{', '.join(sorted(APIS))})")
        return EnvCond(tuple(nets), tuple(hours), certs, apis)


def _valid_resource_pattern(pat: str) -> bool:
    if not _GLOB_RE.match(pat):
        return False
    if pat.startswith("model:"):
        return len(pat) > 6
    return any(fnmatchcase(k, pat) for k in (*RESOURCES, "model:x"))


def _parse_hours(spec: str) -> tuple[int, int] | None:
    m = _HOURS_RE.match(spec)
    if not m:
        return None
    h1, m1, h2, m2 = map(int, m.groups())
    if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2):
        return None
    start, end = h1 * 60 + m1, h2 * 60 + m2
    return None if start == end else (start, end)


def compile_rules(raw_rules: Any, source: str = "<memory>") -> PolicySet:
    """Validate a list of raw rule mappings; raise PolicyError listing every problem."""
    chk = _Checker(source)
    rules = _check_rules(chk, raw_rules, 1)
    if chk.errors:
        raise PolicyError(chk.errors)
    _check_unique(rules, chk.errors)
    if chk.errors:
        raise PolicyError(chk.errors)
    return PolicySet(tuple(rules))


def _check_rules(chk: _Checker, raw: Any, line: int) -> list[Rule]:
    if not isinstance(raw, list):
        chk.err(line, "'rules' must be a list of rules")
        return []
    rules = [chk.rule(r, _item_line(raw, i, line)) for i, r in enumerate(raw)]
    return [r for r in rules if r is not None]


def _check_unique(rules: list[Rule], errors: list[str]) -> None:
    seen: dict[str, str] = {}
    for r in rules:
        if r.id in seen:
            errors.append(f"{r.source}: duplicate rule id {r.id!r} (first defined at {seen[r.id]})")
        else:
            seen[r.id] = r.source


def policy_files(path: Path) -> list[Path]:
    """The files a policy directory consists of, in load order (hidden files skipped).

    A symlink counts even when its target is gone (is_file() is False then): skipped, its rules,
    deny rules included, would leave the policy without an error; read, it fails the load instead.
    One to a device or a pipe stays skipped: reading /dev/zero or a FIFO would never end.
    """
    return sorted(p for p in path.iterdir()
                  if p.suffix in (".yaml", ".yml") and not p.name.startswith(".")
                  and (p.is_file() or (p.is_symlink() and not p.exists())))


def load_policy_dir(path: Path) -> PolicySet:
    """Load every *.yaml/*.yml in `path` (sorted); raise PolicyError listing every problem."""
    path = Path(path)
    if not path.is_dir():
        raise PolicyError([f"{path}: policy directory does not exist"])
    files, rules, errors = policy_files(path), [], []
    for f in files:
        chk = _Checker(str(f))
        try:
            doc = yaml.load(f.read_text(encoding="utf-8"), Loader=_LineLoader)  # noqa: S506 (SafeLoader)
        except (OSError, UnicodeDecodeError) as e:
            errors.append(f"{f}:0: cannot read: {e}")
            continue
        except (yaml.YAMLError, ValueError) as e:  # ValueError: e.g. a date like 2024-02-30
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            errors.append(f"{f}:{mark.line + 1 if mark else 0}: YAML syntax error: "
                          f"{getattr(e, 'problem', None) or e}")
            continue
        if doc is not None:  # an empty or comment-only file adds no rules
            doc = chk.mapping(doc, "policy file", {"rules"}, 1)
            if "rules" in doc:
                rules += _check_rules(chk, doc["rules"], _key_line(doc, "rules", 1))
        errors += chk.errors
    _check_unique(rules, errors)
    if errors:
        raise PolicyError(errors)
    return PolicySet(tuple(rules), tuple(files))


def check_policy_dir(path: Path) -> list[str]:
    """Every problem in a policy directory, for `seekgate policy check`; empty when valid."""
    try:
        load_policy_dir(path)
    except PolicyError as e:
        return e.errors
    return []
