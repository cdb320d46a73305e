"""Notifications: targets (secrets sealed to the row), rules, the events recorded once each,
the conditions that hold now, and the deliveries (the history of what was sent).

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # only INTEGER PRIMARY KEY autoincrements on SQLite


def _stamps() -> list[sa.Column[object]]:
    return [
        sa.Column("createDate", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lastOpDate", sa.DateTime(timezone=True), nullable=False),
    ]


def _resource() -> list[sa.Column[object]]:
    return [
        sa.Column("uuid", sa.String(length=32), primary_key=True),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        *_stamps(),
    ]


def upgrade() -> None:
    op.create_table(
        "notification_target",
        *_resource(),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("options", sa.JSON(), nullable=True),
        sa.Column("sealedSecrets", sa.Text(), nullable=True),
        sa.Column("throttleSeconds", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
    )
    op.create_table(
        "notification_rule",
        *_resource(),
        sa.Column("eventType", sa.String(length=32), nullable=False),
        sa.Column("targetUuids", sa.JSON(), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
    )
    op.create_index("ix_notification_rule_eventType", "notification_rule", ["eventType"])
    op.create_table(
        "notification_event",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("dedupeKey", sa.String(length=255), nullable=False, unique=True),
        sa.Column("resourceUuid", sa.String(length=64), nullable=True),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.Column("dispatched", sa.Boolean(), nullable=False),
        *_stamps(),
    )
    op.create_index("ix_notification_event_kind", "notification_event", ["kind"])
    op.create_index("ix_notification_event_dispatched", "notification_event", ["dispatched"])
    op.create_table(
        "notification_condition",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(length=255), nullable=False, unique=True),
        *_stamps(),
    )
    op.create_table(
        "notification_delivery",
        sa.Column("uuid", sa.String(length=32), primary_key=True),
        sa.Column("targetUuid", sa.String(length=32), nullable=False),
        sa.Column("targetName", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("test", sa.Boolean(), nullable=False),
        sa.Column("eventIds", sa.JSON(), nullable=False),
        sa.Column("eventCount", sa.Integer(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lastError", sa.Text(), nullable=True),
        sa.Column("nextAttemptDate", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sentDate", sa.DateTime(timezone=True), nullable=True),
        *_stamps(),
    )
    op.create_index("ix_notification_delivery_targetUuid", "notification_delivery", ["targetUuid"])
    op.create_index("ix_notification_delivery_target_status", "notification_delivery", ["targetUuid", "status"])


def downgrade() -> None:
    for table in ("notification_delivery", "notification_condition", "notification_event", "notification_rule"):
        op.drop_table(table)
    op.drop_table("notification_target")
