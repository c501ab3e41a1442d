"""Reference songs prepared ahead of jobs (`POST /v1/references`), content-addressed.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # "references" is an SQL keyword; the table is song_references.
    op.execute(
        """
        CREATE TABLE song_references (
            tenant          text NOT NULL,
            id              text NOT NULL,
            sha256          text NOT NULL,
            preparation_id  uuid NOT NULL,
            audio           jsonb NOT NULL,
            title           text,
            artist          text,
            lyrics          text,
            language        text,
            status          text NOT NULL CHECK (status IN ('preparing', 'ready', 'failed')),
            error_code      text,
            error_message   text,
            created_at      timestamptz NOT NULL DEFAULT now(),
            prepared_at     timestamptz,
            PRIMARY KEY (tenant, id)
        )
        """
    )
    op.execute("CREATE INDEX song_references_preparation ON song_references (preparation_id)")


def downgrade() -> None:
    op.execute("DROP TABLE song_references")
