"""Everything that talks to Triton: the HTTP pool, HTTP forwarding, the gRPC forwarder, token counts."""
