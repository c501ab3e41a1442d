"""The schema's migrations on a real PostgreSQL, with rows written by an older revision."""

from __future__ import annotations

import asyncio
import json
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from alembic import command

from tests.conftest import PG_ADMIN_URL

pytestmark = pytest.mark.integration

SHA = "ab" * 32


async def _rows(url: str, sql: str) -> list[dict[str, object]]:
    con = await asyncpg.connect(url)
    try:
        return [dict(r) for r in await con.fetch(sql)]
    finally:
        await con.close()


def test_a_url_encoded_password_with_a_percent_sign_migrates(empty_database_url: str) -> None:
    """Generated passwords need URL-encoding (`p@ss/w%rd` is `p%40ss%2Fw%25rd`); the `%`
    must reach the driver, not Alembic's ConfigParser interpolation. (The test server
    trusts loopback, so any password connects: what is checked is that one gets there.)"""
    from voicejury_gateway.migrate import schema_head, upgrade

    admin = urlsplit(PG_ADMIN_URL)
    netloc = f"{admin.username}:p%40ss%2Fw%25rd@{admin.hostname}:{admin.port or 5432}"
    url = urlunsplit(admin._replace(netloc=netloc, path=urlsplit(empty_database_url).path))
    upgrade(url)
    versions = asyncio.run(_rows(url, "SELECT version_num FROM alembic_version"))
    assert versions == [{"version_num": schema_head().head}]


def test_references_of_revision_0003_keep_their_state_through_0004_and_back(
    database_url: str,
) -> None:
    from voicejury_gateway.migrate import alembic_config

    config = alembic_config(database_url)
    command.downgrade(config, "0003")
    prep = uuid.uuid4()
    audio = {"kind": "mix", "original": {"sha256": SHA}}
    vocals = {"kind": "vocals", "original": {"sha256": SHA}}

    async def legacy() -> None:
        con = await asyncpg.connect(database_url)
        sql = (
            "INSERT INTO song_references (tenant, id, sha256, preparation_id, audio, status, "
            "error_code, error_message, prepared_at) VALUES ($1, 'ref_x', $2, $3, $4::jsonb, "
            "$5, $6, $7, CASE WHEN $5 = 'ready' THEN now() END)"
        )
        await con.execute(sql, "a", SHA, prep, json.dumps(audio), "ready", None, None)
        await con.execute(sql, "b", SHA, prep, json.dumps(audio), "ready", None, None)
        await con.execute(sql, "c", SHA, prep, json.dumps(vocals), "failed", "invalid_audio", "x")
        await con.close()

    asyncio.run(legacy())
    command.upgrade(config, "head")
    preparations = asyncio.run(
        _rows(database_url, "SELECT * FROM reference_preparations ORDER BY kind")
    )
    assert [(p["kind"], p["status"], p["steps_done"]) for p in preparations] == [
        ("mix", "ready", ["separator"]),  # separated before; contour and words at first job
        ("vocals", "failed", []),
    ]
    assert preparations[0]["preparation_id"] == prep  # in-flight events still match
    assert preparations[1]["preparation_id"] != prep
    assert preparations[1]["error_stage"] == "separator"

    command.downgrade(config, "0003")
    back = asyncio.run(
        _rows(database_url, "SELECT tenant, status, error_code FROM song_references ORDER BY 1")
    )
    assert back == [
        {"tenant": "a", "status": "ready", "error_code": None},
        {"tenant": "b", "status": "ready", "error_code": None},
        {"tenant": "c", "status": "failed", "error_code": "invalid_audio"},
    ]
    command.upgrade(config, "head")


def test_preparations_of_revision_0005_take_their_first_references_transcript_need(
    database_url: str,
) -> None:
    from voicejury_gateway.migrate import alembic_config

    config = alembic_config(database_url)
    command.downgrade(config, "0005")
    prep = uuid.uuid4()
    audio = json.dumps({"kind": "mix", "original": {"sha256": SHA}})

    async def legacy() -> None:
        con = await asyncpg.connect(database_url)
        sql = (
            "INSERT INTO song_references (tenant, id, sha256, audio, lyrics, language, "
            "created_at) VALUES ($1, 'ref_x', $2, $3::jsonb, $4, $5, now() + $6 * interval '1s')"
        )
        await con.execute(sql, "first", SHA, audio, None, "fr", 0)  # announced it
        await con.execute(sql, "same", SHA, audio, None, "fr", 1)
        await con.execute(sql, "lyrics", SHA, audio, "la la", "fr", 2)
        await con.execute(
            "INSERT INTO reference_preparations (sha256, kind, preparation_id, status, "
            "steps_done, prepared_at) VALUES ($1, 'mix', $2, 'ready', "
            "'{asr,pitch,separator}', now())",
            SHA,
            prep,
        )
        await con.close()

    asyncio.run(legacy())
    command.upgrade(config, "head")
    refs = asyncio.run(
        _rows(
            database_url,
            "SELECT r.tenant, r.transcript, p.status FROM song_references r "
            "LEFT JOIN reference_preparations p ON p.sha256 = r.sha256 "
            "AND p.kind = r.audio->>'kind' AND p.transcript = r.transcript ORDER BY 1",
        )
    )
    assert refs == [
        {"tenant": "first", "transcript": "fr", "status": "ready"},
        {"tenant": "lyrics", "transcript": "none", "status": None},  # reads not prepared
        {"tenant": "same", "transcript": "fr", "status": "ready"},
    ]

    async def second_preparation() -> None:
        con = await asyncpg.connect(database_url)
        await con.execute(
            "INSERT INTO reference_preparations (sha256, kind, transcript, preparation_id, "
            "status) VALUES ($1, 'mix', 'none', $2, 'preparing')",
            SHA,
            uuid.uuid4(),
        )
        await con.close()

    asyncio.run(second_preparation())
    command.downgrade(config, "0005")  # one per audio and kind again: the ready one
    back = asyncio.run(
        _rows(database_url, "SELECT preparation_id, status FROM reference_preparations")
    )
    assert back == [{"preparation_id": prep, "status": "ready"}]
    command.upgrade(config, "head")
