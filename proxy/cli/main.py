"""The `seekgate` command: up, serve, triton, keys, sessions, policy, audit, model, check-config."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from ..errors import SeekgateError
from ..keys.envelope import EnvelopeError
from ..keys.issue import TIER_DEFAULT, ExpiresIn, audited_views, issue_key, parse_duration, public_view
from ..keys.kek import KekError
from ..keys.secrets_setup import load_pepper_sync
from ..quotas import LIMIT_FIELDS
from ..settings import Settings, SettingsError, is_utf8
from ..store.backend import Store, open_secret_rows, open_store
from ..store.pages import each_key
from .bootstrap import bootstrap_admin, bootstrap_message, triton_launch, upstream_mismatch
from .common import DEFAULT_CONFIG, CliError, load
from .crypto import add_crypto_commands
from .db import add_db_commands
from .devcert import add_tls_commands

T = TypeVar("T")


def _out(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False, default=str))


# ---------------------------------------------------------------- shared plumbing

def with_store(settings: Settings, fn: Callable[[Store], Coroutine[Any, Any, T]]) -> T:
    """Run `fn(store)` on the server's key store, closing it afterwards."""
    async def go() -> T:
        store = await open_store(settings.store, Path(settings.data_dir))
        try:
            return await fn(store)
        finally:
            await store.close()
    return asyncio.run(go())


def audit_writable(settings: Settings) -> None:
    """Refuse a change before making it if its audit record could not be written (nothing half-done)."""
    from ..errors import AuditUnavailable
    from .audit import check_cli_audit
    try:
        check_cli_audit(settings)
    except AuditUnavailable as exc:
        raise CliError(f"refused, nothing changed: the audit log cannot be written: {exc}") from None


async def audit(settings: Settings, action: str, target: str | None, **fields: Any) -> None:
    """The audit record of a change just made; the command fails (exit 1) if it cannot be written."""
    from .audit import cli_record, write_cli_audit
    try:
        await write_cli_audit(settings, cli_record(action, target, **fields))
    except Exception as exc:
        raise CliError(f"{action} {target}: done, but its audit record could not be written: {exc}") from None


def parse_time(text: str, now: float) -> float:
    """"1h"-style durations mean that long ago; anything else is ISO-8601 (naive = UTC)."""
    try:
        seconds = parse_duration(text)
        if seconds is not None:
            return now - seconds
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"bad time {text!r}: use a duration like 1h or 7d, or ISO-8601", 2) from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def check_key_id(key_id: str) -> None:
    """An id that is not UTF-8 (a non-UTF-8 argument, kept as surrogates) names no key; asking the
    store for it failed to encode and was reported as 'store_unavailable', which sends one to the database."""
    if not is_utf8(key_id):
        raise CliError(f"key {key_id!r} not found")


# ---------------------------------------------------------------- commands

def cmd_check_config(args: argparse.Namespace) -> int:
    from ..steps.policy import check_policy_dir
    settings = load(args)
    print("config ok")
    errors = check_policy_dir(Path(settings.policy.directory))
    for line in errors:
        print(line, file=sys.stderr)
    return 2 if errors else 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    settings = load(args)
    labels: dict[str, str] = {}
    for item in args.label:
        k, sep, v = item.partition("=")
        if not sep:
            raise CliError(f"bad --label {item!r}: use key=value", 2)
        labels[k] = v
    try:
        expires: ExpiresIn = TIER_DEFAULT if args.expires is None else parse_duration(args.expires)
    except ValueError as exc:
        raise CliError(f"--expires: {exc}", 2) from None
    limits = {f: getattr(args, f) for f in LIMIT_FIELDS if getattr(args, f) is not None}
    pepper = load_pepper_sync(settings)
    audit_writable(settings)

    async def create(store: Store) -> tuple[Any, str]:
        now = time.time()
        rec, token = await issue_key(store, pepper, tier=args.tier, owner=args.name, roles=args.role,
                                     labels=labels, models=args.model, allowed_cidrs=args.cidr,
                                     parent_id=args.parent, expires_in_s=expires, limits=limits, now=now)
        await audit(settings, "keys.create", rec.key_id, before={}, after=audited_views([rec], now))
        return rec, token
    try:
        rec, token = with_store(settings, create)
    except ValueError as exc:
        raise CliError(str(exc), 2) from None
    if args.json:
        _out({"key_id": rec.key_id, "key": token, **public_view(rec)})
    else:
        view = public_view(rec)
        print(f"created {rec.tier} key {rec.key_id} for {rec.owner} "
              f"(roles: {', '.join(rec.roles) or '-'}; expires: {view['expires_at'] or 'never'})")
        print(token)
        print("store this key now: it is not shown again", file=sys.stderr)
    return 0


