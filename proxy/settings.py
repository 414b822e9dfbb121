"""Every setting declared once: frozen dataclasses loaded from YAML, then SEEKGATE_* env, then overrides."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from .quotas import LIMIT_FIELDS, parse_role_caps

SESSION_MAX_TTL_S = 900   # the design's 15 minutes; keys/sessions.py enforces it again on verify

MiB = 1024 * 1024
ENV_PREFIX = "SEEKGATE_"


def _help(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    return field(default=default, metadata={"help": text}, **kw)


@dataclass(frozen=True)
class ServerSettings:
    host: str = _help("Address the HTTP, gRPC and metrics listeners bind (loopback by default)", "127.0.0.1")
    http_port: int = _help("Port of the HTTP/REST front end (KServe v2 + admin API)", 8000)
    grpc_port: int = _help("Port of the gRPC front end (inference.GRPCInferenceService)", 8001)
    metrics_port: int = _help("Port serving Prometheus /metrics", 8002)
    base_path: str = _help("Path prefix stripped before routing, e.g. /triton ('' for none)", "")
    max_body_bytes: int = _help("Largest HTTP request body accepted (64 MiB)", 64 * MiB)
    grpc_max_message_bytes: int = _help("Largest gRPC message accepted or sent (64 MiB)", 64 * MiB)
    read_timeout_s: float = _help("Seconds to wait for a client to send its request body", 30.0)
    workers: int = _help("Server processes sharing the ports (SO_REUSEPORT); limits stay exact across them", 1)
    shutdown_delay_s: float = _help("On SIGTERM, seconds readiness answers 503 while requests are still "
                                    "taken, so load balancers move away first", 0.0)
    drain_timeout_s: float = _help("On SIGTERM, seconds in-flight requests and streams get to finish", 30.0)
    tls_cert_file: str = _help("PEM certificate (a chain allowed) of the HTTP, gRPC and metrics listeners; "
                               "'' = plaintext, allowed only on loopback unless insecure_plaintext", "")
    tls_key_file: str = _help("PEM private key of tls_cert_file", "")
    tls_client_ca_file: str = _help("PEM CA bundle: when set, every client must present a certificate it "
                                    "signed (mTLS); its identity is a policy attribute and in the audit", "")
    tls_min_version: str = _help("Lowest TLS version accepted: 1.3, or 1.2 (1.3 still preferred)", "1.3")
    tls_reload_interval_s: float = _help("Seconds between checks of the TLS files for a renewed certificate "
                                         "(a broken new file keeps the old one in force)", 2.0)
    hsts_max_age_s: int = _help("Over TLS that ends here, every API and console answer carries "
                                "Strict-Transport-Security with this max-age: browsers then refuse plain HTTP to "
                                "this hostname on every port for that long; 0 = off (never sent on plain HTTP)", 0)
    hsts_include_subdomains: bool = _help("Add includeSubDomains to Strict-Transport-Security (needs "
                                          "hsts_max_age_s): every subdomain is held to HTTPS too", False)
    insecure_plaintext: bool = _help("Serve plaintext on a non-loopback address (keys cross the network in "
                                     "clear); logged at every start", False)
    status_listen: str = _help("host:port of a separate plain-HTTP listener answering only GET /v2/health/ready "
                               "(as the API listener does) and /v2/health/live (this process's own, never "
                               "Triton's), with no client certificate (kubelet probes under mTLS), e.g. "
                               "0.0.0.0:8101 or [::]:8101; '' = off", "")


@dataclass(frozen=True)
class UpstreamSettings:
    http_url: str = _help("Triton HTTP endpoint requests are forwarded to", "http://127.0.0.1:18000")
    grpc_target: str = _help("Triton gRPC endpoint (host:port) requests are forwarded to", "127.0.0.1:18001")
    connect_timeout_s: float = _help("Seconds to wait for a connection to Triton", 2.0)
    request_timeout_s: float = _help("Seconds a forwarded request may take end to end, from sending it to the "
                                     "last byte of Triton's answer (streams included)", 300.0)
    idle_timeout_s: float = _help("Seconds Triton may go without sending a byte of its answer", 300.0)
    pool_size: int = _help("Most concurrent connections to Triton", 100)
    ca_file: str = _help("PEM CA bundle that verifies Triton's certificate (https:// http_url, grpc_tls); "
                         "'' = the system's trust store", "")
    grpc_tls: bool = _help("Reach grpc_target over TLS (a Triton not on loopback)", False)
    redact_errors: bool = _help("Replace the bodies of Triton's 5xx answers with a generic error (the audit "
                                "record keeps Triton's message); off: Triton's answers pass unchanged", False)


@dataclass(frozen=True)
class TritonSettings:
    model_repository: str = _help("Model repository the local tritonserver serves", "triton_models")
    checkpoint: str = _help("Hugging Face checkpoint dir for the model ('' builds a tiny one under data_dir)", "")
    http_port: int = _help("HTTP port of the local tritonserver (loopback only)", 18000)
    grpc_port: int = _help("gRPC port of the local tritonserver (loopback only)", 18001)
    metrics_port: int = _help("Metrics port of the local tritonserver (loopback only)", 18002)
    startup_timeout_s: float = _help("Seconds to wait for the local tritonserver to become ready", 120.0)


@dataclass(frozen=True)
class AuthSettings:
    key_cache_ttl_s: float = _help("Seconds a verified key or session token stays cached; a revocation still "
                                   "counts on the next request (the store revision is checked); 0 = no cache", 5.0)
    key_cache_size: int = _help("Most verified keys and session tokens cached (LRU); 0 = no cache", 10000)
    key_cache_revision_check_ms: float = _help(
        "Most milliseconds between reads of the store revision while the store's change signal is still "
        "(a backstop: every change reported done counts on the next request anyway). 0 = read it on "
        "every request", 1000.0)
    session_ttl_s: float = _help("Seconds a session token (POST /v1/sessions) lives; at most 900", 900.0)
    session_issuer: str = _help("The iss claim of session tokens; verification requires exactly this", "seekgate")
    session_audience: str = _help("The aud claim of session tokens; verification requires exactly this", "seekgate")
    expiry_warning_s: float = _help("Seconds before a key expires that one key_expiring audit event is written "
                                    "for it (72 h)", 72 * 3600.0)
    expiry_check_interval_s: float = _help("Seconds between checks for keys entering the expiry warning window",
                                           300.0)
    sign_in_failures_per_min: float = _help(
        "Failed sign-ins (bad or unknown credentials) a client address may make per minute once its burst is "
        "spent; past that, credentials not already verified are refused 429 before any store read. "
        "IPv6 is counted per /64; each process counts its own. 0 = no limit", 60.0)
    sign_in_failure_burst: int = _help("Failed sign-ins a client address may make at once before "
                                       "sign_in_failures_per_min applies", 100)
    sign_in_unlimited: str = _help(
        "Comma-separated addresses or CIDRs whose failed sign-ins are not limited: a proxy or TLS terminator in "
        "front of seekgate makes every client one address, which a guesser would then lock out for all",
        "127.0.0.0/8,::1")


@dataclass(frozen=True)
class PolicySettings:
    directory: str = _help("Directory of YAML policy files", "policies")
    reload_interval_s: float = _help("Seconds between checks of the policy files for changes", 0.5)


@dataclass(frozen=True)
class AuditSettings:
    max_bytes: int = _help("Size at which the audit JSONL file is rotated (100 MiB)", 100 * MiB)
    retention_days: int = _help("Days rotated audit files are kept", 180)
    queue_max: int = _help("Most audit records buffered in memory while waiting to be written", 100_000)
    queue_soft_max: int = _help("Audit records waiting above which a new request first waits (at most 1 s) for "
                                "the writer to catch up: backpressure instead of a growing backlog; 0 = never wait",
                                4096)
    durability: str = _help("batched: fsync at least every fsync_interval_s (a host crash loses at most "
                            "that window); strict: no response leaves before its record is fsynced "
                            "(group commit), and requests are refused with 503 while the log is unwritable",
                            "batched")
    fsync_interval_s: float = _help("Batched mode: longest time a written audit record waits for its fsync", 0.1)
    batch_linger_ms: float = _help("Batched mode: how long the writer waits after a record for more to write "
                                   "with it (fewer, larger writes; a kill -9 may lose this much more); "
                                   "at most fsync_interval_s. 0 = write each record at once", 20.0)


@dataclass(frozen=True)
class LimitsSettings:
    """Per-tier defaults for the limits a key does not set itself (`seekgate keys create --rpm ...`)."""

    app_rpm: int = _help("Requests per minute for app keys (a device key is also bound by its app key's limits); 0 = unlimited", 0)
    app_tpm: int = _help("Tokens (input + output) per minute for app keys; 0 = unlimited", 0)
    app_concurrency: int = _help("Requests in flight at once per app key; 0 = unlimited", 0)
    app_daily_tokens: int = _help("Tokens per UTC day per app key; 0 = unlimited", 0)
    app_monthly_tokens: int = _help("Tokens per UTC month per app key; 0 = unlimited", 0)
    device_rpm: int = _help("Requests per minute for device keys; 0 = unlimited", 0)
    device_tpm: int = _help("Tokens (input + output) per minute for device keys; 0 = unlimited", 0)
    device_concurrency: int = _help("Requests in flight at once per device key; 0 = unlimited", 0)
    device_daily_tokens: int = _help("Tokens per UTC day per device key; 0 = unlimited", 0)
    device_monthly_tokens: int = _help("Tokens per UTC month per device key; 0 = unlimited", 0)
    user_rpm: int = _help("Requests per minute for user keys; 0 = unlimited", 0)
    user_tpm: int = _help("Tokens (input + output) per minute for user keys; 0 = unlimited", 0)
    user_concurrency: int = _help("Requests in flight at once per user key; 0 = unlimited", 0)
    user_daily_tokens: int = _help("Tokens per UTC day per user key; 0 = unlimited", 0)
    user_monthly_tokens: int = _help("Tokens per UTC month per user key; 0 = unlimited", 0)
    max_tokens_by_role: str = _help("Cap on a request's max_tokens per role, e.g. 'user=512,guest=64' "
                                    "(the most generous of a key's capped roles applies; 0 = no cap)", "")
    default_estimate_tokens: int = _help("Tokens charged up front for an inference that names no max_tokens "
                                         "(corrected to the real count afterwards)", 16)
    on_backend_down: str = _help("With redis.url set and Redis unreachable: 'closed' = limited requests get 503 + "
                                 "Retry-After; 'local' = each replica enforces the limits alone (N replicas may "
                                 "admit N times the limit; seekgate_limits_local says so)", "closed")


@dataclass(frozen=True)
class BodySettings:
    """Which parameters a key without the admin role may set in an inference body (body_view.py reads them).

    Comma-separated names. Anything a request sets that is not listed is refused: 403 when listed in
    `admin_parameters`, else 400 naming it. Admins may set any parameter.
    """

    # triton_enable_empty_final_response: tritonclient's own switch (async_stream_infer's
    # enable_empty_final_response); it only adds an empty final response to a decoupled model's stream.
    request_parameters: str = _help("Request-level `parameters` (HTTP infer and gRPC) non-admins may set",
                                    "binary_data_output,triton_enable_empty_final_response")
    input_parameters: str = _help("Input tensors' `parameters` non-admins may set", "binary_data_size")
    output_parameters: str = _help("Output tensors' `parameters` non-admins may set", "binary_data,classification")
    generate_fields: str = _help("Fields of a generate / generate_stream body (top level or in its "
                                 "`parameters`) non-admins may set: the model's inputs and sampling parameters",
                                 "text_input,max_tokens,temperature,top_p,seed,stop,messages")
    admin_parameters: str = _help("Parameters reserved for admins (refused with 403): shared memory names "
                                  "another tenant's tensors; sequence, priority and timeout steer the server",
                                  "shared_memory_region,shared_memory_byte_size,shared_memory_offset,"
                                  "sequence_id,sequence_start,sequence_end,priority,timeout")


@dataclass(frozen=True)
class OpenAISettings:
    """The OpenAI-compatible API under /v1 (frontend/openai.py): what it maps onto Triton's models."""

    default_max_tokens: int = _help("max_tokens sent to the model when a /v1/completions request names none "
                                    "(OpenAI's 16), and for chat when chat_default_max_tokens is 0 and the model "
                                    "states no max_tokens_cap; held to the role cap and the budget left", 16)
    chat_default_max_tokens: int = _help("max_tokens sent to the model when a /v1/chat/completions request names "
                                         "none; 0: the model's own cap (its config's max_tokens_cap), as OpenAI "
                                         "and vLLM generate until the model stops. Held to the model's cap, the "
                                         "role cap and the token budget left, never refused for them", 0)
    stream_suffix: str = _help("A model's decoupled twin that streams run through: <model><suffix>, "
                               "hidden from /v1/models", "_stream")
    aliases: str = _help("Extra model ids for OpenAI clients, e.g. 'deepseek-chat=deepseek' or "
                         "'deepseek-ai/DeepSeek-V3=deepseek' (alias=Triton model)", "")
    # 0 by default: reading on holds a whole answer (and a stream's last chunk) until the model is
    # done or the wait ends, and lets it generate meanwhile; cancelling at once leaves unmetered only
    # what the model makes before the cancel lands (about one cancel poll, ~20 ms of decoding).
    count_wait_s: float = _help("After a stop sequence or a client leaving: seconds to read on for the model's "
                                "final token count (what is charged) before cancelling the rest; 0: cancel at once",
                                0.0)


