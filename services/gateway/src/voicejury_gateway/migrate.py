"""Applies the database schema with Alembic (`python -m voicejury_gateway migrate`), and says
which schema revision this code needs (the gateway's readiness)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # An attribute, not the `sqlalchemy.url` main option: main options go through
    # ConfigParser interpolation, where the `%` of a URL-encoded password (p%40ss) is a
    # syntax error, and its message would print the URL, password and all.
    config.attributes["database_url"] = asyncpg_url(database_url)
    return config


def asyncpg_url(database_url: str) -> str:
    scheme, _, rest = database_url.partition("://")
    return f"postgresql+asyncpg://{rest}" if scheme in ("postgresql", "postgres") else database_url


def upgrade(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "head")


@dataclass(frozen=True)
class SchemaHead:
    """The schema revision this code needs (its migrations' head) and every one it ships."""

    head: str
    known: frozenset[str]

    def behind(self, revisions: frozenset[str]) -> bool:
        """Whether a database at `revisions` (its `alembic_version` rows; none: never
        migrated) lacks a migration this code needs.

        A revision this code does not know is a newer release's: the migration job of a
        rollout has run ahead of this (older) replica. That is not "behind": were the old
        replicas all to turn unready at that moment, the Service would have no endpoint
        until the new ones are ready."""
        if self.head in revisions:
            return False
        return not revisions or revisions <= self.known


def schema_head() -> SchemaHead:
    """Read from the migration scripts shipped in this package (once, at startup)."""
    scripts = ScriptDirectory(str(MIGRATIONS))
    head = scripts.get_current_head()
    assert head is not None, f"no migrations in {MIGRATIONS}"
    return SchemaHead(head, frozenset(script.revision for script in scripts.walk_revisions()))