_LIST_HEADER = ("ID", "TIER", "OWNER", "ROLES", "STATUS", "EXPIRES", "PARENT")


def _list_row(view: dict[str, Any]) -> tuple[str, ...]:
    return (view["id"], view["tier"], view["owner"], ",".join(view["roles"]) or "-", view["status"],
            view["expires_at"] or "never", view["parent_id"] or "-")


async def _print_keys(store: Store, expiring: tuple[float, float] | None, as_json: bool, now: float) -> None:
    """Stream the listing page by page (store/pages.py): a fleet of a million keys never sits in memory.

    JSON is written as json.dumps would write {"keys": [...]}, one key at a time. The table's columns are
    as wide as their widest cell, so it reads the keys twice: once for the widths, once to print.
    """
    if as_json:
        sys.stdout.write('{"keys": [')
        sep = ""
        async for rec in each_key(store, expiring):
            sys.stdout.write(sep + json.dumps(public_view(rec, now), ensure_ascii=False, default=str))
            sep = ", "
        sys.stdout.write("]}\n")
        return
    widths = [len(c) for c in _LIST_HEADER]
    async for rec in each_key(store, expiring):
        widths = [max(w, len(c)) for w, c in zip(widths, _list_row(public_view(rec, now)), strict=True)]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
    print(line(_LIST_HEADER))
    async for rec in each_key(store, expiring):
        print(line(_list_row(public_view(rec, now))))


def cmd_keys_list(args: argparse.Namespace) -> int:
    expiring = None
    now = time.time()
    if args.expiring is not None:
        try:
            within = parse_duration(args.expiring)
        except ValueError as exc:
            raise CliError(f"--expiring: {exc}", 2) from None
        if within is None:
            raise CliError("--expiring: give a duration such as 72h", 2)
        expiring = (now, now + within)
    with_store(load(args), lambda s: _print_keys(s, expiring, args.json, now))
    return 0


def cmd_keys_show(args: argparse.Namespace) -> int:
    check_key_id(args.id)
    rec = with_store(load(args), lambda s: s.get_key(args.id))
    if rec is None:
        raise CliError(f"key {args.id!r} not found")
    view = public_view(rec)
    if args.json:
        _out(view)
    else:
        for k, v in view.items():
            print(f"{k}: {json.dumps(v) if isinstance(v, (list, dict)) else ('-' if v is None else v)}")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from ..keys.lifecycle import LifecycleError, Rotation, key_and_children, records_of, rotate_key
    try:
        grace = parse_duration(args.grace)
    except ValueError as exc:
        raise CliError(f"--grace: {exc}", 2) from None
    if grace is None:
        raise CliError("--grace: give a duration such as 24h, not never", 2)
    check_key_id(args.id)
    settings = load(args)
    pepper = load_pepper_sync(settings)
    audit_writable(settings)

    async def rotate(store: Store) -> Rotation:
        now = time.time()
        before = await key_and_children(store, args.id)
        rot = await rotate_key(store, pepper, args.id, grace, now=now)
        after = [rot.old, rot.new, *await records_of(store, rot.moved)]
        await audit(settings, "keys.rotate", args.id, detail=f"successor {rot.new.key_id}",
                    before=audited_views(before, now), after=audited_views(after, now))
        return rot
    try:
        rot = with_store(settings, rotate)
    except LifecycleError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        _out({"old": public_view(rot.old), "key_id": rot.new.key_id, "key": rot.token,
              **public_view(rot.new), "moved": list(rot.moved)})
    else:
        print(f"rotated {rot.old.key_id} -> {rot.new.key_id}; the old key works until "
              f"{public_view(rot.old)['expires_at']}")
        if rot.moved:
            print(f"moved {len(rot.moved)} device key(s) to {rot.new.key_id}: {', '.join(rot.moved)}")
        print(rot.token)
        print("store this key now: it is not shown again", file=sys.stderr)
    return 0


