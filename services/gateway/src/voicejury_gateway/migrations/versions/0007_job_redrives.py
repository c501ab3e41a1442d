"""How many times the reconciler re-drove a job that stopped moving.

A job idle past the stall timeout, with no backlog at the stage it waits on, has lost an
event (a broker that lost acknowledged writes, a consumer deleted by hand). The gateway
sends its `JobSubmitted` again, marked as a re-drive: each stage that already did its part
sends the same outputs again, and the stage that lost its input runs. `redrives` counts
those attempts; past the configured bound the job is failed with `job_stalled`.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE jobs ADD COLUMN redrives integer NOT NULL DEFAULT 0 CHECK (redrives >= 0)"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE jobs DROP COLUMN redrives")
