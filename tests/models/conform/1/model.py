"""conform: `count` responses echoing text_input and the request's parameters; an error after `fail_after`.

text_input "model-error" is answered with an error alone, the way a model refuses a request; "model-busy"
with an error coded UNAVAILABLE, the way a model sheds load (a code a proxy must not take for its own).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


def _scalar(request: Any, name: str, default: int | None) -> int | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else int(tensor.as_numpy().reshape(-1)[0])


def responses(request: Any) -> list[Any]:
    """Every response the request gets, the last one flagged final by the caller."""
    text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    if text == "model-error":
        return [pb_utils.InferenceResponse(error=pb_utils.TritonError("conform: refused as asked"))]
    if text == "model-busy":
        return [pb_utils.InferenceResponse(error=pb_utils.TritonError("model busy: queue full, retry later",
                                                                      pb_utils.TritonError.UNAVAILABLE))]
    count, fail_after = _scalar(request, "count", 1) or 1, _scalar(request, "fail_after", None)
    params = json.loads(request.parameters() or "{}")
    out = []
    for i in range(count):
        if fail_after is not None and i == fail_after:
            out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"conform: failing after {i}")))
            break
        doc = json.dumps({"text": text, "i": i, "parameters": params}, sort_keys=True).encode()
        out.append(pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("text_output", np.array([doc], dtype=np.object_))]))
    return out


class TritonPythonModel:
    """Decoupled: each request's responses go through its sender, the last one final."""

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            for response in responses(request):
                sender.send(response)
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
