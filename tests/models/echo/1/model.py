"""echo: answers each request with what Triton handed the model — its parameters and inputs — as JSON.

The differential tests compare this with seekgate's own reading of the same request body, so
any difference between the two parsers shows up as a failed test.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


def _value(array: np.ndarray) -> Any:
    """A tensor as plain JSON: bytes as latin-1 text, so no byte is lost or invented."""
    if array.dtype == np.object_ or array.dtype.kind == "S":
        return [v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
    return array.reshape(-1).tolist()


def describe(request: Any) -> str:
    """The request as the model received it: parameters, inputs (name -> datatype, shape, values), outputs."""
    inputs = {t.name(): {"dtype": str(t.as_numpy().dtype), "shape": list(t.shape()), "values": _value(t.as_numpy())}
              for t in request.inputs()}
    return json.dumps({"parameters": json.loads(request.parameters() or "{}"), "inputs": inputs,
                       "requested_outputs": list(request.requested_output_names())}, sort_keys=True)


def answer(request: Any) -> Any:
    echo = np.array([[describe(request).encode()]], dtype=np.object_)
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("echo", echo)])


class TritonPythonModel:
    """One response per request; decoupled or not as config.pbtxt says."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)

    def execute(self, requests: list[Any]) -> list[Any] | None:
        if not self.decoupled:
            return [answer(r) for r in requests]
        for request in requests:
            sender = request.get_response_sender()
            sender.send(answer(request), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