@dataclass(frozen=True)
class ConsoleSettings:
    """The admin web console under /console/ (frontend/console/)."""

    cookie_secure: str = _help("When the console's session cookie is marked Secure: auto (when the request came "
                               "over TLS to seekgate itself), always (behind a TLS-terminating proxy that reaches "
                               "seekgate over plain HTTP)", "auto")


CONSOLE_COOKIE_SECURE = ("auto", "always")


@dataclass(frozen=True)
class CryptoSettings:
    """Envelope encryption of the recoverable secrets (keys/envelope.py) and the root (KEK) that wraps them."""

    provider: str = _help("Where the root key lives: file (<data_dir>/secrets/root.key), pkcs11 (an HSM) "
                          "or vault (HashiCorp Vault transit)", "file")
    root_key_file: str = _help("file: the root key ('' = <data_dir>/secrets/root.key); point every replica at "
                               "one mounted secret (mode 0600 or 0400); root rotations add root.<n>.key beside it",
                               "")
    dek_rotation_days: float = _help("Days between data-key rotations (old rows re-encrypted in the "
                                     "background); 0 = only on demand", 30.0)
    root_rotation_days: float = _help("Days between root rotations (data keys re-wrapped, data untouched); "
                                      "0 = only on demand", 90.0)
    jwt_retire_leeway_s: float = _help("Seconds a replaced session signing key keeps verifying beyond the "
                                       "session TTL, for clock skew and in-flight tokens", 60.0)
    refresh_interval_s: float = _help("Seconds between checks for rotations made by another process and for "
                                      "due scheduled rotations", 2.0)
    pkcs11_module: str = _help("pkcs11: path of the PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so", "")
    pkcs11_token_label: str = _help("pkcs11: label of the token holding the root", "seekgate")
    pkcs11_key_label: str = _help("pkcs11: label prefix of the root keys (a version is appended)",
                                  "seekgate-root")
    pkcs11_pin_env: str = _help("pkcs11: environment variable holding the user PIN (never put it in YAML)",
                                "SEEKGATE_PKCS11_PIN")
    vault_addr: str = _help("vault: address of the Vault server", "http://127.0.0.1:8200")
    vault_token_env: str = _help("vault: environment variable holding the Vault token", "VAULT_TOKEN")
    vault_mount: str = _help("vault: mount path of the transit secrets engine", "transit")
    vault_key: str = _help("vault: name of the transit key that wraps data keys", "seekgate")


