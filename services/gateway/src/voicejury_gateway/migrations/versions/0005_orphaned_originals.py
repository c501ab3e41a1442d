"""Stored reference originals whose last reference was deleted while work still used them.

`DELETE /v1/references/{id}` deletes the stored original (`references/<sha256>/`) with the
last tenant's reference to that audio, but not while a job that was given the reference, or
the audio's preparation, is still running: the original is what they download. Such an
original is listed here; the gateway's housekeeper deletes it once nothing uses it any more
(or drops it from the list when a tenant uploads the same audio again).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE orphaned_originals (
            sha256      text PRIMARY KEY,
            orphaned_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE orphaned_originals")
