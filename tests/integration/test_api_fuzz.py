"""Property-based fuzzing of the REST API from its own OpenAPI document (schemathesis).

Every operation gets generated requests, valid and invalid, against the real gateway
(PostgreSQL, nats-server, S3). Most carry a real API key and most valid job ids are replaced
by a real job (a cancelled one, so its event stream ends), so the fuzzer gets past 401 and
404. Pass criterion: never a 5xx, and every response matches what the document declares.

Random generation does not reach int64 boundaries of parameters without a declared maximum
(`Last-Event-ID`): `test_hostile_inputs.py` covers those by hand.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.generation.feedback import FeedbackSources
from schemathesis.pytest._test_builder import build_operation_test
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.audio_fixtures import sung_tone
from tests.conftest import NATS_URL, delete_namespace
from tests.integration.test_gateway_api import api_key, submit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

EXAMPLES = 20
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@pytest.fixture
def fuzzed_gateway(
    env: dict[str, str], database_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    from voicejury_gateway.app import create_app
    from voicejury_gateway.settings import GatewaySettings

    monkeypatch.setenv("VJ_DATABASE_URL", database_url)
    monkeypatch.setenv("VJ_GATEWAY_SSE_KEEPALIVE_S", "0.2")
    # A 5xx must come back as a response the checks can see, not as a test-side exception.
    with TestClient(create_app(GatewaySettings()), raise_server_exceptions=False) as client:
        yield client
    asyncio.run(delete_namespace(NATS_URL, env["VJ_NAMESPACE"]))


@pytest.fixture
def auth(fuzzed_gateway: TestClient) -> dict[str, str]:
    return api_key(fuzzed_gateway, "fuzz")


@pytest.fixture
def known_job(fuzzed_gateway: TestClient, auth: dict[str, str]) -> str:
    """A job of the fuzzing tenant, cancelled so that its SSE stream terminates."""
    r = submit(fuzzed_gateway, auth, sung_tone(), sung_tone())
    assert r.status_code == 202, r.text
    job_id: str = r.json()["job_id"]
    assert fuzzed_gateway.delete(f"/v1/jobs/{job_id}", headers=auth).status_code == 200
    return job_id


def test_no_request_gets_a_server_error_or_an_undeclared_response(
    fuzzed_gateway: TestClient, auth: dict[str, str], known_job: str
) -> None:
    """Every operation: schemathesis' coverage phase (boundary and invalid values of every
    parameter), the document's examples, then `EXAMPLES` random cases; all failures listed.

    Each operation's test is built with `build_operation_test`, as schemathesis' pytest
    plugin does: the plugin's lazy `from_fixture` schema does not run under pytest 9
    (`Function._nodeid`), and the gateway must be a fixture (real PostgreSQL, NATS, S3).
    """
    document = fuzzed_gateway.app.openapi()  # type: ignore[attr-defined]
    schema = schemathesis.openapi.from_dict(document)
    schema.config.phases.update(phases=["examples", "coverage", "fuzzing"])
    results = list(schema.get_all_operations())
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) == len(results) >= 9
    failures: dict[str, str] = {}
    statuses: dict[str, Counter[int]] = {}

    def sender(seen: Counter[int]) -> Callable[[Any, bool, bool], None]:
        def send(case: Any, authorised: bool, use_known_job: bool) -> None:
            if use_known_job and "job_id" in (case.path_parameters or {}):
                case.path_parameters["job_id"] = known_job
            kwargs = case.as_transport_kwargs(
                base_url="http://testserver", headers=auth if authorised else None
            )
            response = fuzzed_gateway.request(**_httpx_kwargs(kwargs))
            response.request.read()  # a multipart body streams; the checks read it back
            seen[response.status_code] += 1
            case.validate_response(response, checks=CHECKS)

        return send

    def at_boundaries(send: Callable[[Any, bool, bool], None]) -> Callable[[Any], None]:
        def send_boundary_case(case: Any) -> None:
            # With the key; a valid job id becomes the real job, an invalid one stays.
            positive = case.meta is None or case.meta.generation.mode is GenerationMode.POSITIVE
            send(case, True, positive)

        return send_boundary_case

    hypothesis_settings = settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    for operation in operations:
        seen = statuses.setdefault(operation.label, Counter())
        # schemathesis adds its coverage cases only to a test without extra @given arguments.
        boundaries = build_operation_test(
            config=schema.config,
            operation=operation,
            test_func=at_boundaries(sender(seen)),
            given_kwargs={},
            feedback=FeedbackSources(),
            explicit_settings=settings(hypothesis_settings, phases=[Phase.explicit]),
        )
        random = build_operation_test(
            config=schema.config,
            operation=operation,
            test_func=sender(seen),
            # Mostly with the key and the known job, so most cases get past 401 and 404.
            given_kwargs={
                "authorised": st.sampled_from([True, True, True, False]),
                "use_known_job": st.sampled_from([True, True, False]),
            },
            feedback=FeedbackSources(),
            explicit_settings=hypothesis_settings,
        )
        for test in (boundaries, random):
            try:
                test()
            except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup
                failures.setdefault(operation.label, str(exc))
    assert not failures, "\n\n".join(f"{label}: {text}" for label, text in failures.items())
    # The fuzzer got past authentication everywhere, and into real jobs.
    for label, seen in statuses.items():
        assert set(seen) - {401}, (label, seen)
    assert statuses["GET /v1/jobs/{job_id}/events"][200] > 0
    # Typed bodies were checked against their schemas (`response_schema_conformance`).
    for label in ("GET /v1/jobs/{job_id}", "DELETE /v1/jobs/{job_id}", "GET /v1/jobs"):
        assert statuses[label][200] > 0, (label, statuses[label])


def _httpx_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """schemathesis serialises for `requests`; httpx takes raw bytes as `content`, and
    multipart parts as bytes or str only (negative cases put numbers and null there)."""
    keep = ("method", "url", "headers", "params", "json", "cookies")
    out = {k: v for k, v in kwargs.items() if k in keep and v is not None}
    out["follow_redirects"] = False  # a 307 to a presigned URL is the answer, not a hop
    data = kwargs.get("data")
    if isinstance(data, bytes | str):
        out["content"] = data
    elif data is not None:
        out["data"] = data
    if files := kwargs.get("files"):
        out["files"] = [(name, _part(part)) for name, part in files]
    return out


def _part(part: Any) -> Any:
    if not isinstance(part, tuple):
        return part if isinstance(part, bytes | str) else json.dumps(part)
    filename, content, *rest = part
    if not isinstance(content, bytes | str):
        content = json.dumps(content)
    return (filename, content, *rest)