@dataclass(frozen=True)
class StoreSettings:
    """Where keys, sessions and secrets live: SQLite under data_dir, or PostgreSQL shared by replicas."""

    url: str = _help("'' = SQLite in <data_dir>/seekgate.db; postgresql://user@host:port/db = one store shared "
                     "by every replica (asyncpg)", "")
    pool_size: int = _help("PostgreSQL: connections per process (plus one that listens for changes)", 10)
    auto_migrate: bool = _help("PostgreSQL: apply pending schema migrations at start (else run `seekgate db "
                               "migrate` first); leave off where operators roll schema changes out", False)
    timeout_s: float = _help("PostgreSQL: longest wait for a connection or a query before the store counts as "
                             "unavailable (503, fail closed)", 2.0)


# redis+cluster / rediss+cluster: Redis Cluster (state/redis_limiter.py), one node's address or several, the rest found.
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def redis_cluster_nodes(url: str) -> tuple[str, list[tuple[str, int]]] | None:
    """A Redis Cluster URL, `redis+cluster://[user:password@]host[:port][,host[:port]...][/0][?options]`
    (`rediss+cluster://` with TLS), as the first node's plain redis:// (rediss://) URL, whose credentials,
    TLS and options serve every node, and every node it names as (host, port), port 6379 unless given.
    Any one of them that answers is enough to find the cluster. None for any other URL; ValueError for a
    node with no host or a port that is not one."""
    scheme, sep, _ = url.partition("://")
    plain = CLUSTER_SCHEMES.get(scheme.lower()) if sep else None
    if plain is None:
        return None
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    names = [name.strip() for name in hosts.split(",")]
    nodes: list[tuple[str, int]] = []
    for name in names:
        node = urlsplit(f"//{name}")
        try:
            port = node.port or 6379
        except ValueError:
            raise ValueError(f"node {name!r}: the port is not a number from 0 to 65535") from None
        if not node.hostname:
            raise ValueError(f"node {name!r}: no host")
        nodes.append((node.hostname, port))
    first = urlunsplit((plain, f"{userinfo}{at}{names[0]}", parts.path, parts.query, parts.fragment))
    return first, nodes


