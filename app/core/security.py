"""API keys: generation, hashing, and a short-lived in-process lookup cache.

Keys are 256-bit random tokens, so a plain sha256 is a sufficient at-rest hash (no salt or
slow KDF needed: there is nothing to brute-force). The cache makes the authenticated hot path
(``GET /jobs/{id}``) cost no extra query; a revoked key stops working within the TTL.
"""

from __future__ import annotations

import hashlib
import secrets

from cachetools import TTLCache

KEY_PREFIX = "d4c_"
PREFIX_LEN = 8  # what ApiKey.prefix stores: enough to recognise a key in a listing


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyCache:
    """key hash -> tenant id (or None for a key known not to exist), for ``ttl_s`` seconds.

    Negative answers are cached too, so a client hammering with a bad key costs one query per
    TTL; the size bound keeps a flood of random keys from growing memory.
    """

    def __init__(self, ttl_s: float, maxsize: int = 10_000) -> None:
        self._cache: TTLCache[str, str | None] = TTLCache(maxsize=maxsize, ttl=ttl_s)

    def get(self, key_hash: str) -> tuple[bool, str | None]:
        try:
            return True, self._cache[key_hash]
        except KeyError:
            return False, None

    def put(self, key_hash: str, tenant_id: str | None) -> None:
        self._cache[key_hash] = tenant_id

    def clear(self) -> None:
        self._cache.clear()
