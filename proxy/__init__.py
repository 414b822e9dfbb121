"""seekgate: an auth proxy in front of Triton Inference Server.

Every request, HTTP (aiohttp) or gRPC (grpc.aio), walks the same steps in order:

    context       request id, client address, size limit, spoofable headers dropped
    authenticate  Bearer key -> Principal                         (authn.py, keys/, store/)
    classify      raw route -> (resource, action); unknown denied (classify.py)
    authorize     casbin ABAC from policies/*.yaml, deny overrides (authz.py, policy.py)
    forward       keep-alive pool to Triton on loopback, streamed  (forward.py, upstream_http.py)
    audit+metrics one record per request, off the hot path         (audit.py, metrics.py)

`http_server.py` composes these steps in that order; it is the place to read first.
"""