@dataclass(frozen=True)
class RedisSettings:
    """Where replicas share rate limits and budgets (state/redis_limiter.py)."""

    url: str = _help("'' = limits counted in this process (one node); redis://host:port/db = counted in one "
                     "Redis shared by every replica, exact across them; redis+cluster://host:port[,host:port...] "
                     "(rediss+cluster:// with TLS) = the same on Redis Cluster, its keys under one hash tag", "")
    lease_s: float = _help("Lease of a concurrency slot: renewed while the request runs; a replica killed "
                           "mid-request frees its slots this long after", 30.0)
    timeout_s: float = _help("Longest wait for Redis before it counts as down (then limits.on_backend_down)", 0.5)
    pool_size: int = _help("Connections to Redis per process (admissions beyond it queue for one)", 32)
    key_prefix: str = _help("Prefix of every key the limiter writes", "seekgate:limits:")


@dataclass(frozen=True)
class Settings:
    data_dir: str = _help("Directory for the key store, audit log and built checkpoint", ".seekgate")
    server: ServerSettings = _help("The proxy's own listeners", default_factory=ServerSettings)
    upstream: UpstreamSettings = _help("How to reach Triton", default_factory=UpstreamSettings)
    triton: TritonSettings = _help("The local tritonserver `seekgate up` runs", default_factory=TritonSettings)
    auth: AuthSettings = _help("Authentication", default_factory=AuthSettings)
    policy: PolicySettings = _help("Authorization policies", default_factory=PolicySettings)
    audit: AuditSettings = _help("Audit log", default_factory=AuditSettings)
    limits: LimitsSettings = _help("Rate limits and token budgets (defaults per key tier)",
                                   default_factory=LimitsSettings)
    crypto: CryptoSettings = _help("Envelope encryption and key rotation", default_factory=CryptoSettings)
    body: BodySettings = _help("Parameters non-admin keys may set in an inference body",
                               default_factory=BodySettings)
    openai: OpenAISettings = _help("The OpenAI-compatible API under /v1", default_factory=OpenAISettings)
    console: ConsoleSettings = _help("The admin web console", default_factory=ConsoleSettings)
    store: StoreSettings = _help("The key store", default_factory=StoreSettings)
    redis: RedisSettings = _help("Shared rate limits (several replicas)", default_factory=RedisSettings)


