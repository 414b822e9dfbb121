"""The request path's decisions, free of I/O frameworks: authenticate, classify, authorize, limit, and their composition."""
