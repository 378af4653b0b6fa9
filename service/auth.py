"""Optional API keys: `Authorization: Bearer <key>` on the /v1 routes.

Health checks, metrics, the web page and the API docs stay open (probes and scrapers carry
no keys). Keys are compared with `hmac.compare_digest` against every configured key, so the
time taken says nothing about how much of a key was right, or which key matched. The routes
reach this through `ovd.service.deps.require_api_key`.
"""

from __future__ import annotations

import hashlib
import hmac

from .errors import ApiError


def check_api_key(authorization: str, keys: list[str]) -> None:
    """Pass when `keys` is empty (auth off) or `authorization` is "Bearer <one of keys>".

    Raises:
        ApiError: 401 with `WWW-Authenticate: Bearer` for a missing or wrong key.
    """
    if not keys:
        return
    scheme, _, given = authorization.partition(" ")
    given = given.strip()
    matched = False
    for key in keys:  # no early exit: every key is compared
        matched |= hmac.compare_digest(given.encode(), key.encode())
    if scheme.lower() != "bearer" or not given or not matched:
        raise ApiError(401, "unauthorized", "missing or invalid API key (Authorization: Bearer <key>)",
                       headers={"WWW-Authenticate": "Bearer"})


def key_owner(authorization: str, keys: list[str]) -> str:
    """Who owns what a request registers: a hash of its API key ("anonymous" with auth off)."""
    if not keys:
        return "anonymous"
    given = authorization.partition(" ")[2].strip()
    return hashlib.sha256(given.encode()).hexdigest()[:16]
