"""Tests for proxy.settings: defaults, YAML, env overrides, all-errors-at-once, the shipped config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from proxy.settings import (
    MiB,
    Settings,
    SettingsError,
    env_var,
    format_settings_help,
    format_settings_yaml,
    load_settings,
    parse_env_value,
    redis_cluster_nodes,
    status_address,
    strict_transport_security,
    validate,
)
from proxy.state.redis_limiter import cluster_url

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "seekgate.yaml"


def all_paths() -> list[str]:
    paths = []
    for f in dataclasses.fields(Settings):
        value = getattr(Settings(), f.name)
        if dataclasses.is_dataclass(value):
            paths += [f"{f.name}.{g.name}" for g in dataclasses.fields(value)]
        else:
            paths.append(f.name)
    return paths


def errors_of(**kwargs: object) -> list[str]:
    with pytest.raises(SettingsError) as info:
        load_settings(**kwargs)  # type: ignore[arg-type]
    return info.value.errors


def test_defaults() -> None:
    s = load_settings(None, env={})
    assert s == Settings()
    assert s.data_dir == ".seekgate"
    assert (s.server.host, s.server.http_port, s.server.grpc_port, s.server.metrics_port) == (
        "127.0.0.1", 8000, 8001, 8002)
    assert s.server.base_path == "" and s.server.max_body_bytes == 64 * MiB
    assert s.server.grpc_max_message_bytes == 64 * MiB and s.server.read_timeout_s == 30
    assert s.upstream.http_url == "http://127.0.0.1:18000"
    assert s.upstream.grpc_target == "127.0.0.1:18001"
    assert (s.upstream.connect_timeout_s, s.upstream.request_timeout_s, s.upstream.pool_size) == (2, 300, 100)
    assert (s.triton.model_repository, s.triton.checkpoint) == ("triton_models", "")
    assert (s.triton.http_port, s.triton.grpc_port, s.triton.metrics_port) == (18000, 18001, 18002)
    assert s.triton.startup_timeout_s == 120
    assert s.auth.key_cache_ttl_s == 5
    assert (s.policy.directory, s.policy.reload_interval_s) == ("policies", 0.5)
    assert (s.audit.max_bytes, s.audit.retention_days, s.audit.queue_max) == (100 * MiB, 180, 100_000)
    assert validate(s) == []


def test_settings_are_frozen_and_every_field_has_help() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().server.http_port = 1  # type: ignore[misc]
    for f in dataclasses.fields(Settings):
        assert f.metadata["help"]
        value = getattr(Settings(), f.name)
        if dataclasses.is_dataclass(value):
            assert all(g.metadata["help"] for g in dataclasses.fields(value))


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    assert load_settings(tmp_path / "absent.yaml", env={}) == Settings()


def test_yaml_values_are_loaded(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "data_dir: /var/lib/seekgate\n"
        "server:\n  http_port: 9000\n  base_path: /triton\n  read_timeout_s: 5\n"
        "audit:\n  retention_days: 30\n"
        "policy:\n",  # a section with every key commented out
        encoding="utf-8")
    s = load_settings(path, env={})
    assert s.data_dir == "/var/lib/seekgate"
    assert (s.server.http_port, s.server.base_path) == (9000, "/triton")
    assert s.server.read_timeout_s == 5.0 and isinstance(s.server.read_timeout_s, float)
    assert s.audit.retention_days == 30
    assert s.server.grpc_port == 8001 and s.policy == Settings().policy


def test_empty_yaml_file_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("# nothing\n", encoding="utf-8")
    assert load_settings(path, env={}) == Settings()


def test_env_overrides_yaml_and_are_coerced(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("server:\n  http_port: 9000\n", encoding="utf-8")
    env = {
        "SEEKGATE_SERVER_HTTP_PORT": "9100",
        "SEEKGATE_SERVER_READ_TIMEOUT_S": " 2.5 ",
        "SEEKGATE_UPSTREAM_HTTP_URL": "http://triton:8000",
        "SEEKGATE_DATA_DIR": "/data",
        "SEEKGATE_AUDIT_QUEUE_MAX": "5",
        "SEEKGATE_ADMIN_KEY": "not a setting, ignored",
        "UNRELATED": "x",
    }
    s = load_settings(path, env=env)
    assert s.server.http_port == 9100
    assert s.server.read_timeout_s == 2.5
    assert s.upstream.http_url == "http://triton:8000"
    assert s.data_dir == "/data"
    assert s.audit.queue_max == 5


def test_overrides_win_over_env_nested_or_dotted() -> None:
    env = {"SEEKGATE_SERVER_HTTP_PORT": "9100"}
    s = load_settings(None, env=env, overrides={"server": {"http_port": 9200}, "audit.queue_max": 7})
    assert (s.server.http_port, s.audit.queue_max) == (9200, 7)
    s = load_settings(None, env=env, overrides={"server.http_port": 9300})
    assert s.server.http_port == 9300


@pytest.mark.parametrize(("raw", "kind", "expected"), [
    ("42", int, 42), (" 7 ", int, 7), ("1.5", float, 1.5), ("3", float, 3.0),
    ("true", bool, True), ("Yes", bool, True), ("0", bool, False), ("off", bool, False),
    (" keep spaces ", str, " keep spaces "),
])
def test_parse_env_value(raw: str, kind: type, expected: object) -> None:
    value = parse_env_value(raw, kind)
    assert value == expected and type(value) is kind


@pytest.mark.parametrize(("raw", "kind"), [("x", int), ("1.5", int), ("fast", float), ("maybe", bool)])
def test_parse_env_value_rejects(raw: str, kind: type) -> None:
    with pytest.raises(ValueError, match="must be"):
        parse_env_value(raw, kind)


def test_all_problems_reported_at_once_with_field_names(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "server:\n  http_port: 70000\n  htp_port: 1\n  max_body_bytes: '64'\n"
        "  grpc_port: 8002\n  base_path: /x/\n"
        "upstream:\n  http_url: ftp://triton\n  grpc_target: http://triton:1\n  pool_size: 0\n"
        "auth:\n  key_cache_ttl_s: -1\n"
        "policy: [1, 2]\n"
        "sever:\n  http_port: 1\n",
        encoding="utf-8")
    env = {"SEEKGATE_AUDIT_QUEUE_MAX": "lots", "SEEKGATE_AUDIT_QUEUE_SIZE": "1"}
    errors = errors_of(path=path, env=env)
    expected = [
        "server.http_port: must be 1-65535, got 70000",
        "server.htp_port: unknown setting",
        "server.max_body_bytes: must be an integer, got str '64'",
        "server.metrics_port: port 8002 clashes with server.grpc_port",
        "server.base_path: must be '' or like /prefix (no trailing slash), got '/x/'",
        "upstream.http_url: must be an http:// or https:// URL, got 'ftp://triton'",
        "upstream.grpc_target: must be a gRPC target like host:port, got 'http://triton:1'",
        "upstream.pool_size: must be greater than 0, got 0",
        "auth.key_cache_ttl_s: must be 0 or more, got -1.0",
        "policy: must be a mapping, got list",
        "sever: unknown setting",
        "audit.queue_max (from SEEKGATE_AUDIT_QUEUE_MAX): must be an integer, got 'lots'",
        "audit.queue_size (from SEEKGATE_AUDIT_QUEUE_SIZE): unknown setting",
    ]
    assert sorted(errors) == sorted(expected)
    message = str(SettingsError(errors))
    assert all(e in message for e in expected)


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"server.grpc_port": 8000}, "server.grpc_port: port 8000 clashes with server.http_port"),
    ({"triton.http_port": 8000}, "triton.http_port: port 8000 clashes with server.http_port"),
    ({"triton.metrics_port": 0}, "triton.metrics_port: must be 1-65535, got 0"),
    ({"server.grpc_max_message_bytes": 2**31}, "server.grpc_max_message_bytes: must be at most"),
    ({"server.read_timeout_s": float("inf")}, "server.read_timeout_s: must be greater than 0"),
    ({"server.http_port": True}, "server.http_port: must be an integer, got bool"),
    ({"server.host": " "}, "server.host: must not be empty"),
    ({"data_dir": ""}, "data_dir: must not be empty"),
    ({"data_dir": 5}, "data_dir: must be a string, got int"),
    ({"server.base_path": "/a/../b"}, "server.base_path"),
    ({"upstream.grpc_target": "triton"}, "upstream.grpc_target"),
    ({"audit.durability": "paranoid"}, "audit.durability: must be one of batched, strict, got 'paranoid'"),
    ({"audit.fsync_interval_s": 0}, "audit.fsync_interval_s: must be greater than 0"),
    ({"console.cookie_secure": "sometimes"}, "console.cookie_secure: must be one of auto, always, got 'sometimes'"),
    ({"server.status_listen": "8101"}, "server.status_listen: must be host:port, like 0.0.0.0:8101 or [::]:8101, "
                                       "got '8101'"),
    ({"server.status_listen": ":8101"}, "server.status_listen: must be host:port"),
    ({"server.status_listen": "0.0.0.0:http"}, "server.status_listen: must be host:port"),
    ({"server.status_listen": "0.0.0.0:"}, "server.status_listen: must be host:port"),
    ({"server.status_listen": "0.0.0.0:70000"}, "server.status_listen: the port must be 1-65535, got 70000"),
    ({"server.status_listen": "0.0.0.0:0"}, "server.status_listen: the port must be 1-65535, got 0"),
    ({"server.status_listen": "::1:8101"}, "server.status_listen: an IPv6 address goes in brackets, like [::]:8101"),
    ({"server.status_listen": "0.0.0.0:8000"}, "server.status_listen: port 8000 clashes with server.http_port"),
    ({"server.status_listen": "127.0.0.1:8002"}, "server.status_listen: port 8002 clashes with server.metrics_port"),
])
def test_single_problems_name_their_field(overrides: dict[str, object], fragment: str) -> None:
    errors = errors_of(path=None, env={}, overrides=overrides)
    assert len(errors) == 1 and errors[0].startswith(fragment), errors


@pytest.mark.parametrize(("listen", "address"), [
    ("", None), ("0.0.0.0:8101", ("0.0.0.0", 8101)), ("[::]:8101", ("::", 8101)),
    ("[::1]:9", ("::1", 9)), ("status.local:65535", ("status.local", 65535)),
])
def test_status_listen_is_off_by_default_or_a_host_and_port(listen: str, address: tuple[str, int] | None) -> None:
    settings = load_settings(None, env={}, overrides={"server.status_listen": listen})
    assert status_address(settings.server) == address
    assert Settings().server.status_listen == ""


@pytest.mark.parametrize("text", ["server: [\n", "- just\n- a list\n"])
def test_unreadable_yaml_is_a_settings_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(text, encoding="utf-8")
    assert errors_of(path=path, env={})[0].startswith(str(path))


@pytest.mark.parametrize("good", ["", "/triton", "/a/b-c_d.e"])
def test_good_base_paths(good: str) -> None:
    assert load_settings(None, env={}, overrides={"server.base_path": good}).server.base_path == good


def test_shipped_config_loads_and_equals_defaults() -> None:
    assert load_settings(SHIPPED, env={}) == Settings()


def test_shipped_config_s_redis_cluster_examples_load_and_select_the_cluster_client(tmp_path: Path) -> None:
    """The commented Redis Cluster URLs under redis.url, each put in place of url: '' as an operator
    would: the file loads, and the limiter reads the URL as Redis Cluster (plain and TLS)."""
    text = SHIPPED.read_text(encoding="utf-8")
    examples = [line.strip().removeprefix("# ") for line in text.splitlines()
                if line.strip().startswith("# url: ") and "+cluster://" in line]
    assert {yaml.safe_load(e)["url"].partition("://")[0] for e in examples} == {"redis+cluster", "rediss+cluster"}
    for example in examples:
        config = tmp_path / "seekgate.yaml"
        head, redis_section = text.split("\nredis:\n")
        redis_section = redis_section.replace("\n  url: ''\n", f"\n  {example}\n", 1)
        config.write_text(f"{head}\nredis:\n{redis_section}", encoding="utf-8")
        url = load_settings(config, env={}).redis.url
        assert url == yaml.safe_load(example)["url"] and cluster_url(url) is not None


def test_shipped_config_lists_every_setting_with_a_comment() -> None:
    data = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    listed = [f"{k}.{n}" for k, v in data.items() if isinstance(v, dict) for n in v]
    listed += [k for k, v in data.items() if not isinstance(v, dict)]
    assert sorted(listed) == sorted(all_paths())
    text = SHIPPED.read_text(encoding="utf-8")
    for path in all_paths():
        name = path.rsplit(".", 1)[-1]
        line_no = next(i for i, line in enumerate(text.splitlines()) if line.strip().startswith(f"{name}:"))
        assert text.splitlines()[line_no - 1].strip().startswith("#"), path


def test_generated_yaml_round_trips() -> None:
    assert load_settings(None, env={}, overrides=yaml.safe_load(format_settings_yaml())) == Settings()


def test_help_lists_every_setting_with_default_and_env_var() -> None:
    text = format_settings_help()
    for path in all_paths():
        assert f"{path} = " in text and env_var(path) in text
    assert "server.http_port = 8000  [SEEKGATE_SERVER_HTTP_PORT]" in text
    assert env_var("data_dir") == "SEEKGATE_DATA_DIR"


def test_tls_settings_are_checked_together() -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(None, env={"SEEKGATE_SERVER_TLS_CERT_FILE": "/c.pem",
                                 "SEEKGATE_SERVER_TLS_MIN_VERSION": "1.1"})
    assert any("tls_key_file: set both or neither" in e for e in err.value.errors)
    assert any("server.tls_min_version: must be one of 1.2, 1.3" in e for e in err.value.errors)
    with pytest.raises(SettingsError, match="tls_client_ca_file: needs server.tls_cert_file"):
        load_settings(None, env={"SEEKGATE_SERVER_TLS_CLIENT_CA_FILE": "/ca.pem"})
    s = load_settings(None, env={"SEEKGATE_UPSTREAM_REDACT_ERRORS": "true", "SEEKGATE_SERVER_INSECURE_PLAINTEXT": "1"})
    assert s.upstream.redact_errors and s.server.insecure_plaintext and s.server.tls_min_version == "1.3"


def test_hsts_is_off_by_default_and_needs_tls_that_ends_here() -> None:
    assert Settings().server.hsts_max_age_s == 0
    assert strict_transport_security(Settings().server) == ""
    tls = {"server.tls_cert_file": "/c.pem", "server.tls_key_file": "/k.pem"}
    s = load_settings(None, env={}, overrides={**tls, "server.hsts_max_age_s": 600})
    assert strict_transport_security(s.server) == "max-age=600"
    s = load_settings(None, env={"SEEKGATE_SERVER_HSTS_MAX_AGE_S": "31536000",
                                 "SEEKGATE_SERVER_HSTS_INCLUDE_SUBDOMAINS": "true"}, overrides=tls)
    assert strict_transport_security(s.server) == "max-age=31536000; includeSubDomains"
    with pytest.raises(SettingsError) as err:
        load_settings(None, env={}, overrides={"server.hsts_max_age_s": 600})
    assert err.value.errors == ["server.hsts_max_age_s: needs server.tls_cert_file (Strict-Transport-Security is "
                                "sent only over TLS that ends here; a TLS-terminating proxy in front sends its own)"]
    with pytest.raises(SettingsError) as err:
        load_settings(None, env={}, overrides={**tls, "server.hsts_max_age_s": -1,
                                               "server.hsts_include_subdomains": True})
    assert err.value.errors == ["server.hsts_max_age_s: must be 0 or more, got -1",
                                "server.hsts_include_subdomains: needs server.hsts_max_age_s greater than 0"]


def test_redis_url_from_env_and_limits_backend_down_checked() -> None:
    s = load_settings(None, env={"SEEKGATE_REDIS_URL": "redis://10.0.0.5:6379/0",
                                 "SEEKGATE_LIMITS_ON_BACKEND_DOWN": "local"})
    assert (s.redis.url, s.limits.on_backend_down) == ("redis://10.0.0.5:6379/0", "local")
    errors = errors_of(path=None, env={"SEEKGATE_REDIS_URL": "http://10.0.0.5", "SEEKGATE_REDIS_LEASE_S": "0.1",
                                       "SEEKGATE_LIMITS_ON_BACKEND_DOWN": "open"})
    assert errors == ["limits.on_backend_down: must be closed or local, got 'open'",
                      "redis.url: must be empty or a redis://, rediss://, unix:// or (Redis Cluster) "
                      "redis+cluster://, rediss+cluster:// URL, got scheme 'http'",
                      "redis.lease_s: must be at least 1 second, got 0.1"]


@pytest.mark.parametrize("url", ["redis+cluster://10.0.0.1:6379", "rediss+cluster://user:pw@cfg.example:6379/0"])
def test_a_redis_cluster_url_is_valid(url: str) -> None:
    assert load_settings(None, env={"SEEKGATE_REDIS_URL": url}).redis.url == url


def test_a_redis_cluster_url_may_name_several_nodes_each_a_start_node() -> None:
    url = "rediss+cluster://user:pw@redis-0:7000, redis-1 ,[::1]:7002/0?ssl_cert_reqs=required"
    assert load_settings(None, env={"SEEKGATE_REDIS_URL": url}).redis.url == url
    assert redis_cluster_nodes(url) == ("rediss://user:pw@redis-0:7000/0?ssl_cert_reqs=required",
                                        [("redis-0", 7000), ("redis-1", 6379), ("::1", 7002)])
    assert redis_cluster_nodes("redis+cluster://10.0.0.1:6379") == ("redis://10.0.0.1:6379", [("10.0.0.1", 6379)])
    assert redis_cluster_nodes("redis://10.0.0.1:6379/0") is None


def test_a_redis_cluster_url_with_a_bad_node_is_refused_naming_the_node_not_the_password() -> None:
    assert errors_of(path=None, env={"SEEKGATE_REDIS_URL": "redis+cluster://u:secret@a:6379,b:x,:7"}) == [
        "redis.url: node 'b:x': the port is not a number from 0 to 65535"]
    assert errors_of(path=None, env={"SEEKGATE_REDIS_URL": "redis+cluster://a:6379,,b:6379"}) == [
        "redis.url: node '': no host"]


def test_a_redis_cluster_url_names_no_database_but_0() -> None:
    assert errors_of(path=None, env={"SEEKGATE_REDIS_URL": "redis+cluster://10.0.0.1:6379/2"}) == [
        "redis.url: Redis Cluster has database 0 only, got '/2'"]


@pytest.mark.parametrize("aliases", ["deepseek-chat=deepseek", "deepseek-ai/DeepSeek-V3=deepseek, ds=deepseek", ""])
def test_openai_aliases_may_be_hugging_face_style_ids(aliases: str) -> None:
    assert validate(load_settings(None, env={}, overrides={"openai.aliases": aliases})) == []


@pytest.mark.parametrize("aliases", ["org/name=other/model", "a/b/c=deepseek", "/abs=deepseek", "org/=deepseek",
                                     "org/../x=deepseek", "nomodel", "=deepseek"])
def test_openai_aliases_name_a_triton_model(aliases: str) -> None:
    """The target is a Triton model: a directory's name, never a path."""
    assert any(e.startswith("openai.aliases:") for e in errors_of(path=None, env={}, overrides={"openai.aliases": aliases}))


@pytest.mark.parametrize("value", ["10.0.0.0/33", "not-an-ip", "10.0.0.1,,2001:db8::/200"])
def test_sign_in_unlimited_must_be_addresses_or_cidrs(value: str) -> None:
    assert any(e.startswith("auth.sign_in_unlimited:") for e in errors_of(path=None, env={},
                                                                         overrides={"auth.sign_in_unlimited": value}))
