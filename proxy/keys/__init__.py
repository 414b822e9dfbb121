"""Keys: the API key format, the keyed hash the store keeps, session JWTs and envelope-encrypted secrets."""

from proxy.keys.format import KeyFormatError, ParsedKey, generate_key, key_prefix_and_last4, parse_key
from proxy.keys.hashing import hash_secret, load_or_create_pepper, verify_secret

__all__ = [
    "KeyFormatError", "ParsedKey", "generate_key", "key_prefix_and_last4", "parse_key",
    "hash_secret", "load_or_create_pepper", "verify_secret",
]
