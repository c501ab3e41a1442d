"""Track when a finished job's event log was compacted (its progress reports deleted).

A job writes some twenty progress reports; once it has ended, they only replay a progress
bar nobody watches. The housekeeper deletes them `VJ_GATEWAY_EVENT_LOG_RETENTION_S` after
the job ended and marks the job here; its stage and terminal events stay, so its stream
still replays what happened and ends as it did. The partial index finds the jobs due
without reading the compacted ones again.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE jobs ADD COLUMN events_compacted_at timestamptz")
    op.execute(
        "CREATE INDEX jobs_event_log_compaction ON jobs (finished_at) "
        "WHERE events_compacted_at IS NULL AND finished_at IS NOT NULL"
    )


def downgrade() -> None:
    op.execute("DROP INDEX jobs_event_log_compaction")
    op.execute("ALTER TABLE jobs DROP COLUMN events_compacted_at")
