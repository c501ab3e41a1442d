"""Track when a job's audio was deleted (cancellation or retention), results stay.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE jobs ADD COLUMN audio_deleted_at timestamptz")
    op.execute(
        "CREATE INDEX jobs_audio_expiry ON jobs (finished_at) "
        "WHERE audio_deleted_at IS NULL AND finished_at IS NOT NULL"
    )


def downgrade() -> None:
    op.execute("DROP INDEX jobs_audio_expiry")
    op.execute("ALTER TABLE jobs DROP COLUMN audio_deleted_at")