def cmd_keys_revoke_compromised(args: argparse.Namespace) -> int:
    from ..keys.lifecycle import Compromise, LifecycleError, compromise_key, records_of, subtree_records
    settings = load(args)
    pepper = load_pepper_sync(settings)
    audit_writable(settings)

    async def compromise(store: Store) -> Compromise:
        now = time.time()
        before = await subtree_records(store, args.id)
        done = await compromise_key(store, pepper, Path(settings.data_dir), args.id, now=now, actor="cli")
        after = [*await records_of(store, done.revoked), done.new]
        await audit(settings, "keys.revoke_compromised", args.id, detail=f"replacement {done.new.key_id}",
                    before=audited_views(before, now), after=audited_views(after, now))
        return done
    try:
        done = with_store(settings, compromise)
    except LifecycleError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        _out({"revoked": done.revoked,
              "replacement": {"key_id": done.new.key_id, "key": done.token, **public_view(done.new)},
              "report": done.report, "report_path": str(done.report_path)})
    else:
        print(f"revoked {len(done.revoked)} key(s): {', '.join(done.revoked)}")
        print(f"replacement {done.new.tier} key {done.new.key_id}:")
        print(done.token)
        print(f"report: {done.report_path} ({done.report['uses']} use(s) since creation)")
        print("store this key now: it is not shown again", file=sys.stderr)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    check_key_id(args.id)
    if args.compromised:
        return cmd_keys_revoke_compromised(args)
    from ..keys.lifecycle import records_of, subtree_records
    settings = load(args)
    audit_writable(settings)

    async def revoke(store: Store) -> int | None:
        if await store.get_key(args.id) is None:
            return None
        now = time.time()
        before = await subtree_records(store, args.id)
        n = await store.revoke_key(args.id, now)
        after = await records_of(store, (r.key_id for r in before))
        await audit(settings, "keys.revoke", args.id, before=audited_views(before, now),
                    after=audited_views(after, now))
        return n
    n = with_store(settings, revoke)
    if n is None:
        raise CliError(f"key {args.id!r} not found")
    if args.json:
        _out({"revoked": n})
        return 0
    print(f"revoked {n} key(s)" + (" (already revoked)" if n == 0 else ""))
    return 0


def cmd_sessions_revoke(args: argparse.Namespace) -> int:
    from ..keys.sessions import is_jti
    if not is_jti(args.jti):
        raise CliError(f"{args.jti!r} is not a session id (jti: 32 hex digits)")

    settings = load(args)
    audit_writable(settings)

    async def revoke(store: Store) -> bool:
        added = await (await open_secret_rows(store)).revoke_session(args.jti, time.time())
        await audit(settings, "sessions.revoke", args.jti, before={args.jti: {"revoked": not added}},
                    after={args.jti: {"revoked": True}})
        return added
    # No lookup first: session tokens are not stored, so any jti can be revoked ahead of its use.
    added = with_store(settings, revoke)
    print(f"revoked session {args.jti}" + ("" if added else " (already revoked)"))
    return 0


def cmd_policy_check(args: argparse.Namespace) -> int:
    from ..steps.policy import PolicyError, load_policy_dir
    directory = Path(args.dir) if args.dir else Path(load(args).policy.directory)
    try:
        policy = load_policy_dir(directory)
    except PolicyError as exc:
        for line in exc.errors:
            print(line)
        return 1
    print(f"policy ok: {len(policy.rules)} rules in {len(policy.files)} files")
    return 0


def cmd_audit_tail(args: argparse.Namespace) -> int:
    from ..audit.writer import tail_audit
    for rec in tail_audit(Path(load(args).data_dir), args.n):
        _out(rec)
    return 0


def cmd_audit_query(args: argparse.Namespace) -> int:
    from ..audit import pg_index
    from ..audit.writer import query_audit
    from ..store.backend import is_postgres
    for flag, text in (("--actor", args.actor), ("--key-id", args.key_id), ("--endpoint", args.endpoint)):
        if not is_utf8(text or ""):   # PostgreSQL could not encode it: a traceback
            raise CliError(f"bad {flag} {text!r}: not UTF-8", 2)
    settings, now = load(args), time.time()
    since = None if args.since is None else parse_time(args.since, now)
    until = None if args.until is None else parse_time(args.until, now)
    filters = dict(actor=args.actor, key_id=args.key_id, since=since, until=until, status=args.status,
                   limit=args.limit, protocol=args.protocol, endpoint=args.endpoint)
    if is_postgres(settings.store.url):   # the index every replica writes to, not this host's
        async def shared(store: Store) -> list[dict[str, Any]]:
            return await pg_index.query(pg_index.pool_of(store), **filters)
        recs = with_store(settings, shared)
    else:
        recs = asyncio.run(query_audit(Path(settings.data_dir), **filters))
    for rec in recs:
        _out(rec)
    return 0


