"""Classify a Triton route (HTTP path or gRPC method) into the (resource, action) policies see."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

from proxy.context import Resource
from proxy.errors import BadRequest, MethodNotAllowed, NotFound
from proxy.upstream.grpc_forward import GRPC_SERVICE

MAX_PATH_LENGTH = 2048

# Names must be safe to use verbatim in a policy, an audit record and Triton's
# own URL; anything else is refused rather than escaped.
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_VERSION_RE = re.compile(r"[0-9]{1,19}")
# RFC 3986 pchar plus "/", minus "%" (every escape is refused, see _check_raw_path).
_PATH_CHARS_RE = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")
_PERCENT_RE = re.compile(r"%([0-9A-Fa-f]{2})")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

# Escapes that smuggle path structure get their own reason, for the audit log.
_ESCAPE_REASONS: dict[str, str] = {
    "2e": "encoded dot in path",
    "2f": "encoded slash in path",
    "5c": "encoded backslash in path",
    "00": "encoded NUL in path",
}

_HEALTH = Resource("server", "health", public=True)
_SERVER_READ = Resource("server", "read")
_STATISTICS = Resource("statistics", "admin")
_REPOSITORY = Resource("repository", "admin")
_SHARED_MEMORY = Resource("sharedmemory", "admin")
_TRACE = Resource("trace", "admin")
_LOGGING = Resource("logging", "admin")
_ADMIN_KEYS = Resource("admin:keys", "admin")
_ADMIN_CRYPTO = Resource("admin:crypto", "admin")
_SESSIONS = Resource("sessions", "create")
# The console's reads (admin/audit.py, admin/policies.py) and its sign-in: resources of their own, so a
# policy can let an auditor read the audit log without letting them touch keys.
_ADMIN_AUDIT = Resource("admin:audit", "read")
_ADMIN_POLICIES = Resource("admin:policies", "read")
_CONSOLE = Resource("console", "read")
_AUDIT_READS = frozenset({"audit", "usage", "overview"})

_GET = frozenset({"GET"})
_POST = frozenset({"POST"})
_GET_POST = frozenset({"GET", "POST"})

# Tail of /v2/models/<m>[/versions/<v>]/...: allowed methods, action, stream flag.
_MODEL_TAILS: dict[tuple[str, ...], tuple[frozenset[str], str, bool]] = {
    (): (_GET, "read", False),
    ("ready",): (_GET, "read", False),
    ("config",): (_GET, "read", False),
    ("stats",): (_GET, "read", False),
    ("infer",): (_POST, "infer", False),
    ("generate",): (_POST, "infer", False),
    ("generate_stream",): (_POST, "infer", True),
}
# /admin/v1/crypto/<operation> (admin/crypto.py): the method each one takes.
CRYPTO_OPS: dict[str, frozenset[str]] = {
    "status": _GET, "rotate-dek": _POST, "rotate-root": _POST, "rotate-jwt": _POST, "rotate-pepper": _POST,
}
_SHM_OPS: dict[str, frozenset[str]] = {
    "status": _GET, "register": _POST, "unregister": _POST,
}


def _not_found(method: str, what: str) -> NotFound:
    return NotFound(f"no route: {method} {what}")


def _check_name(value: str, kind: str) -> str:
    if _NAME_RE.fullmatch(value) is None or value in (".", ".."):
        raise BadRequest(f"invalid {kind} name")
    return value


def _check_raw_path(raw_path: str) -> tuple[str, ...]:
    """Refuse every path trick, then split into segments (all non-empty, none a dot)."""
    if not raw_path.startswith("/"):
        raise BadRequest("path must start with /")
    if len(raw_path) > MAX_PATH_LENGTH:
        raise BadRequest("path too long")
    if not raw_path.isascii():
        raise BadRequest("non-ASCII character in path")
    if _CONTROL_RE.search(raw_path) is not None:
        raise BadRequest("control character in path")
    if "\\" in raw_path:
        raise BadRequest("backslash in path")
    if "%" in raw_path:
        # Triton matches the raw path while other hops may decode it, so no
        # escape is ever meaningful here: refuse them all, not only the known ones.
        codes = (code.lower() for code in _PERCENT_RE.findall(raw_path))
        reason = next((_ESCAPE_REASONS[c] for c in codes if c in _ESCAPE_REASONS), None)
        raise BadRequest(reason or "percent-encoding in path")
    if _PATH_CHARS_RE.fullmatch(raw_path) is None:
        raise BadRequest("invalid character in path")
    if "//" in raw_path:
        raise BadRequest("empty path segment")
    if len(raw_path) > 1 and raw_path.endswith("/"):
        raise BadRequest("trailing slash in path")
    segments = tuple(raw_path[1:].split("/"))
    if segments == ("",):
        return ()
    if any(s in (".", "..") for s in segments):
        raise BadRequest("dot segment in path")
    return segments


def _require(method: str, allowed: frozenset[str], resource: Resource, path: str) -> Resource:
    if method not in allowed:
        raise _not_found(method, path)
    return resource


def _require_triton(method: str, allowed: frozenset[str], resource: Resource, path: str) -> Resource:
    """A route of Triton's own: a method it does not take there is its 405, as Triton itself answers."""
    if method not in allowed:
        raise MethodNotAllowed(f"method not allowed: {method} {path}", allowed)
    return resource


