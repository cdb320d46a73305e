"""Each volume's newest Ready and newest Failed backup in ``volume_backup_summary``, kept by
triggers, so the protection overview (GET /v1/overview) reads one row per volume instead of two
index probes into 100,000s of backups.

The triggers fire on every insert and delete of a volume backup that is Ready or Failed and on
every change of a volume backup's status, createDate, volumeUuid or uuid that involves those two
statuses, whichever code (or plain SQL) makes it, and recompute the volume's row from its backups
(two index probes on ``ix_volume_backup_volume_status_date``). A volume with neither has no row.
On PostgreSQL the recomputation first takes a transaction advisory lock on the volume, so that
two transactions changing one volume's backups at once compute in turn, the second seeing what
the first committed (under READ COMMITTED each statement after the lock gets a fresh snapshot);
SQLite runs one writer at a time. On SQLite a migration that rebuilds ``volume_backup``
(``batch_alter_table`` copies the table) drops these triggers: such a migration creates them
again (``_sqlite()`` here), or the summary test on SQLite fails.

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

STATUSES = "('Ready', 'Failed')"


def _refill(volume: str) -> list[str]:
    """The statements that rewrite ``volume``'s summary row (``volume``: an SQL expression)."""

    def newest(status: str, column: str) -> str:
        return (
            f'(SELECT b."{column}" FROM volume_backup b WHERE b."volumeUuid" = {volume} AND b.status = \'{status}\''
            ' ORDER BY b."createDate" DESC, b.uuid DESC LIMIT 1)'
        )

    return [
        f'DELETE FROM volume_backup_summary WHERE "volumeUuid" = {volume}',
        'INSERT INTO volume_backup_summary ("volumeUuid", "readyUuid", "readyDate", "failedUuid", "failedDate")'
        f" SELECT {volume}, {newest('Ready', 'uuid')}, {newest('Ready', 'createDate')},"
        f" {newest('Failed', 'uuid')}, {newest('Failed', 'createDate')}"
        f' WHERE EXISTS (SELECT 1 FROM volume_backup b WHERE b."volumeUuid" = {volume} AND b.status IN {STATUSES})',
    ]


def _changed(distinct: str) -> str:
    """When an update can move a summary: what it is computed from changed, and the old or the
    new row is Ready or Failed (``distinct``: the dialect's null-safe "differs")."""
    columns = ("status", '"createDate"', '"volumeUuid"', "uuid")
    differs = " OR ".join(f"OLD.{c} {distinct} NEW.{c}" for c in columns)
    return f"({differs}) AND (OLD.status IN {STATUSES} OR NEW.status IN {STATUSES})"


UPDATED_COLUMNS = 'status, "createDate", "volumeUuid", uuid'


def _postgresql() -> None:
    body = ";\n    ".join(_refill("v"))
    op.execute(
        f"""
CREATE FUNCTION volume_backup_summary_refill(v text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('volume_backup_summary/' || v, 0));
    {body};
END $$"""
    )
    op.execute(
        """
CREATE FUNCTION volume_backup_summary_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM volume_backup_summary_refill(OLD."volumeUuid");
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW."volumeUuid" IS DISTINCT FROM OLD."volumeUuid") THEN
        PERFORM volume_backup_summary_refill(NEW."volumeUuid");
    END IF;
    RETURN NULL;
END $$"""
    )
    op.execute(
        f"CREATE TRIGGER volume_backup_summary_insert AFTER INSERT ON volume_backup"
        f" FOR EACH ROW WHEN (NEW.status IN {STATUSES}) EXECUTE FUNCTION volume_backup_summary_trigger()"
    )
    op.execute(
        f"CREATE TRIGGER volume_backup_summary_delete AFTER DELETE ON volume_backup"
        f" FOR EACH ROW WHEN (OLD.status IN {STATUSES}) EXECUTE FUNCTION volume_backup_summary_trigger()"
    )
    op.execute(
        f"CREATE TRIGGER volume_backup_summary_update AFTER UPDATE OF {UPDATED_COLUMNS} ON volume_backup"
        f" FOR EACH ROW WHEN ({_changed('IS DISTINCT FROM')}) EXECUTE FUNCTION volume_backup_summary_trigger()"
    )


def _sqlite() -> None:
    def trigger(name: str, event: str, when: str, volumes: list[str]) -> None:
        statements = "".join(f"    {s};\n" for volume in volumes for s in _refill(volume))
        op.execute(
            f"CREATE TRIGGER {name} AFTER {event} ON volume_backup FOR EACH ROW WHEN {when}\nBEGIN\n{statements}END"
        )

    trigger("volume_backup_summary_insert", "INSERT", f"NEW.status IN {STATUSES}", ['NEW."volumeUuid"'])
    trigger("volume_backup_summary_delete", "DELETE", f"OLD.status IN {STATUSES}", ['OLD."volumeUuid"'])
    # both volumes (the same one twice when it did not change: the second pass finds the first's row)
    trigger(
        "volume_backup_summary_update",
        f"UPDATE OF {UPDATED_COLUMNS}",
        _changed("IS NOT"),
        ['OLD."volumeUuid"', 'NEW."volumeUuid"'],
    )


def upgrade() -> None:
    op.create_table(
        "volume_backup_summary",
        sa.Column("volumeUuid", sa.String(length=32), primary_key=True),
        sa.Column("readyUuid", sa.String(length=32), nullable=True),
        sa.Column("readyDate", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failedUuid", sa.String(length=32), nullable=True),
        sa.Column("failedDate", sa.DateTime(timezone=True), nullable=True),
    )
    if op.get_bind().dialect.name == "postgresql":
        _postgresql()
    else:
        _sqlite()
    # the rows of the backups there are now, as the triggers would have written them
    op.execute(
        'INSERT INTO volume_backup_summary ("volumeUuid") SELECT DISTINCT "volumeUuid" FROM volume_backup'
        f" WHERE status IN {STATUSES}"
    )
    newest = {
        column: (
            f'(SELECT b."{source}" FROM volume_backup b WHERE b."volumeUuid" = volume_backup_summary."volumeUuid"'
            f" AND b.status = '{status}' ORDER BY b.\"createDate\" DESC, b.uuid DESC LIMIT 1)"
        )
        for column, source, status in (
            ("readyUuid", "uuid", "Ready"),
            ("readyDate", "createDate", "Ready"),
            ("failedUuid", "uuid", "Failed"),
            ("failedDate", "createDate", "Failed"),
        )
    }
    op.execute("UPDATE volume_backup_summary SET " + ", ".join(f'"{c}" = {e}' for c, e in newest.items()))


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    for name in ("insert", "delete", "update"):
        op.execute(f"DROP TRIGGER IF EXISTS volume_backup_summary_{name}" + (" ON volume_backup" if postgresql else ""))
    if postgresql:
        op.execute("DROP FUNCTION IF EXISTS volume_backup_summary_trigger()")
        op.execute("DROP FUNCTION IF EXISTS volume_backup_summary_refill(text)")
    op.drop_table("volume_backup_summary")
