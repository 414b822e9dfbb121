"""API keys: the token format and the keyed hash the store keeps instead of the secret."""

from proxy.keys.format import (KeyFormatError, ParsedKey, generate_key, key_prefix_and_last4,
                               parse_key)
from proxy.keys.hashing import hash_secret, load_or_create_pepper, verify_secret

__all__ = [
    "KeyFormatError", "ParsedKey", "generate_key", "key_prefix_and_last4", "parse_key",
    "hash_secret", "load_or_create_pepper", "verify_secret",
]
