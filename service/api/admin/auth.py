"""Bearer-token authentication of the admin API.

Settings hold only sha256 digests of the accepted tokens, so a leaked config or environment dump
does not leak a token. The presented token is hashed and compared with every digest in constant
time (``hmac.compare_digest``, no early exit), so timing says nothing about how close a guess is.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from fastapi import Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.errors import ApiError
from service.registry.errors import RefusalReason

_bearer = HTTPBearer(auto_error=False, description="An admin token; the service stores its sha256 only.")


class Unauthorized(ApiError):
    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    """A fresh random token and the digest to configure."""
    token = secrets.token_urlsafe(32)
    return token, token_digest(token)


def token_matches(token: str, digests: list[str]) -> bool:
    presented = token_digest(token).encode()
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(presented, digest.encode())
    return matched


async def require_admin(request: Request) -> None:
    """Route dependency: 401 without a valid bearer token (the routes exist only with the admin API on)."""
    settings = request.app.state.settings
    credentials: HTTPAuthorizationCredentials | None = await _bearer(request)
    if credentials is None:
        request.app.state.metrics.count(RefusalReason.UNAUTHORIZED)
        raise Unauthorized("admin requests need an 'Authorization: Bearer <token>' header")
    if not token_matches(credentials.credentials, settings.admin.admin_token_sha256):
        request.app.state.metrics.count(RefusalReason.UNAUTHORIZED)
        raise Unauthorized("the admin token is not valid")
