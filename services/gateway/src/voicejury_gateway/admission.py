"""Admission of uploads, decided before their bodies are read.

FastAPI parses (and spools to disk) a multipart body before the endpoint runs, so a
refusal made by the endpoint comes after the client has sent up to two recordings. Here,
ahead of that, a submission (`POST /v1/jobs`, `POST /v1/references`) is

- refused with 401 when it carries no valid API key: a caller without one never holds an
  upload slot, nor makes the gateway read what it sends;
- refused with 503 and `Retry-After` when this replica already receives
  `gateway_max_concurrent_uploads` uploads (`uploads_saturated`: each holds spooled files
  and, while it is stored, a recording in memory, so the bound keeps a burst from
  exhausting the replica), or with 429 when this tenant alone already sends
  `gateway_max_uploads_per_tenant` of them (`too_many_uploads`: one tenant cannot take
  every slot);
- refused when the pipeline's backlog is at its bound (503 `pipeline_saturated`) or this
  tenant's live jobs are at theirs (429 `too_many_active_jobs`), unless it is a job's
  submission with an `Idempotency-Key` (a retry of a job already accepted gets that job;
  the jobs endpoint checks both again, under a lock, when it records the job: this is
  the cheap early answer).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .auth import ADMITTED_TENANT, authenticate
from .problems import ProblemError, problem_response

if TYPE_CHECKING:
    from .api import Services

SUBMISSIONS = frozenset({"/v1/jobs", "/v1/references"})


class AdmissionMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.in_flight = 0
        self.in_flight_by_tenant: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services: Services | None = _services(scope)
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"].rstrip("/") not in SUBMISSIONS
            or services is None
        ):
            await self.app(scope, receive, send)
            return
        try:
            tenant = await self._admit(services, scope)
        except ProblemError as refusal:  # answered here: the body is never read
            if refusal.status != 401:
                services.rejected.labels(refusal.code).inc()
            retry_after = refusal.extra.get("retry_after_s")
            response = problem_response(
                refusal.status,
                refusal.code,
                refusal.detail,
                scope.get("path"),
                headers={"Retry-After": str(retry_after)} if retry_after is not None else None,
                **refusal.extra,
            )
            await response(scope, receive, send)
            return
        try:
            scope.setdefault("state", {})[ADMITTED_TENANT] = tenant
            await self.app(scope, receive, send)
        finally:
            self._release(tenant)

    async def _admit(self, services: Services, scope: Scope) -> str:
        """The caller's tenant, holding an upload slot; raises the refusal otherwise."""
        settings = services.settings
        headers = Headers(scope=scope)
        tenant = await authenticate(services.repo, settings.gateway_auth_mode, headers)
        if self.in_flight >= settings.gateway_max_concurrent_uploads:
            raise ProblemError(
                503,
                "uploads_saturated",
                "this gateway is receiving too many uploads; retry shortly",
                retry_after_s=2,
            )
        if self.in_flight_by_tenant[tenant] >= settings.gateway_max_uploads_per_tenant:
            raise ProblemError(
                429,
                "too_many_uploads",
                f"at most {settings.gateway_max_uploads_per_tenant} uploads at once per "
                "tenant; retry when one has finished",
                retry_after_s=2,
            )
        # Counted before any await: the bounds hold for concurrent requests.
        self.in_flight += 1
        self.in_flight_by_tenant[tenant] += 1
        try:
            # A job's retry under its key gets that job: its endpoint checks the bounds.
            if not (scope["path"].rstrip("/") == "/v1/jobs" and headers.get("idempotency-key")):
                await check_backlog(services, tenant)
        except BaseException:
            self._release(tenant)
            raise
        return tenant

    def _release(self, tenant: str) -> None:
        self.in_flight -= 1
        self.in_flight_by_tenant[tenant] -= 1
        if not self.in_flight_by_tenant[tenant]:
            del self.in_flight_by_tenant[tenant]


async def check_backlog(services: Services, tenant: str) -> None:
    """503 when the pipeline holds its bound of live jobs, 429 when this tenant holds its own."""
    settings = services.settings
    if await services.repo.count_active() >= settings.gateway_max_backlog:
        raise backlog_full()
    if await services.repo.count_active(tenant) >= settings.gateway_max_active_jobs_per_tenant:
        raise tenant_backlog_full(settings.gateway_max_active_jobs_per_tenant)


def backlog_full() -> ProblemError:
    return ProblemError(
        503, "pipeline_saturated", "too many jobs in progress; retry shortly", retry_after_s=30
    )


def tenant_backlog_full(bound: int) -> ProblemError:
    return ProblemError(
        429,
        "too_many_active_jobs",
        f"this tenant already has {bound} jobs in progress, its bound; retry when one ends",
        retry_after_s=30,
    )


def _services(scope: Scope) -> Services | None:
    app: Any = scope.get("app")
    return getattr(getattr(app, "state", None), "services", None)
