"""Admission of uploads, decided before their bodies are read.

FastAPI parses (and spools to disk) a multipart body before the endpoint runs, so a
refusal made by the endpoint comes after the client has sent up to two recordings. Here,
ahead of that, a submission (`POST /v1/jobs`, `POST /v1/references`) is refused with 503
and `Retry-After` when

- the pipeline's backlog is at its bound (`pipeline_saturated`; the endpoint checks again,
  under a lock, when it records the job: this is the cheap early answer), unless the
  request carries an `Idempotency-Key` (a retry of a job already accepted gets that job);
- this replica already receives `gateway_max_concurrent_uploads` uploads
  (`uploads_saturated`): each holds spooled files and, while it is stored, a recording in
  memory, so the bound keeps a burst from exhausting the replica.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Receive, Scope, Send

from .problems import problem_response

if TYPE_CHECKING:
    from .api import Services

SUBMISSIONS = frozenset({"/v1/jobs", "/v1/references"})


class AdmissionMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.in_flight = 0

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
        settings = services.settings
        if self.in_flight >= settings.gateway_max_concurrent_uploads:
            await _refuse(
                services,
                scope,
                receive,
                send,
                "uploads_saturated",
                "this gateway is receiving too many uploads; retry shortly",
                retry_after_s=2,
            )
            return
        self.in_flight += 1  # before any await: the bound holds for concurrent requests
        try:
            retry = b"idempotency-key" in dict(scope["headers"])
            if not retry and await services.repo.count_active() >= settings.gateway_max_backlog:
                await _refuse(
                    services,
                    scope,
                    receive,
                    send,
                    "pipeline_saturated",
                    "too many jobs in progress; retry shortly",
                    retry_after_s=30,
                )
                return
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def _services(scope: Scope) -> Services | None:
    app: Any = scope.get("app")
    return getattr(getattr(app, "state", None), "services", None)


async def _refuse(
    services: Services,
    scope: Scope,
    receive: Receive,
    send: Send,
    code: str,
    detail: str,
    retry_after_s: int,
) -> None:
    services.rejected.labels(code).inc()
    response = problem_response(
        503,
        code,
        detail,
        scope.get("path"),
        headers={"Retry-After": str(retry_after_s)},
        retry_after_s=retry_after_s,
    )
    await response(scope, receive, send)
