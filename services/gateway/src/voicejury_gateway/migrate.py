"""Applies the database schema with Alembic (`python -m voicejury_gateway migrate`)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.set_main_option("sqlalchemy.url", asyncpg_url(database_url))
    return config


def asyncpg_url(database_url: str) -> str:
    scheme, _, rest = database_url.partition("://")
    return f"postgresql+asyncpg://{rest}" if scheme in ("postgresql", "postgres") else database_url


def upgrade(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "head")
