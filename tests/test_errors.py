"""Tests for proxy.errors: every error's HTTP status, gRPC code and audit status, as drawn in its docstring."""

from __future__ import annotations

import re

import grpc
import pytest

from proxy import errors
from proxy.errors import BadRequest, PayloadTooLarge
from proxy.frontend import http_guard


def test_timeout_and_framing_errors_are_in_the_error_tree() -> None:
    assert http_guard.RequestTimeout is errors.RequestTimeout and http_guard.FramingError is errors.FramingError
    timeout, framing = errors.RequestTimeout("header_timeout"), errors.FramingError("framing: x")
    assert (timeout.http_status, timeout.grpc_code.name, timeout.audit_status) == (408, "DEADLINE_EXCEEDED", "error")
    assert (framing.http_status, framing.grpc_code.name, framing.audit_status) == (400, "INVALID_ARGUMENT", "denied")
    assert isinstance(timeout, BadRequest) and isinstance(framing, BadRequest)
    assert errors.closes_connection(timeout) and errors.closes_connection(framing)
    assert not errors.closes_connection(PayloadTooLarge())


def _tree() -> list[tuple[str, int, str]]:
    """(class name, HTTP status, gRPC code) for each line of the tree in errors.py's docstring."""
    assert errors.__doc__ is not None
    return [(m[1], int(m[2]), m[3]) for m in re.finditer(r"(\w+)\s+(\d{3}) ([A-Z_]+)", errors.__doc__)]


def test_the_docstring_tree_names_every_error_with_its_status_and_code() -> None:
    drawn = _tree()
    assert {name for name, _, _ in drawn} == {
        cls.__name__ for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.SeekgateError)}
    for name, http_status, code in drawn:
        cls = getattr(errors, name)
        assert (cls.http_status, cls.grpc_code) == (http_status, grpc.StatusCode[code]), name


@pytest.mark.parametrize("cls", [errors.RequestTimeout, errors.FramingError, errors.PayloadTooLarge])
def test_refusals_render_without_leaking_the_reason(cls: type[errors.SeekgateError]) -> None:
    err = cls("secret detail: key sk-123")
    assert err.reason == "secret detail: key sk-123" and "sk-123" not in err.public_message
