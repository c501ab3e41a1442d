"""A reference's preparation has three steps (separation, pitch contour, transcript).

`steps_done` lists the stages that announced their part; the reference is ready once all
three have. `updated_at` moves with every step, so a preparation that stopped moving can
be failed; `error_stage` names the stage that failed it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE song_references
            ADD COLUMN steps_done  text[] NOT NULL DEFAULT '{}',
            ADD COLUMN error_stage text,
            ADD COLUMN updated_at  timestamptz NOT NULL DEFAULT now()
        """
    )
    # Prepared before this revision: separated only (contour and transcript were cached
    # by their first job). They stay ready.
    op.execute("UPDATE song_references SET steps_done = '{separator}' WHERE status = 'ready'")
    op.execute("UPDATE song_references SET error_stage = 'separator' WHERE error_code IS NOT NULL")
    op.execute(
        "CREATE INDEX song_references_preparing ON song_references (updated_at) "
        "WHERE status = 'preparing'"
    )


def downgrade() -> None:
    op.execute("DROP INDEX song_references_preparing")
    op.execute(
        "ALTER TABLE song_references DROP COLUMN steps_done, DROP COLUMN error_stage, "
        "DROP COLUMN updated_at"
    )
