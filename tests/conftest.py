"""Shared fixtures: real infrastructure (nats-server, PostgreSQL, an S3 server), never fakes.

Every test gets its own namespace (stream, consumers, KV buckets), bucket and database, so
tests never see each other's messages or rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from voicejury_contracts import AudioInput, ObjectRef, ReferenceSubmitted, Role, SourceKind

# `delete_namespace`: a test's streams and KV buckets off the shared nats-server, as a
# stopped `LocalStack` removes its own (imported here by the tests).
from voicejury_devstack.stack import delete_namespace as delete_namespace
from voicejury_devstack.stack import find_repo_root

REPO = find_repo_root(Path(__file__))
SHARED = REPO.parent / "shared"
AUDIO = SHARED / "data" / "audio"
MODELS = SHARED / "models"
NATS_URL = os.environ.get("VJ_TEST_NATS_URL", "nats://127.0.0.1:4222")
PG_ADMIN_URL = os.environ.get("VJ_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def pytest_sessionstart(session: pytest.Session) -> None:
    # Without ../shared most tests would fail one by one on a missing file, and the
    # scorer's would have nothing to measure: one clear refusal instead, never a skip.
    missing = [
        path for path in (AUDIO, MODELS, SHARED / "data" / "mastmelody-dev") if not path.is_dir()
    ]
    if missing:
        raise pytest.UsageError(
            f"the shared test data is missing ({', '.join(map(str, missing))}): the tests read "
            "real singing and the model stand-ins from ../shared, beside the repository "
            "(see README, 'Models')"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's standalone S3 server on loopback (talked to through the real `minio` client)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:10]


async def pg_admin(sql: str) -> None:
    """Runs one statement (CREATE/DROP DATABASE) as the test server's administrator."""
    con = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await con.execute(sql)
    finally:
        await con.close()


@contextlib.contextmanager
def scratch_database(name: str) -> Iterator[str]:
    """A new, empty database (no schema, as a cluster's is before the gateway-migrate Job
    runs), dropped afterwards; yields its URL. For synchronous tests and fixtures."""
    asyncio.run(pg_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        asyncio.run(pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def empty_database_url(namespace: str) -> Iterator[str]:
    """A fresh database without the schema (see `scratch_database`)."""
    with scratch_database(f"vj_{namespace}") as url:
        yield url


@pytest.fixture
async def database_url(namespace: str) -> AsyncIterator[str]:
    """A fresh database with the schema applied by the real migrations."""
    from voicejury_gateway.migrate import upgrade

    name = f"vj_{namespace}"
    await pg_admin(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        await asyncio.to_thread(upgrade, url)
        yield url
    finally:
        await pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def base_env(namespace: str, s3_endpoint: str) -> dict[str, str]:
    """Settings every VoiceJury process of a test reads (as environment variables)."""
    return {
        "VJ_NATS_URL": NATS_URL,
        "VJ_NAMESPACE": namespace,
        "VJ_S3_ENDPOINT": s3_endpoint,
        "VJ_S3_ACCESS_KEY": "test",
        "VJ_S3_SECRET_KEY": "test",
        "VJ_S3_BUCKET": f"vj-{namespace}",
        "VJ_LOG_JSON": "false",
    }


@pytest.fixture
def env(base_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key, value in base_env.items():
        monkeypatch.setenv(key, value)
    return base_env


def reference_submitted() -> ReferenceSubmitted:
    """A small valid event for a stage's consumer (the separator's), pointing at no real
    object: for tests of the runtime and the bus, whose handlers never read it."""
    original = ObjectRef(
        bucket="vj-test",
        key="references/x/original.wav",
        sha256="0" * 64,
        size=1,
        content_type="audio/wav",
    )
    audio = AudioInput(
        role=Role.REFERENCE,
        kind=SourceKind.VOCALS,
        original=original,
        duration_s=1.0,
        sample_rate=16_000,
        channels=1,
    )
    return ReferenceSubmitted(job_id=uuid.uuid4(), reference=audio, transcribe=False)


async def keep_every_message(nats_url: str, namespace: str) -> None:
    """A durable consumer of the whole job stream that never takes a message: under the
    stream's interest retention it keeps everything published, so that a test can count
    what each stage published (the stream itself keeps only the work in flight)."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().add_consumer(
            f"{namespace.upper()}_JOBS",
            config=ConsumerConfig(
                durable_name=f"{namespace}-audit",
                filter_subject=f"{namespace}.>",
                ack_policy=AckPolicy.EXPLICIT,
            ),
        )
    finally:
        await nc.close()
