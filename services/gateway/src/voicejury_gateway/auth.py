"""Who is calling: an API key (`Authorization: Bearer <key>` or `X-API-Key`), stored hashed,
names the caller's tenant. One function for the endpoints (through `get_tenant`) and for
the admission middleware, which must know the tenant before it reads an upload's body."""

from __future__ import annotations

from collections.abc import Mapping

from .db import JobRepository
from .problems import ProblemError
from .settings import AuthMode

DEMO_TENANT = "demo"
# Where the admission middleware leaves the tenant it authenticated (the request's
# `scope["state"]`), so that the endpoint does not look the key up again.
ADMITTED_TENANT = "voicejury_tenant"


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries (header names lower-case, as ASGI gives them)."""
    authorization = headers.get("authorization")
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip() or None
    return headers.get("x-api-key") or None


async def authenticate(repo: JobRepository, mode: AuthMode, headers: Mapping[str, str]) -> str:
    """The caller's tenant; 401 without a key or with an unknown or revoked one."""
    if mode is AuthMode.DEMO:
        return DEMO_TENANT
    key = presented_key(headers)
    if key is None:
        raise ProblemError(401, "unauthenticated", "an API key is required (Authorization: Bearer)")
    tenant = await repo.tenant_for_key(key)
    if tenant is None:
        raise ProblemError(401, "invalid_api_key", "the API key is unknown or revoked")
    return tenant
