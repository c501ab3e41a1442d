"""RFC 9457 problem details: every error the API returns, with a stable `code`."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from typing import Any

import asyncpg.exceptions
import minio.error
import nats.errors
import nats.js.errors
import urllib3.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_JSON = "application/problem+json"

log = logging.getLogger(__name__)


class ProblemError(Exception):
    def __init__(self, status: int, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.extra = extra


_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}

# Codes for the errors the framework raises itself (routing, body parsing, limits).
_HTTP_CODES = {
    400: "malformed_request",
    401: "unauthenticated",
    404: "not_found",
    405: "method_not_allowed",
    413: "upload_too_large",
    415: "unsupported_media_type",
}


# What says a dependency is out of reach (down, restarting, refusing connections), by the
# dependency: the client gets a 503 to retry, not a 500.
_UNREACHABLE: tuple[tuple[str, tuple[type[BaseException], ...]], ...] = (
    (
        "database",
        (
            asyncpg.exceptions.PostgresConnectionError,
            asyncpg.exceptions.CannotConnectNowError,
            asyncpg.exceptions.AdminShutdownError,
            asyncpg.exceptions.TooManyConnectionsError,
        ),
    ),
    (
        "broker",
        (
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.NoServersError,
            nats.errors.StaleConnectionError,
            nats.errors.OutboundBufferLimitError,
            nats.errors.NoRespondersError,
            nats.errors.TimeoutError,
            nats.js.errors.ServiceUnavailableError,
            nats.js.errors.NoStreamResponseError,
        ),
    ),
    (
        "object_store",
        (
            urllib3.exceptions.MaxRetryError,
            urllib3.exceptions.ProtocolError,
            urllib3.exceptions.TimeoutError,
            minio.error.ServerError,
        ),
    ),
    # Not attributable (a socket refused or timed out somewhere): still worth a retry.
    ("dependency", (ConnectionError, TimeoutError)),
)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def unreachable_dependency(exc: BaseException) -> str | None:
    """The dependency an error (or what caused it) says is out of reach, or None."""
    for cause in _causes(exc):
        for dependency, types in _UNREACHABLE:
            if isinstance(cause, types):
                return dependency
    return None


def problem_response(
    status: int,
    code: str,
    detail: str,
    instance: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"https://voicejury.dev/problems/{code}",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "code": code,
        "detail": detail,
        **extra,
    }
    if instance:
        body["instance"] = instance
    all_headers = dict(headers or {})
    if status == 401:
        all_headers.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=all_headers)


PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details; `code` is stable, `detail` is for humans.",
    "type": "object",
    "required": ["type", "title", "status", "code", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "code": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
    },
    "additionalProperties": True,
}


def problem_response_doc(description: str, **members: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI response that is a problem, with the extra `members` (JSON Schemas, all
    present) some problems carry."""
    schema: dict[str, Any] = {"$ref": "#/components/schemas/Problem"}
    if members:
        extra = {"type": "object", "required": sorted(members), "properties": members}
        schema = {"allOf": [schema, extra]}
    return {"description": description, "content": {PROBLEM_JSON: {"schema": schema}}}


def _refuses_as_invalid(operation: dict[str, Any]) -> bool:
    """Whether a request to `operation` can get a 422: it has a body, a query parameter or
    a header parameter to refuse. A malformed path segment is answered 404 instead (see
    `on_validation`)."""
    if "requestBody" in operation:
        return True
    return any(p.get("in") != "path" for p in operation.get("parameters", ()))


def document_problems(app: FastAPI) -> None:
    """Makes the OpenAPI document say what the API does: every 4xx and 5xx is a problem.

    FastAPI documents only its own 422 body (`HTTPValidationError`), which this API never
    sends; a client generated from that document would mis-parse every error.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        document = FastAPI.openapi(app)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas["Problem"] = PROBLEM_SCHEMA
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for path_item in document.get("paths", {}).values():
            for operation in path_item.values():
                responses = operation.setdefault("responses", {})
                if "422" in responses and _refuses_as_invalid(operation):
                    responses["422"] = problem_response_doc("Invalid request or audio")
                else:  # FastAPI adds it wherever there are parameters
                    responses.pop("422", None)
                responses["4XX"] = problem_response_doc("Refused; see `code`")
                responses["5XX"] = problem_response_doc("Unavailable or failed; see `code`")
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]


# starlette.formparsers.MultiPartParser's words for a non-file part over `max_part_size`.
_OVERSIZED_FIELD = re.compile(r"(Part|Field) exceeded maximum size")


def _allowed_methods(request: Request) -> list[str]:
    """Every method the API document gives this path (a path can have a route per method)."""
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        if re.fullmatch(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)), request.url.path):
            methods |= {method.upper() for method in operations}
    return sorted(methods)


def install_problem_handlers(app: FastAPI) -> None:
    """Every error the app can raise becomes a problem; the OpenAPI document says so."""
    document_problems(app)

    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ProblemError)
        retry_after = exc.extra.get("retry_after_s")
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return problem_response(
            exc.status, exc.code, exc.detail, request.url.path, headers=headers, **exc.extra
        )

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400 and _OVERSIZED_FIELD.match(str(exc.detail)):
            # Starlette's multipart parser refuses a form field over 1 MB before validation
            # would: the same answer as a field over its (smaller) declared length.
            return problem_response(
                422,
                "invalid_request",
                f"a form field is longer than its limit ({exc.detail})",
                request.url.path,
            )
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        headers = exc.headers
        if exc.status_code == 405:
            # Starlette's `Allow` names the methods of the first route on the path only.
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        return problem_response(
            exc.status_code, code, str(exc.detail), request.url.path, headers=headers
        )

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        if errors and all(e["loc"][:1] == ["path"] for e in errors):
            # A malformed id in the path names nothing, as an unknown one: 404.
            name = errors[0]["loc"][-1]
            thing = name.removesuffix("_id")
            return problem_response(
                404, f"{thing}_not_found", f"no such {thing}", request.url.path, errors=errors
            )
        detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors)
        return problem_response(422, "invalid_request", detail, request.url.path, errors=errors)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        if (dependency := unreachable_dependency(exc)) is not None:
            log.warning(
                "%s unreachable on %s %s: %r", dependency, request.method, request.url.path, exc
            )
            name = dependency.replace("_", " ")
            return problem_response(
                503,
                f"{dependency}_unavailable",
                f"the {name} is unreachable; retry shortly",
                request.url.path,
                headers={"Retry-After": "5"},
                retry_after_s=5,
            )
        # The client learns nothing of the cause; the log keeps all of it.
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return problem_response(500, "internal_error", "unexpected error", request.url.path)

    app.add_exception_handler(ProblemError, on_problem)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(Exception, on_unexpected)
