"""seekgate: an auth proxy in front of Triton Inference Server.

Every request, HTTP (aiohttp) or gRPC (grpc.aio), walks the same steps in order:

    context       request id, client address, size limit, spoofable headers dropped
    authenticate  Bearer key -> Principal                         (steps/authn.py, keys/, store/)
    classify      raw route -> (resource, action); unknown denied (steps/classify.py)
    authorize     casbin ABAC from policies/*.yaml, deny overrides (steps/authz.py, steps/policy.py)
    limit         per-key rates and token budgets                  (steps/pipeline.py, state/limits.py)
    forward       keep-alive pool to Triton on loopback, streamed  (upstream/forward.py, upstream/pool.py)
    audit+metrics one record per request, off the hot path         (audit/writer.py, metrics.py)

`frontend/http.py` composes these steps in that order; it is the place to read first.
docs/architecture.md draws the rooms and which may import which.
"""
