"""busy: every request is answered with an error coded UNAVAILABLE, as a model with a full queue sheds load.

Triton's UNAVAILABLE is then its own answer, one a proxy must pass on rather than take for a failure to
connect.
"""

from __future__ import annotations

from typing import Any

import triton_python_backend_utils as pb_utils

BUSY = "model busy: queue full, retry later"


class TritonPythonModel:
    """One error response per request, never failing the batch."""

    def execute(self, requests: list[Any]) -> list[Any]:
        return [pb_utils.InferenceResponse(error=pb_utils.TritonError(BUSY, pb_utils.TritonError.UNAVAILABLE))
                for _ in requests]
