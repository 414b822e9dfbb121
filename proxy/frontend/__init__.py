"""The doors clients use: the HTTP server (the request path composed in order), gRPC, the guards and workers."""
