"""The object store against a real S3 server (moto), through the `minio` client."""

from __future__ import annotations

import asyncio
import time

import pytest

from voicejury_runtime.settings import CommonSettings
from voicejury_runtime.store import ObjectStore

pytestmark = pytest.mark.integration


async def test_a_cache_entry_in_use_restarts_its_age_and_keeps_its_checksum(
    env: dict[str, str],
) -> None:
    """The cache retention sweeps by age: an entry reused every day must not go on the
    day it turns the retention's age, under the jobs that are reading it."""
    store = ObjectStore(CommonSettings())
    await store.ensure_bucket()
    key = "cache/separations/abc/vocals.wav"
    written = await store.put_bytes(key, b"RIFF stems", "audio/wav")
    await asyncio.sleep(1.5)
    # Not due yet: left as it is.
    assert await store.reuse(key, refresh_after_s=3600) == written
    assert await store.delete_prefix("cache/", older_than_s=1) == 1  # unused 1.5 s: swept
    assert await store.stat(key) is None
    written = await store.put_bytes(key, b"RIFF stems", "audio/wav")
    await asyncio.sleep(1.5)
    started = time.monotonic()
    assert await store.reuse(key, refresh_after_s=1) == written  # due: its age restarts
    assert time.monotonic() - started < 10
    assert await store.delete_prefix("cache/", older_than_s=1) == 0  # young again: kept
    assert await store.stat(key) == written  # same checksum, type and size
    assert await store.get_bytes(written) == b"RIFF stems"
    assert await store.reuse("cache/none", refresh_after_s=0) is None
