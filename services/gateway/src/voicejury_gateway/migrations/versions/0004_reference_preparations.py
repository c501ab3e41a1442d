"""A reference's preparation becomes its own record, one per distinct audio and kind,
with three steps (separation, pitch contour, transcript) and attempts.

`reference_preparations` holds what used to be copied onto every tenant's row of the same
audio (status, error, prepared_at): each tenant's `song_references` row now points to it by
content hash and kind. `steps_done` lists the stages that announced their part; the
preparation is ready once all three have. `updated_at` moves with every step and every
progress report, so a preparation that stopped moving can be failed; `error_stage` names
the stage that failed it. A failed preparation is tried again (`attempt` + 1, a new
`preparation_id`, so that no deduplication window or cancel flag of the failed attempt
applies) when its audio is uploaded again.

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
        CREATE TABLE reference_preparations (
            sha256          text NOT NULL,
            kind            text NOT NULL CHECK (kind IN ('mix', 'vocals')),
            preparation_id  uuid NOT NULL UNIQUE,
            attempt         integer NOT NULL DEFAULT 1 CHECK (attempt >= 1),
            status          text NOT NULL CHECK (status IN ('preparing', 'ready', 'failed')),
            steps_done      text[] NOT NULL DEFAULT '{}',
            error_code      text,
            error_message   text,
            error_stage     text,
            created_at      timestamptz NOT NULL DEFAULT now(),
            updated_at      timestamptz NOT NULL DEFAULT now(),
            prepared_at     timestamptz,
            PRIMARY KEY (sha256, kind)
        )
        """
    )
    # Prepared before this revision: separated only (contour and transcript were cached by
    # their first job); they stay ready.
    op.execute(
        """
        INSERT INTO reference_preparations (sha256, kind, preparation_id, status, steps_done,
            error_code, error_message, error_stage, created_at, prepared_at)
        SELECT DISTINCT ON (sha256, audio->>'kind') sha256, audio->>'kind',
               CASE audio->>'kind' WHEN 'mix' THEN preparation_id
                    ELSE md5(preparation_id::text || '/vocals')::uuid END,
               status,
               CASE WHEN status = 'ready' THEN '{separator}'::text[] ELSE '{}' END,
               error_code, error_message,
               CASE WHEN error_code IS NOT NULL THEN 'separator' END,
               created_at, prepared_at
        FROM song_references
        ORDER BY sha256, audio->>'kind', status = 'ready' DESC, created_at
        """
    )
    op.execute(
        "CREATE INDEX reference_preparations_preparing ON reference_preparations (updated_at) "
        "WHERE status = 'preparing'"
    )
    op.execute("DROP INDEX song_references_preparation")
    op.execute(
        "ALTER TABLE song_references DROP COLUMN preparation_id, DROP COLUMN status, "
        "DROP COLUMN error_code, DROP COLUMN error_message, DROP COLUMN prepared_at"
    )


def downgrade() -> None:
    op.execute(
        """
        ALTER TABLE song_references
            ADD COLUMN preparation_id uuid,
            ADD COLUMN status text NOT NULL DEFAULT 'preparing'
                CHECK (status IN ('preparing', 'ready', 'failed')),
            ADD COLUMN error_code text,
            ADD COLUMN error_message text,
            ADD COLUMN prepared_at timestamptz
        """
    )
    op.execute(
        """
        UPDATE song_references r SET preparation_id = p.preparation_id, status = p.status,
            error_code = p.error_code, error_message = p.error_message,
            prepared_at = p.prepared_at
        FROM reference_preparations p
        WHERE p.sha256 = r.sha256 AND p.kind = r.audio->>'kind'
        """
    )
    op.execute("ALTER TABLE song_references ALTER COLUMN preparation_id SET NOT NULL")
    op.execute("CREATE INDEX song_references_preparation ON song_references (preparation_id)")
    op.execute("DROP TABLE reference_preparations")
