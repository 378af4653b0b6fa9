"""Optional API keys: `Authorization: Bearer <key>` on the /v1 routes.

Health checks, metrics, the web page and the API docs stay open (probes and scrapers carry
no keys). Keys are compared with `hmac.compare_digest` against every configured key, so the
time taken says nothing about how much of a key was right, or which key matched.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import ApiError


def check_api_key(request: Request) -> None:
    """FastAPI dependency: pass when auth is off or the bearer key is one of the configured keys.

    Raises:
        ApiError: 401 with `WWW-Authenticate: Bearer` for a missing or wrong key.
    """
    keys: list[str] = request.app.state.settings.api_key_list
    if not keys:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    given = given.strip()
    matched = False
    for key in keys:  # no early exit: every key is compared
        matched |= hmac.compare_digest(given.encode(), key.encode())
    if scheme.lower() != "bearer" or not given or not matched:
        raise ApiError(401, "unauthorized", "missing or invalid API key (Authorization: Bearer <key>)",
                       headers={"WWW-Authenticate": "Bearer"})
