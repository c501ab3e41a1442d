"""The fingerprint of the request an Idempotency-Key stood for.

A retry with the same key must be the same request: the same files (by sha256) and the
same fields. Another request under a used key is refused (422 `idempotency_key_reused`)
instead of being answered with the first request's job. Jobs recorded before this column
have no fingerprint and are replayed as before.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-22
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE jobs ADD COLUMN request_sha256 text")


def downgrade() -> None:
    op.execute("ALTER TABLE jobs DROP COLUMN request_sha256")
