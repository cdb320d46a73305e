"""Trigger times in Unix seconds, as ZStack's (issue 19): ``startTime``/``stopTime`` of every
trigger, stored until now in Unix milliseconds, divided by 1000 (rounded down: a trigger fires on
whole seconds). Downgrade multiplies them back.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

COLUMNS = ("startTime", "stopTime")


def upgrade() -> None:
    for column in COLUMNS:
        op.execute(f'UPDATE scheduler_trigger SET "{column}" = "{column}" / 1000 WHERE "{column}" IS NOT NULL')


def downgrade() -> None:
    for column in COLUMNS:
        op.execute(f'UPDATE scheduler_trigger SET "{column}" = "{column}" * 1000 WHERE "{column}" IS NOT NULL')
