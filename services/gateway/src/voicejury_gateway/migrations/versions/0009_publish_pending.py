"""A job whose first event JetStream has not yet acknowledged; an upload's write-ahead mark.

`jobs.publish_pending`: true from the job's insert until JetStream acknowledges its
`JobSubmitted` (the gateway clears it then, and so does the recorder when the event comes
by). A retry under the job's Idempotency-Key meanwhile gets 409
`idempotency_key_in_flight`, not a 202 for a job that may never run. The default is false
so that rows written by an older gateway during a rolling upgrade (which never set it)
replay as before.

`orphaned_originals.not_before`: the housekeeper leaves an entry alone until then. A
reference upload lists its audio's sha256 here, a few minutes ahead, before it stores the
original, and its transaction drops the entry when the reference is recorded; should the
upload fail in between (the database or the store out of reach), the housekeeper deletes
the original that nothing holds.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE jobs ADD COLUMN publish_pending boolean NOT NULL DEFAULT false")
    op.execute(
        "ALTER TABLE orphaned_originals ADD COLUMN not_before timestamptz NOT NULL DEFAULT now()"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE orphaned_originals DROP COLUMN not_before")
    op.execute("ALTER TABLE jobs DROP COLUMN publish_pending")