class SettingsError(ValueError):
    """Every problem found in the configuration, each naming its field path."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("invalid settings:\n  " + "\n  ".join(errors))
        self.errors = errors


def _types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_SECTIONS: dict[str, type] = {n: t for n, t in _types(Settings).items() if isinstance(t, type) and dataclasses.is_dataclass(t)}
_KIND_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def parse_env_value(raw: str, kind: type) -> Any:
    """Coerce an environment string to `kind` (int, float, bool or str); ValueError if it can't."""
    if kind is str:
        return raw
    try:
        return _BOOLS[raw.strip().lower()] if kind is bool else kind(raw.strip())
    except (KeyError, ValueError):
        raise ValueError(f"must be {_KIND_NAMES[kind]}, got {raw!r}") from None


def is_utf8(text: str) -> bool:
    """Whether `text` encodes as UTF-8: a non-UTF-8 byte in an argument or env var arrives as a surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _type_error(value: Any, kind: type) -> str | None:
    """YAML values are typed already: check, don't coerce (except int -> float)."""
    allowed = (int, float) if kind is float else kind
    if isinstance(value, allowed) and (kind is bool or not isinstance(value, bool)):
        return None
    return f"must be {_KIND_NAMES[kind]}, got {type(value).__name__} {value!r}"


def _read_yaml(path: Path | None, errors: list[str]) -> dict[str, Any]:
    if path is None or not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:   # not UTF-8 is bad input too, not a crash
        errors.append(f"{path}: cannot read: {exc}")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        errors.append(f"{path}: must be a mapping of sections, got {type(data).__name__}")
        return {}
    return data


def _env_layer(env: Mapping[str, str], errors: list[str]) -> dict[str, Any]:
    """SEEKGATE_<SECTION>_<FIELD> (or SEEKGATE_<FIELD> at top level), coerced to the field's type."""
    layer: dict[str, Any] = {}
    for var, raw in env.items():
        rest = var[len(ENV_PREFIX):].lower() if var.startswith(ENV_PREFIX) else None
        if rest is None:
            continue
        section = next((s for s in _SECTIONS if rest.startswith(s + "_")), "")
        if not section and rest not in _types(Settings):
            continue  # other SEEKGATE_* variables (CLI credentials, ...) are not settings
        name = rest[len(section) + 1:] if section else rest
        kind = _types(_SECTIONS[section] if section else Settings).get(name)
        path = f"{section}.{name}" if section else name
        if kind is None:
            errors.append(f"{path} (from {var}): unknown setting")
            continue
        try:
            (layer.setdefault(section, {}) if section else layer)[name] = parse_env_value(raw, kind)
        except ValueError as exc:
            errors.append(f"{path} (from {var}): {exc}")
    return layer