def _classify_model(method: str, rest: tuple[str, ...], path: str) -> Resource:
    """rest = (<m>, [versions, <v>,] tail...)."""
    model = _check_name(rest[0], "model")
    tail = rest[1:]
    if len(tail) >= 2 and tail[0] == "versions":
        if _VERSION_RE.fullmatch(tail[1]) is None:
            raise BadRequest("invalid model version")
        tail = tail[2:]
    if tail == ("trace", "setting"):
        return _require_triton(method, _GET_POST, Resource("trace", "admin", model=model), path)
    spec = _MODEL_TAILS.get(tail)
    if spec is None:
        raise _not_found(method, path)
    methods, action, stream = spec
    return _require_triton(method, methods, Resource(f"model:{model}", action, model=model, stream=stream), path)


def _classify_repository(method: str, rest: tuple[str, ...], path: str) -> Resource:
    """rest after /v2/repository: [<repo>/]index or [<repo>/]models/<m>/load|unload."""
    if len(rest) in (1, 3):
        body = rest
    elif len(rest) in (2, 4):
        _check_name(rest[0], "repository")
        body = rest[1:]
    else:
        raise _not_found(method, path)
    if body == ("index",):
        return _require_triton(method, _POST, _REPOSITORY, path)
    if len(body) == 3 and body[0] == "models" and body[2] in ("load", "unload"):
        model = _check_name(body[1], "model")
        return _require_triton(method, _POST, Resource("repository", "admin", model=model), path)
    raise _not_found(method, path)


def _classify_shared_memory(method: str, rest: tuple[str, ...], path: str) -> Resource:
    """rest after /v2/{system,cuda}sharedmemory: [region/<r>/]status|register|unregister."""
    if len(rest) == 3 and rest[0] == "region":
        _check_name(rest[1], "region")
        rest = rest[2:]
    if len(rest) == 1 and rest[0] in _SHM_OPS:
        return _require_triton(method, _SHM_OPS[rest[0]], _SHARED_MEMORY, path)
    raise _not_found(method, path)


def _classify_v2(method: str, rest: tuple[str, ...], path: str) -> Resource:
    if not rest:
        return _require_triton(method, _GET, _SERVER_READ, path)
    head = rest[0]
    if head == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
        return _require_triton(method, _GET, _HEALTH, path)
    if head == "models" and len(rest) >= 2:
        # Triton checks the exact server-wide path before its per-model regex.
        if rest[1:] == ("stats",):
            return _require_triton(method, _GET, _STATISTICS, path)
        return _classify_model(method, rest[1:], path)
    if head == "repository":
        return _classify_repository(method, rest[1:], path)
    if head in ("systemsharedmemory", "cudasharedmemory"):
        return _classify_shared_memory(method, rest[1:], path)
    if rest == ("trace", "setting"):
        return _require_triton(method, _GET_POST, _TRACE, path)
    if rest == ("logging",):
        return _require_triton(method, _GET_POST, _LOGGING, path)
    raise _not_found(method, path)


