"""The HTTP admin APIs (/admin/v1 keys and crypto, /v1/sessions): thin over the keys/ operations."""
