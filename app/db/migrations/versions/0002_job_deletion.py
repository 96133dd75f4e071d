"""Job deletion: tombstone columns (deleted_at, purged_at) and the reaper's two indexes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03

Both columns are nullable, so existing rows need no backfill (every job is live). SQLite
runs the batch in ``recreate="never"`` mode: plain ``ALTER TABLE ADD/DROP COLUMN`` (SQLite
3.35+), never the copy-and-rename that batch mode otherwise uses, because dropping the old
``jobs`` table with foreign keys on would cascade-delete every artifact row.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", recreate="never") as batch:
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_jobs_retention", "jobs", ["deleted_at", "finished_at"])
    op.create_index("ix_jobs_unpurged", "jobs", ["purged_at", "deleted_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_unpurged", table_name="jobs")
    op.drop_index("ix_jobs_retention", table_name="jobs")
    with op.batch_alter_table("jobs", recreate="never") as batch:
        batch.drop_column("purged_at")
        batch.drop_column("deleted_at")
