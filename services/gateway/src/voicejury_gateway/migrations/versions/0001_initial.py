"""Jobs, their stages, their event log (the SSE source of truth), results and API keys.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


_SCHEMA = """
CREATE TABLE api_keys (
    key_sha256  text PRIMARY KEY,
    tenant      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE jobs (
    id               uuid PRIMARY KEY,
    tenant           text NOT NULL,
    status           text NOT NULL CHECK (status IN
                       ('queued', 'running', 'completed', 'failed', 'cancelled')),
    progress         real NOT NULL DEFAULT 0,
    options          jsonb NOT NULL,
    inputs           jsonb NOT NULL,
    idempotency_key  text,
    error_code       text,
    error_message    text,
    error_stage      text,
    event_seq        integer NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    UNIQUE (tenant, idempotency_key)
);
CREATE INDEX jobs_tenant_created ON jobs (tenant, created_at DESC, id);
CREATE INDEX jobs_active ON jobs (status, updated_at) WHERE status IN ('queued', 'running');

CREATE TABLE job_stages (
    job_id       uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    stage        text NOT NULL,
    status       text NOT NULL CHECK (status IN
                   ('pending', 'running', 'completed', 'failed', 'skipped', 'cancelled')),
    progress     real NOT NULL DEFAULT 0,
    attempts     integer NOT NULL DEFAULT 0,
    started_at   timestamptz,
    finished_at  timestamptz,
    details      jsonb,
    PRIMARY KEY (job_id, stage)
);

-- Per-job gapless sequence: `seq` is the SSE event id. Rows of one job are written
-- under the job's row lock, so they commit in `seq` order and a reader that has seen
-- seq N never later finds a smaller one.
CREATE TABLE job_events (
    job_id      uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq         integer NOT NULL,
    type        text NOT NULL,
    data        jsonb NOT NULL,
    source_id   text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, seq),
    UNIQUE (job_id, source_id)
);

CREATE TABLE job_results (
    job_id      uuid PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    result      jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
)
"""


def upgrade() -> None:
    # One statement per call: asyncpg prepares each, and prepared statements hold one.
    for statement in _SCHEMA.split(";\n"):
        if statement.strip():
            op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE job_results, job_events, job_stages, jobs, api_keys")