def cmd_model_tiny(args: argparse.Namespace) -> int:
    from ..local.tinymodel import build_tiny_checkpoint
    try:
        path = build_tiny_checkpoint(Path(args.out), seed=args.seed)
    except OSError as exc:   # --out is a file, or not writable: one line, not a traceback
        raise CliError(f"model tiny: cannot write to {args.out}: {exc.strerror or exc}") from None
    print(path)
    return 0


def cmd_triton(args: argparse.Namespace) -> int:
    from ..local.triton import TritonLaunchError, run_foreground
    settings = load(args)
    try:
        return run_foreground(triton_launch(settings))
    except TritonLaunchError as exc:
        raise CliError(f"triton: {exc}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from ..frontend.workers import serve
    settings = load(args)
    if args.workers is not None:
        if args.workers < 1:
            raise CliError(f"--workers: must be 1 or more, got {args.workers}", 2)
        settings = dataclasses.replace(settings, server=dataclasses.replace(settings.server, workers=args.workers))
    if args.insecure_plaintext:
        settings = dataclasses.replace(settings, server=dataclasses.replace(settings.server, insecure_plaintext=True))
    serve(settings)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from ..frontend.workers import serve
    from ..local.triton import TritonLaunchError, TritonProcess
    settings = load(args)
    if (mismatch := upstream_mismatch(settings)) is not None:
        raise CliError(f"{mismatch}: the proxy would not reach the Triton it starts", 2)
    try:
        triton = TritonProcess(triton_launch(settings))
    except TritonLaunchError as exc:
        raise CliError(f"triton: {exc}") from None
    try:
        try:
            triton.start()
            triton.wait_ready()
        except TritonLaunchError as exc:
            raise CliError(f"triton: {exc}") from None
        print(f"triton ready at {triton.http_url} (log {triton.log_path})", flush=True)
        key = bootstrap_admin(settings)
        if key is not None:
            print(bootstrap_message(settings, key), flush=True)
        serve(settings)   # blocks until SIGINT/SIGTERM
    finally:
        triton.stop()
    return 0


# ---------------------------------------------------------------- parser

def count(text: str) -> int:
    """A record count, 0 or more: a negative -n or --limit printed nothing and exited 0, as if the log were empty."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    # Global options work before or after the command. The copy on each command defaults
    # to SUPPRESS so that, when unset there, it leaves the value given before the command;
    # it is a separate parser because argparse shares action objects with its children.
    def global_options(p: argparse.ArgumentParser, default: Any) -> argparse.ArgumentParser:
        p.add_argument("--config", default=default,
                       help=f"YAML config file (default: {DEFAULT_CONFIG} if it exists)")
        p.add_argument("--data-dir", default=default,
                       help="directory for keys, audit and checkpoints (overrides config and env)")
        return p
    common = global_options(argparse.ArgumentParser(add_help=False), argparse.SUPPRESS)
    parser = global_options(argparse.ArgumentParser(
        prog="seekgate", description="Auth proxy in front of Triton Inference Server."), None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(parent: Any, name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = parent.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=fn)
        return p

    cmd(sub, "check-config", cmd_check_config, "validate the configuration and the policy directory")
    cmd(sub, "up", cmd_up, "start Triton and the proxy together (first start prints an admin key)")
    p = cmd(sub, "serve", cmd_serve, "run the proxy in the foreground")
    p.add_argument("--workers", type=int, default=None,
                   help="server processes sharing the ports, limits exact across them (default: server.workers)")
    p.add_argument("--insecure-plaintext", action="store_true",
                   help="serve plaintext on a non-loopback address (server.insecure_plaintext); logged at each start")
    cmd(sub, "triton", cmd_triton, "run the local tritonserver in the foreground")
    add_crypto_commands(sub, cmd)
    add_tls_commands(sub, cmd)
    add_db_commands(sub, cmd)

    keys = sub.add_parser("keys", help="create, list, show and revoke API keys").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION")
    p = cmd(keys, "create", cmd_keys_create, "create a key; the key is printed once")
    p.add_argument("--tier", required=True, choices=("app", "device", "user"))
    p.add_argument("--name", help="owner: the person, app or device the key is for "
                                  "(default: a device key's parent's owner, else the new key's id)")
    p.add_argument("--role", action="append", default=[], help="role (repeatable)")
    p.add_argument("--label", action="append", default=[], help="label key=value (repeatable)")
    p.add_argument("--model", action="append", default=[], help="model the key may use (repeatable; none = any)")
    p.add_argument("--allow-ip", "--cidr", dest="cidr", action="append", default=[], metavar="CIDR",
                   help="client address or CIDR the key is bound to (repeatable; none = any)")
    p.add_argument("--parent", help="parent app key id (device keys)")
    p.add_argument("--expires", help="90d, 12h, 30m, 3600s or never (default: app 365d, user 90d, "
                                     "device its parent's)")
    for flag, what in (("rpm", "requests per minute"), ("tpm", "tokens (input + output) per minute"),
                       ("concurrency", "requests in flight at once"),
                       ("daily-tokens", "tokens per UTC day"), ("monthly-tokens", "tokens per UTC month")):
        p.add_argument(f"--{flag}", type=int, metavar="N",
                       help=f"{what} (0 = unlimited; default: the tier's default in config)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = cmd(keys, "list", cmd_keys_list, "list keys (never the secrets)")
    p.add_argument("--expiring", metavar="DURATION",
                   help="only active keys expiring within this long (e.g. 72h)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = cmd(keys, "show", cmd_keys_show, "show one key")
    p.add_argument("id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = cmd(keys, "revoke", cmd_keys_revoke, "revoke a key and every key under it")
    p.add_argument("id")
    p.add_argument("--compromised", action="store_true",
                   help="leak response: also issue a replacement (shown once) and write a usage "
                        "report under <data-dir>/reports/")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = cmd(keys, "rotate", cmd_keys_rotate,
            "issue a successor with the same scope; the old key works until the grace ends")
    p.add_argument("id")
    p.add_argument("--grace", required=True, help="how long the old key keeps working (e.g. 24h)")
    p.add_argument("--json", action="store_true", help="print JSON")

    sessions = sub.add_parser("sessions", help="session tokens").add_subparsers(
        dest="sessions_command", required=True, metavar="ACTION")
    p = cmd(sessions, "revoke", cmd_sessions_revoke, "revoke one session token by its jti")
    p.add_argument("jti")

    policy = sub.add_parser("policy", help="policy files").add_subparsers(
        dest="policy_command", required=True, metavar="ACTION")
    p = cmd(policy, "check", cmd_policy_check, "validate a policy directory")
    p.add_argument("dir", nargs="?", help="policy directory (default: policy.directory from config)")

    audit = sub.add_parser("audit", help="read the audit log").add_subparsers(
        dest="audit_command", required=True, metavar="ACTION")
    p = cmd(audit, "tail", cmd_audit_tail, "the last records, oldest first, as JSON lines")
    p.add_argument("-n", type=count, default=20, help="how many records (default 20)")
    p = cmd(audit, "query", cmd_audit_query, "matching records, newest first, as JSON lines")
    p.add_argument("--actor")
    p.add_argument("--key-id")
    p.add_argument("--since", help="1h, 7d, ... ago, or ISO-8601")
    p.add_argument("--until", help="1h, 7d, ... ago, or ISO-8601")
    p.add_argument("--status", choices=("allowed", "denied", "error"))
    p.add_argument("--protocol", choices=("http", "grpc", "openai"), help="the API used")
    p.add_argument("--endpoint", help="the OpenAI endpoint, e.g. /v1/chat/completions")
    p.add_argument("--limit", type=count, default=100)

    model = sub.add_parser("model", help="model checkpoints").add_subparsers(
        dest="model_command", required=True, metavar="ACTION")
    p = cmd(model, "tiny", cmd_model_tiny, "build the tiny random-weight DeepSeek checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SettingsError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"seekgate: {exc}", file=sys.stderr)
        return exc.code
    except (KekError, EnvelopeError) as exc:   # a missing or wrong root: refuse, in one line
        print(f"seekgate: {exc}", file=sys.stderr)
        return 1
    except SeekgateError as exc:   # e.g. the store could not be opened
        print(f"seekgate: {exc.reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`seekgate keys list | head`, the listing streams): stop without a traceback,
        # with the status a process killed by SIGPIPE has, and let the exit's flush write to nowhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
