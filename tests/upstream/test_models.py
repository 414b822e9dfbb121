"""Model names come from Triton's repository index: a model of any name is served, labelled and audited as itself."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.local.triton import TritonProcess, free_ports
from proxy.upstream.models import MAX_MODELS, model_names
from tests.conftest import REPO, start_triton
from tests.gateway import Gateway, audit_records, metric, wait_for

MODEL = "echo_under_test"   # a name no line of proxy/ knows


def test_model_names_from_an_index_answer() -> None:
    index = [{"name": "b", "version": "1", "state": "READY"}, {"name": "a", "state": "UNAVAILABLE"},
             {"name": "b", "version": "2"}, {"version": "3"}, "junk", {"name": 7}]
    assert model_names(index) == ["a", "b"]
    assert model_names({"name": "a"}) == []
    # Ready only: a READY version (b's first), or no state stated; "a" is unloaded.
    assert model_names(index, ready_only=True) == ["b"]
    assert model_names([{"name": "c"}, {"name": "d", "state": "UNLOADING"}], ready_only=True) == ["c"]


def test_model_names_are_bounded_for_labels() -> None:
    many = [{"name": f"m{i:04d}"} for i in range(MAX_MODELS * 3, 0, -1)]
    names = model_names(many)
    assert len(names) == MAX_MODELS
    assert names == sorted(names) and names[0] == "m0001"


@pytest.fixture(scope="module")
def echo_triton(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    """The real tritonserver on a repository whose only model is bench's echo model under another name."""
    root = tmp_path_factory.mktemp("echo-triton")
    model = root / "models" / MODEL
    shutil.copytree(REPO / "bench" / "models" / "trivial", model)
    config = model / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "trivial"', f'name: "{MODEL}"'))
    proc = start_triton(root / "data", tiny_checkpoint, repository=root / "models")
    yield proc
    proc.stop()


def test_a_model_of_another_name_is_served_labelled_and_audited(
        echo_triton: TritonProcess, tmp_path: Path) -> None:
    gw = Gateway(tmp_path, f"http://127.0.0.1:{echo_triton.launch.http_port}", free_ports(3)).start()
    try:
        _, key = gw.key(owner="olga", roles=("user",))
        body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32",
                                       "data": [1, 2, 3, 4]}]}).encode()
        request = urllib.request.Request(f"{gw.url}/v2/models/{MODEL}/infer", data=body, method="POST",
                                         headers={"Authorization": f"Bearer {key}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200
            assert json.loads(answer.read())["outputs"][0]["data"] == [1, 2, 3, 4]
        # Its own label value, not `other`: the name came from Triton's index at start.
        assert wait_for(lambda: metric(gw, "seekgate_requests_total", model=MODEL, status="allowed") == 1, 5)
        assert metric(gw, "seekgate_requests_total", model="other") == 0
        assert wait_for(lambda: any(r.get("model") == MODEL for r in audit_records(gw)), 5)
        record = next(r for r in audit_records(gw) if r.get("model") == MODEL)
        assert (record["status"], record["http_status"], record["resource"]) == ("allowed", 200, f"model:{MODEL}")
        # A name Triton does not serve stays out of the label set.
        unknown = urllib.request.Request(f"{gw.url}/v2/models/deepseek/ready", method="GET",
                                         headers={"Authorization": f"Bearer {key}"})
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(unknown, timeout=30)
        assert wait_for(lambda: metric(gw, "seekgate_requests_total", model="other") == 1, 5)
    finally:
        gw.stop()


def test_max_tokens_default_from_a_model_config() -> None:
    from proxy.upstream.models import MaxTokensDefault, max_tokens_default
    config = {"input": [{"name": "text_input"}, {"name": "max_tokens"}],
              "parameters": {"default_max_tokens": {"string_value": "16"}}}
    assert max_tokens_default(config) == MaxTokensDefault(True, 16)
    assert max_tokens_default({"input": [{"name": "text_input"}]}) == MaxTokensDefault(False, None)
    bad = {"input": [{"name": "max_tokens"}], "parameters": {"default_max_tokens": {"string_value": "-3"}}}
    assert max_tokens_default(bad) == MaxTokensDefault(True, None)   # unreadable: refused under a cap
    assert max_tokens_default([]) is None and max_tokens_default({"input": "x"}) is None


def test_max_tokens_cap_from_a_model_config() -> None:
    """The OpenAI door's chat default is the model's cap: read as the default is, none when unreadable or 0."""
    from proxy.upstream.models import max_tokens_default

    def cap(value: object) -> int | None:
        known = max_tokens_default({"input": [{"name": "max_tokens"}], "parameters": {"max_tokens_cap": value}})
        assert known is not None
        return known.cap

    assert cap({"string_value": "512"}) == 512
    assert cap({"string_value": "0"}) is None and cap({"string_value": "-1"}) is None and cap("512") is None
    assert max_tokens_default({"input": []}).cap is None   # type: ignore[union-attr]



def test_only_numeric_outputs_are_classifiable() -> None:
    from proxy.upstream.models import max_tokens_default
    config = {"input": [], "output": [{"name": "text_output", "data_type": "TYPE_STRING"},
                                      {"name": "output_tokens", "data_type": "TYPE_INT32"},
                                      {"name": "flag", "data_type": "TYPE_BOOL"}, {"data_type": "TYPE_FP32"}]}
    known = max_tokens_default(config)
    assert known is not None and known.classifiable == {"output_tokens"}
    assert max_tokens_default({"output": "x"}).classifiable == frozenset()   # type: ignore[union-attr]
