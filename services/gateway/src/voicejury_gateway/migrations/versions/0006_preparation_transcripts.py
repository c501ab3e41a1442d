"""A reference's preparation is one per distinct audio, kind and transcript it needs.

Until now the first tenant to upload an audio decided its one preparation's transcript:
with lyrics, none was made; without, one in that tenant's language. Another tenant
uploading the same audio with other needs (no lyrics, or another language) found it
`ready` while its jobs still transcribed the reference at job time.

`song_references.transcript` (generated) names what a reference's jobs need of the
reference's words: `none` (lyrics came with it: the words are judged against them),
`detect` (no lyrics, no language: a transcript in the detected language) or a language
code. A preparation now exists per (audio, kind, transcript); the separation and the
contour are content-addressed caches, so a second preparation of the same audio for
another transcript separates nothing and extracts nothing: it only transcribes.

Existing preparations keep the transcript of the earliest reference to their audio and
kind (whose upload announced them); references of other needs read as not prepared until
uploaded again.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# What a reference's jobs need of its words (see the module's docstring).
_NEED = (
    "CASE WHEN lyrics IS NOT NULL AND lyrics <> '' THEN 'none' "
    "ELSE COALESCE(language, 'detect') END"
)


def upgrade() -> None:
    op.execute(
        f"ALTER TABLE song_references ADD COLUMN transcript text "
        f"GENERATED ALWAYS AS ({_NEED}) STORED"
    )
    op.execute("ALTER TABLE reference_preparations ADD COLUMN transcript text")
    op.execute(
        """
        UPDATE reference_preparations p SET transcript = COALESCE(
            (SELECT r.transcript FROM song_references r
             WHERE r.sha256 = p.sha256 AND r.audio->>'kind' = p.kind
             ORDER BY r.created_at, r.tenant LIMIT 1),
            'detect')
        """
    )
    op.execute(
        "ALTER TABLE reference_preparations "
        "ALTER COLUMN transcript SET NOT NULL, "
        "ADD CONSTRAINT reference_preparations_transcript "
        "CHECK (transcript ~ '^([a-z]{2}|none|detect)$'), "
        "DROP CONSTRAINT reference_preparations_pkey, "
        "ADD PRIMARY KEY (sha256, kind, transcript)"
    )


def downgrade() -> None:
    # One preparation per audio and kind again: the ready one, else the earliest.
    op.execute(
        """
        DELETE FROM reference_preparations p USING (
            SELECT sha256, kind, transcript,
                   row_number() OVER (PARTITION BY sha256, kind
                                      ORDER BY status = 'ready' DESC, created_at,
                                               transcript) AS n
            FROM reference_preparations) ranked
        WHERE ranked.n > 1 AND (p.sha256, p.kind, p.transcript)
            = (ranked.sha256, ranked.kind, ranked.transcript)
        """
    )
    op.execute(
        "ALTER TABLE reference_preparations DROP CONSTRAINT reference_preparations_pkey, "
        "DROP CONSTRAINT reference_preparations_transcript, DROP COLUMN transcript, "
        "ADD PRIMARY KEY (sha256, kind)"
    )
    op.execute("ALTER TABLE song_references DROP COLUMN transcript")