def _expand_dotted(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Accept {"server.http_port": 1} as well as {"server": {"http_port": 1}}."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        out = _merge(out, {section: {name: value}} if name else {key: value})
    return out


def _merge(base: dict[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _build(cls: type, raw: Mapping[str, Any], errors: list[str], prefix: str = "") -> Any:
    """Instantiate `cls` from raw values, recording (not raising) every unknown key and bad type."""
    hints = _types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        path, kind = f"{prefix}{key}", hints.get(key)
        if kind is None:
            errors.append(f"{path}: unknown setting")
        elif isinstance(kind, type) and dataclasses.is_dataclass(kind):
            if value is None:  # a section whose keys are all commented out
                continue
            if not isinstance(value, Mapping):
                errors.append(f"{path}: must be a mapping, got {type(value).__name__}")
                continue
            kwargs[key] = _build(kind, value, errors, f"{path}.")
        elif (problem := _type_error(value, kind)) is not None:
            errors.append(f"{path}: {problem}")
        else:
            kwargs[key] = float(value) if kind is float else value
    return cls(**kwargs)


_PORTS = ("server.http_port", "server.grpc_port", "server.metrics_port",
          "triton.http_port", "triton.grpc_port", "triton.metrics_port")
_POSITIVE = ("server.max_body_bytes", "server.grpc_max_message_bytes", "server.read_timeout_s",
             "server.workers", "server.drain_timeout_s", "server.tls_reload_interval_s",
             "upstream.connect_timeout_s", "upstream.request_timeout_s", "upstream.idle_timeout_s", "upstream.pool_size",
             "triton.startup_timeout_s", "policy.reload_interval_s", "openai.default_max_tokens",
             "auth.expiry_warning_s", "auth.expiry_check_interval_s", "auth.sign_in_failure_burst", "audit.max_bytes",
             "audit.retention_days", "audit.queue_max", "audit.fsync_interval_s", "store.pool_size", "store.timeout_s",
             "redis.pool_size")
_NON_NEGATIVE = ("server.shutdown_delay_s", "server.hsts_max_age_s",
                 "auth.key_cache_ttl_s", "auth.key_cache_size", "auth.key_cache_revision_check_ms",
                 "auth.sign_in_failures_per_min", "audit.batch_linger_ms", "audit.queue_soft_max",
                 "limits.default_estimate_tokens", "openai.count_wait_s",
                 "openai.chat_default_max_tokens",
                 *(f"limits.{t}_{f}" for t in ("app", "device", "user") for f in LIMIT_FIELDS))
_NON_EMPTY = ("data_dir", "server.host", "triton.model_repository", "policy.directory",
              "auth.session_issuer", "auth.session_audience")
AUDIT_DURABILITY = ("batched", "strict")
GRPC_LENGTH_MAX = 2**31 - 1  # grpc's max message length option is a C int
_BASE_PATH_RE = re.compile(r"(/[A-Za-z0-9_~.-]+)*")


def _get(settings: Settings, path: str) -> Any:
    value: Any = settings
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _check_url(path: str, url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{path}: must be an http:// or https:// URL, got {url!r}"
    return None


def status_address(s: ServerSettings) -> tuple[str, int] | None:
    """`server.status_listen` as (host, port), an IPv6 host without its brackets; None if off.

    Raises ValueError, saying what is wrong, for anything but host:port with a port of 1-65535.
    """
    if not s.status_listen:
        return None
    host, colon, port = s.status_listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 address goes in brackets, like [::]:8101")
    if not colon or not host or any(c.isspace() for c in host) or not (port.isascii() and port.isdigit()):
        raise ValueError("must be host:port, like 0.0.0.0:8101 or [::]:8101")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"the port must be 1-65535, got {port}")
    return host, int(port)


def validate(settings: Settings) -> list[str]:
    """Every problem with `settings`, each as 'field.path: what is wrong'; [] if none."""
    errors: list[str] = []
    for path in _PORTS:
        port = _get(settings, path)
        if not 1 <= port <= 65535:
            errors.append(f"{path}: must be 1-65535, got {port}")
    ports = [(path, _get(settings, path)) for path in _PORTS]
    try:
        if (status := status_address(settings.server)) is not None:
            ports.append(("server.status_listen", status[1]))
    except ValueError as exc:
        errors.append(f"server.status_listen: {exc}, got {settings.server.status_listen!r}")
    # Everything binds on this host, so any shared port fails at start-up.
    seen: dict[int, str] = {}
    for path, port in ports:
        if port in seen:
            errors.append(f"{path}: port {port} clashes with {seen[port]}")
        seen.setdefault(port, path)
    for path in _POSITIVE + _NON_NEGATIVE:
        value, strict = _get(settings, path), path in _POSITIVE
        if not (math.isfinite(value) and (value > 0 if strict else value >= 0)):
            errors.append(f"{path}: must be {'greater than 0' if strict else '0 or more'}, got {value}")
    for path in _NON_EMPTY:
        if not _get(settings, path).strip():
            errors.append(f"{path}: must not be empty")
    if settings.server.grpc_max_message_bytes > GRPC_LENGTH_MAX:
        errors.append(f"server.grpc_max_message_bytes: must be at most {GRPC_LENGTH_MAX}, "
                      f"got {settings.server.grpc_max_message_bytes}")
    base = settings.server.base_path
    if _BASE_PATH_RE.fullmatch(base) is None or any(s in (".", "..") for s in base.split("/")):
        errors.append(f"server.base_path: must be '' or like /prefix (no trailing slash), got {base!r}")
    for path in ("upstream.http_url",):
        problem = _check_url(path, _get(settings, path))
        if problem:
            errors.append(problem)
    if settings.console.cookie_secure not in CONSOLE_COOKIE_SECURE:
        errors.append(f"console.cookie_secure: must be one of {', '.join(CONSOLE_COOKIE_SECURE)}, "
                      f"got {settings.console.cookie_secure!r}")
    if settings.audit.durability not in AUDIT_DURABILITY:
        errors.append(f"audit.durability: must be one of {', '.join(AUDIT_DURABILITY)}, "
                      f"got {settings.audit.durability!r}")
    target = settings.upstream.grpc_target
    if ":" not in target or any(c.isspace() for c in target) or target.startswith(("http:", "https:")):
        errors.append(f"upstream.grpc_target: must be a gRPC target like host:port, got {target!r}")
    ttl = settings.auth.session_ttl_s
    if not (math.isfinite(ttl) and 1 <= ttl <= SESSION_MAX_TTL_S):
        errors.append(f"auth.session_ttl_s: must be 1-{SESSION_MAX_TTL_S} seconds, got {ttl}")
    errors += _validate_crypto(settings.crypto)
    errors += _validate_tls(settings.server)
    if not settings.store.url.isascii() and not is_utf8(settings.store.url):
        # A non-UTF-8 byte (an env var, kept as surrogates) crashed asyncpg's connect with a traceback;
        # the URL itself is not echoed, it may hold a password.
        errors.append("store.url: is not UTF-8")
    elif settings.store.url and urlsplit(settings.store.url).scheme not in STORE_SCHEMES:
        errors.append(f"store.url: must be empty (SQLite) or a postgresql:// URL, got scheme "
                      f"{urlsplit(settings.store.url).scheme!r}")
    if settings.limits.on_backend_down not in ("closed", "local"):
        errors.append(f"limits.on_backend_down: must be closed or local, got {settings.limits.on_backend_down!r}")
    if settings.redis.url and urlsplit(settings.redis.url).scheme not in REDIS_SCHEMES:
        errors.append(f"redis.url: must be empty or a redis://, rediss://, unix:// or (Redis Cluster) "
                      f"redis+cluster://, rediss+cluster:// URL, got scheme {urlsplit(settings.redis.url).scheme!r}")
    elif urlsplit(settings.redis.url).scheme.endswith("+cluster") and urlsplit(settings.redis.url).path not in ("", "/", "/0"):
        errors.append(f"redis.url: Redis Cluster has database 0 only, got {urlsplit(settings.redis.url).path!r}")
    else:
        try:
            redis_cluster_nodes(settings.redis.url)
        except ValueError as exc:   # the node, not the URL: that may hold a password
            errors.append(f"redis.url: {exc}")
    if not (math.isfinite(settings.redis.lease_s) and settings.redis.lease_s >= 1):
        errors.append(f"redis.lease_s: must be at least 1 second, got {settings.redis.lease_s}")
    if not (math.isfinite(settings.redis.timeout_s) and settings.redis.timeout_s > 0):
        errors.append(f"redis.timeout_s: must be more than 0, got {settings.redis.timeout_s}")
    try:
        parse_role_caps(settings.limits.max_tokens_by_role)
    except ValueError as exc:
        errors.append(f"limits.max_tokens_by_role: {exc}")
    for f in dataclasses.fields(BodySettings):
        bad = [n for n in getattr(settings.body, f.name).split(",") if not _PARAMETER_RE.fullmatch(n.strip())]
        if bad and getattr(settings.body, f.name).strip():
            errors.append(f"body.{f.name}: must be comma-separated parameter names, got {bad[0]!r}")
    try:
        parse_aliases(settings.openai.aliases)
    except ValueError as exc:
        errors.append(f"openai.aliases: {exc}")
    try:
        parse_networks(settings.auth.sign_in_unlimited)
    except ValueError as exc:
        errors.append(f"auth.sign_in_unlimited: {exc}")
    return errors


def parse_aliases(text: str) -> dict[str, str]:
    """'alias=model,...' as {alias: model}; ValueError naming the first bad entry."""
    out: dict[str, str] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        alias, eq, model = (p.strip() for p in item.partition("="))
        if not eq or not _ALIAS_RE.fullmatch(alias) or not _PARAMETER_RE.fullmatch(model):
            raise ValueError(f"must be comma-separated alias=model pairs, got {item!r}")
        out[alias] = model
    return out


def parse_networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """'10.0.0.0/8, ::1' as networks (an address is its own /32 or /128); ValueError naming the first bad entry."""
    out = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"must be comma-separated addresses or CIDRs, got {item!r}") from None
    return tuple(out)


_PARAMETER_RE = re.compile(r"[A-Za-z0-9_.\-]+")
# An alias may be a Hugging Face-style id (organisation/name), as vLLM serves and OpenAI clients are
# configured with; the model it names is a Triton model, whose name is a directory's (no "/").
_ALIAS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?")


KEK_PROVIDERS = ("file", "pkcs11", "vault")
TLS_VERSIONS = ("1.2", "1.3")


def _validate_tls(s: ServerSettings) -> list[str]:
    errors = []
    if bool(s.tls_cert_file) != bool(s.tls_key_file):
        errors.append("server.tls_cert_file, server.tls_key_file: set both or neither")
    if s.tls_client_ca_file and not s.tls_cert_file:
        errors.append("server.tls_client_ca_file: needs server.tls_cert_file (mTLS is TLS first)")
    if s.tls_min_version not in TLS_VERSIONS:
        errors.append(f"server.tls_min_version: must be one of {', '.join(TLS_VERSIONS)}, got {s.tls_min_version!r}")
    # HSTS is sent only over TLS that ends here: set without it, it would silently do nothing (a TLS-terminating
    # proxy in front sends its own).
    if s.hsts_max_age_s > 0 and not s.tls_cert_file:
        errors.append("server.hsts_max_age_s: needs server.tls_cert_file (Strict-Transport-Security is sent only "
                      "over TLS that ends here; a TLS-terminating proxy in front sends its own)")
    if s.hsts_include_subdomains and not s.hsts_max_age_s > 0:
        errors.append("server.hsts_include_subdomains: needs server.hsts_max_age_s greater than 0")
    return errors


def strict_transport_security(s: ServerSettings) -> str:
    """The Strict-Transport-Security value `s` asks for (RFC 6797), or '' when HSTS is off."""
    if not s.hsts_max_age_s > 0:
        return ""
    return f"max-age={s.hsts_max_age_s}" + ("; includeSubDomains" if s.hsts_include_subdomains else "")
STORE_SCHEMES = ("postgresql", "postgres")


def _validate_crypto(c: CryptoSettings) -> list[str]:
    errors = []
    if c.provider not in KEK_PROVIDERS:
        errors.append(f"crypto.provider: must be one of {', '.join(KEK_PROVIDERS)}, got {c.provider!r}")
    for name in ("dek_rotation_days", "root_rotation_days", "jwt_retire_leeway_s"):
        value = getattr(c, name)
        if not (math.isfinite(value) and value >= 0):
            errors.append(f"crypto.{name}: must be 0 or more, got {value}")
    if not (math.isfinite(c.refresh_interval_s) and c.refresh_interval_s > 0):
        errors.append(f"crypto.refresh_interval_s: must be greater than 0, got {c.refresh_interval_s}")
    if c.provider == "pkcs11":
        for name in ("pkcs11_module", "pkcs11_token_label", "pkcs11_key_label", "pkcs11_pin_env"):
            if not getattr(c, name).strip():
                errors.append(f"crypto.{name}: must not be empty with provider pkcs11")
    if c.provider == "vault":
        problem = _check_url("crypto.vault_addr", c.vault_addr)
        if problem:
            errors.append(problem)
        for name in ("vault_token_env", "vault_mount", "vault_key"):
            if not getattr(c, name).strip():
                errors.append(f"crypto.{name}: must not be empty with provider vault")
    return errors


def load_settings(path: Path | None, env: Mapping[str, str] = os.environ,
                  overrides: Mapping[str, Any] | None = None) -> Settings:
    """Defaults <- YAML file (a missing file means defaults) <- SEEKGATE_* env <- overrides.

    Raises SettingsError listing every problem at once.
    """
    errors: list[str] = []
    raw = _read_yaml(path, errors)
    raw = _merge(raw, _env_layer(env, errors))
    raw = _merge(raw, _expand_dotted(overrides or {}))
    # Fields with a bad type or value keep their default, so validation still
    # runs and the operator sees every problem in one go.
    settings = _build(Settings, raw, errors)
    errors += validate(settings)
    if errors:
        raise SettingsError(errors)
    return settings


def _walk() -> list[tuple[str, str, dataclasses.Field[Any], Any]]:
    """(section, path, field, default) for every scalar setting, in declaration order."""
    rows = []
    defaults = Settings()
    for f in dataclasses.fields(Settings):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            rows += [(f.name, f"{f.name}.{g.name}", g, getattr(value, g.name))
                     for g in dataclasses.fields(value)]
        else:
            rows.append(("", f.name, f, value))
    return rows


def env_var(path: str) -> str:
    """The environment variable that overrides a setting: server.http_port -> SEEKGATE_SERVER_HTTP_PORT."""
    return ENV_PREFIX + path.replace(".", "_").upper()


def format_settings_help() -> str:
    """Every setting with its default, environment variable and help, for docs and --help."""
    lines = []
    for _section, path, f, default in _walk():
        lines.append(f"{path} = {default!r}  [{env_var(path)}]")
        lines.append(f"    {f.metadata['help']}")
    return "\n".join(lines) + "\n"


def format_settings_yaml() -> str:
    """A YAML file listing every setting at its default, each with its help as a comment."""
    lines = ["# seekgate configuration: every setting at its default.",
             "# Override any of them with SEEKGATE_<SECTION>_<FIELD> (e.g. SEEKGATE_SERVER_HTTP_PORT).",
             ""]
    current = None
    section_help = {f.name: f.metadata["help"] for f in dataclasses.fields(Settings)}
    for section, _path, f, default in _walk():
        if section != current and section:
            lines += ["", f"# {section_help[section]}", f"{section}:"]
        current = section
        indent = "  " if section else ""
        lines.append(f"{indent}# {f.metadata['help']}")
        lines.append(f"{indent}{f.name}: {yaml.safe_dump(default, default_style=None).splitlines()[0]}")
    return "\n".join(lines) + "\n"