@lru_cache(maxsize=4096)   # a pure function of its arguments; refusals raise and are never cached
def classify_http(method: str, raw_path: str) -> Resource:
    """Map an HTTP request to the Resource policies judge.

    `raw_path` is the path as sent on the wire (not percent-decoded), without the
    query string and without any configured base path. `method` is compared
    case-sensitively, as Triton does. Raises BadRequest for any path trick,
    NotFound for a route Triton does not serve and MethodNotAllowed for a method
    one of Triton's routes does not take (seekgate's own routes: NotFound).
    """
    segments = _check_raw_path(raw_path)
    if not segments:
        raise _not_found(method, raw_path)
    if segments[0] == "v2":
        return _classify_v2(method, segments[1:], raw_path)
    if segments[:3] in (("admin", "v1", "keys"), ("admin", "v1", "sessions")):
        return _ADMIN_KEYS   # revoking a session is key administration: the same resource, the same rules
    if segments[:3] == ("admin", "v1", "crypto") and len(segments) == 4 and segments[3] in CRYPTO_OPS:
        return _require(method, CRYPTO_OPS[segments[3]], _ADMIN_CRYPTO, raw_path)
    if segments == ("v1", "sessions"):
        return _require(method, _POST, _SESSIONS, raw_path)
    if segments[:2] == ("admin", "v1") and len(segments) >= 3 and segments[2] in _AUDIT_READS:
        if len(segments) > (4 if segments[2] == "audit" else 3):
            raise _not_found(method, raw_path)
        return _require(method, _GET, _ADMIN_AUDIT, raw_path)
    if segments[:3] == ("admin", "v1", "policies") and len(segments) <= 4:
        if len(segments) == 4 and segments[3] != "evaluate":
            raise _not_found(method, raw_path)
        # Evaluating a question changes nothing: a read, though it takes a body (POST).
        return _require(method, _POST if len(segments) == 4 else _GET, _ADMIN_POLICIES, raw_path)
    if segments == ("console", "session"):
        return _require(method, _POST, _CONSOLE, raw_path)   # the sign-in: may this key use the console?
    raise _not_found(method, raw_path)


def _grpc_model(action: str, stream: bool = False) -> Callable[[str], Resource]:
    def classify(model_name: str) -> Resource:
        if not model_name:
            raise BadRequest("model name required")
        model = _check_name(model_name, "model")
        return Resource(f"model:{model}", action, model=model, stream=stream)
    return classify


def _grpc_model_statistics(model_name: str) -> Resource:
    # An empty name asks Triton for every model's statistics: an admin view.
    if not model_name:
        return _STATISTICS
    model = _check_name(model_name, "model")
    return Resource(f"model:{model}", "read", model=model)


def _grpc_optional_model(base: Resource) -> Callable[[str], Resource]:
    def classify(model_name: str) -> Resource:
        if not model_name:
            return base
        return Resource(base.resource, base.action, model=_check_name(model_name, "model"))
    return classify


def _grpc_fixed(resource: Resource) -> Callable[[str], Resource]:
    return lambda _model_name: resource


_GRPC_METHODS: dict[str, Callable[[str], Resource]] = {
    "ServerLive": _grpc_fixed(_HEALTH),
    "ServerReady": _grpc_fixed(_HEALTH),
    "ServerMetadata": _grpc_fixed(_SERVER_READ),
    "ModelReady": _grpc_model("read"),
    "ModelMetadata": _grpc_model("read"),
    "ModelConfig": _grpc_model("read"),
    "ModelStatistics": _grpc_model_statistics,
    "ModelInfer": _grpc_model("infer"),
    "ModelStreamInfer": _grpc_model("infer", stream=True),
    "RepositoryIndex": _grpc_fixed(_REPOSITORY),
    "RepositoryModelLoad": _grpc_optional_model(_REPOSITORY),
    "RepositoryModelUnload": _grpc_optional_model(_REPOSITORY),
    "SystemSharedMemoryStatus": _grpc_fixed(_SHARED_MEMORY),
    "SystemSharedMemoryRegister": _grpc_fixed(_SHARED_MEMORY),
    "SystemSharedMemoryUnregister": _grpc_fixed(_SHARED_MEMORY),
    "CudaSharedMemoryStatus": _grpc_fixed(_SHARED_MEMORY),
    "CudaSharedMemoryRegister": _grpc_fixed(_SHARED_MEMORY),
    "CudaSharedMemoryUnregister": _grpc_fixed(_SHARED_MEMORY),
    "TraceSetting": _grpc_optional_model(_TRACE),
    "LogSettings": _grpc_fixed(_LOGGING),
}

GRPC_METHODS: frozenset[str] = frozenset(_GRPC_METHODS)
_GRPC_PREFIX = f"/{GRPC_SERVICE}/"


def classify_grpc(method: str, model_name: str) -> Resource:
    """Map a GRPCInferenceService call to the Resource policies judge.

    `method` is the short name ("ModelInfer") or the full gRPC path
    ("/inference.GRPCInferenceService/ModelInfer"); `model_name` is the request's
    model name ("" when it has none). Same (resource, action) pairs as HTTP.
    """
    short = method[len(_GRPC_PREFIX):] if method.startswith(_GRPC_PREFIX) else method
    classify = _GRPC_METHODS.get(short)
    if classify is None:
        raise NotFound(f"no gRPC method: {method}")
    return classify(model_name)
