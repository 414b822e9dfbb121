"""A stand-in for `triton_python_backend_utils`, for unit tests of model.py outside Triton."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1


class TritonError:
    INTERNAL, INVALID_ARG, UNAVAILABLE = 1, 3, 4   # TRITONSERVER_Error_Code's values

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        self._message, self.code = message, code

    def message(self) -> str:
        return self._message


class Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None) -> None:
        self.output_tensors = output_tensors or []
        self.error = error

    def output(self, name: str) -> np.ndarray:
        return next(t.as_numpy() for t in self.output_tensors if t.name() == name)


class ResponseSender:
    def __init__(self) -> None:
        self.sent: list[tuple[InferenceResponse | None, int]] = []
        self.cancel_after: int | None = None
        self.poll_s = 0.0          # how long is_cancelled() takes (a round trip to the server in Triton)
        self.finished = threading.Event()
        self.finished_at: float | None = None

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        if any(f & TRITONSERVER_RESPONSE_COMPLETE_FINAL for _, f in self.sent):
            raise AssertionError("send() after the final response")
        self.sent.append((response, flags))
        if flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            self.finished_at = time.monotonic()
            self.finished.set()

    def is_cancelled(self) -> bool:
        # Real Triton frees the response factory after the final flag: asking then crashes it.
        if any(flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL for _, flags in self.sent):
            raise AssertionError("is_cancelled() called after the final response")
        time.sleep(self.poll_s)
        return self.cancel_after is not None and len(self.sent) >= self.cancel_after


class InferenceRequest:
    def __init__(self, **inputs: np.ndarray) -> None:
        self._inputs = inputs
        self.sender = ResponseSender()

    def inputs(self) -> list[Tensor]:
        return [Tensor(name, array) for name, array in self._inputs.items()]

    def get_response_sender(self) -> ResponseSender:
        return self.sender


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return next((t for t in request.inputs() if t.name() == name), None)


def using_decoupled_model_transaction_policy(config: dict[str, Any]) -> bool:
    return bool(config.get("model_transaction_policy", {}).get("decoupled"))


class Metric:
    def __init__(self, labels: dict[str, str], buckets: list[float] | None = None) -> None:
        self.labels, self.buckets = labels, buckets
        self.value = 0.0
        self.observations: list[float] = []
        self.observe_s = 0.0       # how long observe() takes (a round trip to the server in Triton)

    def set(self, value: float) -> None:
        self.value = value

    def increment(self, value: float) -> None:
        if value < 0:
            raise ValueError("a counter only goes up")   # Triton refuses this too
        self.value += value

    def observe(self, value: float) -> None:
        time.sleep(self.observe_s)
        self.observations.append(value)


class MetricFamily:
    GAUGE, COUNTER, HISTOGRAM = "gauge", "counter", "histogram"

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name, self.description, self.kind = name, description, kind
        self.metrics: list[Metric] = []

    def Metric(self, labels: dict[str, str], buckets: list[float] | None = None) -> Metric:  # noqa: N802 - Triton's name
        if (self.kind == self.HISTOGRAM) != (buckets is not None):
            raise ValueError("buckets go with histograms, and only with them")
        metric = Metric(labels, buckets)
        self.metrics.append(metric)
        return metric


class Logger:
    messages: list[str] = []

    @classmethod
    def log_info(cls, message: str) -> None:
        cls.messages.append(message)
