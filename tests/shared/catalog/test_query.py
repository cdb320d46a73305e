"""The query language (shared.catalog.query) on SQLite and on PostgreSQL, against one realistic catalog.

Every test runs on both databases: the module-scoped ``db`` fixture is parametrized, and the
PostgreSQL one gets a database of its own (``bv_query_<random>``, dropped at the end). An
unreachable PostgreSQL server fails the tests; it never skips them. Expected answers are
computed in Python from the same dataset the fixture inserts, never written down by hand.
"""

from __future__ import annotations

import os
import re
import secrets
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import event as observe
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, event, func, inspect, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from shared.catalog.models import (
    Account,
    ApiKey,
    BackupStorage,
    Base,
    DatabaseBackup,
    DatabaseBackupStorageRef,
    Host,
    SchedulerJobHistory,
    Tag,
    VmInstance,
    Volume,
    VolumeBackup,
    VolumeBackupStorageRef,
)
from shared.catalog.query import (
    OPERATORS,
    Condition,
    QueryResult,
    QuerySpec,
    parse_condition,
    parse_rest,
    parse_zstack,
    run_query,
)
from shared.errors import InvalidArgument

PG_ADMIN_URL = os.environ.get("BLOCKVAULT_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
T1_MS = int((T0 + timedelta(hours=1)).timestamp() * 1000)  # T0 + 1h in Unix milliseconds
GiB = 1024**3


def uid(prefix: str, number: int) -> str:
    """A 32-character uuid that says what it is: ``vol00...07``."""
    return f"{prefix}{number:0{32 - len(prefix)}d}"


# -- the dataset, as plain dicts keyed by wire names -------------------------------------------------
HOSTS: list[dict[str, Any]] = [
    {"uuid": uid("host", 1), "name": "host-a", "status": "Connected", "lastHeartbeat": T0 + timedelta(hours=1)},
    {"uuid": uid("host", 2), "name": "host-b", "status": "Disconnected", "lastHeartbeat": None},
    {"uuid": uid("host", 3), "name": "host-c", "status": "Connected", "lastHeartbeat": T0 - timedelta(days=1)},
]
VMS: list[dict[str, Any]] = [
    {"uuid": uid("vm", 1), "name": "vm1", "hostUuid": HOSTS[0]["uuid"], "state": "Running", "cpuNum": 4},
    {"uuid": uid("vm", 2), "name": "vm2", "hostUuid": HOSTS[1]["uuid"], "state": "Stopped", "cpuNum": 2},
]
STORAGES: list[dict[str, Any]] = [
    {"uuid": uid("bs", 1), "name": "local", "type": "ImageStore", "role": "master", "credentials": None},
    {"uuid": uid("bs", 2), "name": "remote", "type": "Remote", "role": "standby", "credentials": None},
    {"uuid": uid("bs", 3), "name": "cloud", "type": "PublicCloud", "role": "standby", "credentials": {"key": "s3cr3t"}},
]
BS1, BS2, BS3 = (storage["uuid"] for storage in STORAGES)

VOLUME_NAMES = [
    "vm1-root", "vm1-data", "vm2-root", "db_data", "logs%old", "Big Volume", "x' OR '1'='1", "备份卷",
    "path\\share", "under_score", "underXscore", "UPPER", "upper", "", "emoji🙂",
]  # fmt: skip
VOLUMES: list[dict[str, Any]] = [
    {
        "uuid": uid("vol", i),
        "name": name,
        "description": None if i % 3 == 0 else f"volume {i}",
        "hostUuid": HOSTS[i % 3]["uuid"],
        "vmInstanceUuid": {0: VMS[0]["uuid"], 1: VMS[0]["uuid"], 2: VMS[1]["uuid"]}.get(i),
        "projectUuid": ["p1", "p2", None, "p1"][i % 4],
        "type": "Root" if i in (0, 2) else "Data",
        "format": "qcow2" if i % 2 else "raw",
        "installPath": f"/var/lib/blockvault/vol{i}.img",
        "size": [0, 1, 2, 5, 10, 1024, 3, 3, 7, 1, 1, 4, 4, 8, 6][i] * GiB,
        "status": "Ready" if i % 5 else "Deleting",
        # three volumes share each createDate: the primary key must break the ties
        "createDate": T0 + timedelta(hours=i // 3),
    }
    for i, name in enumerate(VOLUME_NAMES)
]
VOL = [volume["uuid"] for volume in VOLUMES]

BACKUP_STATUSES = ["Ready", "Ready", "Creating", "Failed", "Deleting"]
SPECIAL_BACKUP_NAMES = {3: "nightly_%", 5: "Nightly-A", 7: "x' OR '1'='1"}


def _refs(j: int) -> list[dict[str, Any]]:
    refs: list[dict[str, Any]] = []
    if j % 3 >= 1:
        refs.append({"backupStorageUuid": BS1, "status": "Ready", "installPath": f"zstore://r1/{j:064x}"})
    if j % 3 == 2:
        refs.append(
            {
                "backupStorageUuid": BS2 if j % 4 else BS3,
                "status": "Creating" if j % 2 else "Ready",
                "installPath": None if j % 5 == 2 else f"zstore://r2/{j:064x}",
            }
        )
    return refs


BACKUPS: list[dict[str, Any]] = [
    {
        "uuid": uid("vb", j),
        "name": SPECIAL_BACKUP_NAMES.get(j, f"backup-{j:02d}"),
        "volumeUuid": VOL[j % len(VOL)],
        "mode": "full" if j % 4 == 0 else "incremental",
        "parentUuid": None if j % 4 == 0 else uid("vb", j - 1),
        "groupUuid": "g1".ljust(32, "0") if j < 4 else None,
        "size": (j + 1) * 1000 - 1,
        "status": BACKUP_STATUSES[j % 5],
        "metadata": None if j % 2 else {"md5": f"{j:032x}", "format": "raw"},
        "createDate": T0 + timedelta(minutes=10 * min(j, 10)) + timedelta(minutes=10 * max(j - 11, 0)),
        "refs": _refs(j),
    }
    for j in range(20)
]
VB = [backup["uuid"] for backup in BACKUPS]

DB_BACKUPS: list[dict[str, Any]] = [
    {"uuid": uid("dbb", 0), "name": "db-0", "refs": []},
    {"uuid": uid("dbb", 1), "name": "db-1", "refs": [{"backupStorageUuid": BS1, "status": "Ready"}]},
    {"uuid": uid("dbb", 2), "name": "db-2", "refs": [{"backupStorageUuid": BS2, "status": "Failed"}]},
]

TAGS = [  # (resourceUuid, resourceType, tag, type)
    (VOL[0], "VolumeVO", "prod", "user"),
    (VOL[1], "VolumeVO", "prod", "user"),
    (VOL[1], "VolumeVO", "env::staging", "user"),
    (VOL[2], "VolumeVO", "env::prod", "user"),
    (VOL[3], "VolumeVO", "Prod", "user"),
    (VOL[0], "VolumeVO", "retention::30", "system"),
    (VOL[4], "VolumeVO", "prod", "system"),
    (VB[0], "VolumeBackupVO", "prod", "user"),
    (VB[1], "VolumeBackupVO", "keep", "user"),
    (VB[2], "VolumeBackupVO", "retention::7", "system"),
]

HISTORIES = [
    {"success": k % 2 == 0, "executeTime": T0 + timedelta(days=k), "schedulerJobUuid": uid("job", k % 2)}
    for k in range(6)
]


def tagged(kind: str, predicate: Callable[[str], bool]) -> set[str]:
    return {resource for resource, _, tag, tag_type in TAGS if tag_type == kind and predicate(tag)}


def populate(session: Session) -> None:
    session.add_all(Host(**host) for host in HOSTS)
    session.add_all(VmInstance(**vm) for vm in VMS)
    session.add_all(BackupStorage(url=f"file:///srv/{storage['name']}", **storage) for storage in STORAGES)
    session.flush()
    session.add_all(Volume(**volume) for volume in VOLUMES)
    for backup in BACKUPS:
        fields = {key: value for key, value in backup.items() if key not in ("metadata", "refs")}
        session.add(
            VolumeBackup(
                **fields,
                metadata_=backup["metadata"],
                backupStorageRefs=[VolumeBackupStorageRef(**ref) for ref in backup["refs"]],
            )
        )
    for dbb in DB_BACKUPS:
        refs = [DatabaseBackupStorageRef(**ref) for ref in dbb["refs"]]
        session.add(DatabaseBackup(uuid=dbb["uuid"], name=dbb["name"], backupStorageRefs=refs))
    session.add_all(
        Tag(resourceUuid=resource, resourceType=rtype, tag=tag, type=kind) for resource, rtype, tag, kind in TAGS
    )
    session.add_all(SchedulerJobHistory(**history) for history in HISTORIES)
    session.add(Account(uuid=uid("acc", 1), name="admin", type="SystemAdmin"))
    session.flush()
    session.add(ApiKey(accountUuid=uid("acc", 1), keyHash="f" * 64, name="ci"))
    session.commit()


# -- the databases -------------------------------------------------------------------------------
@dataclass
class Db:
    backend: str
    engine: Engine

    def session(self) -> Session:
        return Session(self.engine)


def _pg_admin() -> Engine:
    """An AUTOCOMMIT engine on the server's ``postgres`` database; fails the test when unreachable."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with admin.connect() as connection:
            connection.execute(text("SELECT 1"))
        return admin
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0]
    admin.dispose()
    pytest.fail(
        f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({reason}): "
        "the query tests need a PostgreSQL server (user postgres, trust auth); they never skip",
        pytrace=False,
    )


def test_postgresql_is_reachable() -> None:
    """Fails, with the reason, when the server is down (the ``db`` fixture errors the same way)."""
    _pg_admin().dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Db]:
    if request.param == "sqlite":
        path: Path = tmp_path_factory.mktemp("catalog") / "catalog.db"
        engine = create_engine(f"sqlite:///{path}")
        Base.metadata.create_all(engine)
        with Session(engine) as session:
            populate(session)
        yield Db("sqlite", engine)
        engine.dispose()
        return
    admin = _pg_admin()
    name = f"bv_query_{secrets.token_hex(6)}"  # generated, so safe to put in DDL
    # C collation: string order is code-point order, as on SQLite, so expected orders are portable.
    with admin.connect() as connection:
        connection.execute(
            text(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'")
        )
    # pre-ping: a test of another process may restart the server between this module's tests
    engine = create_engine(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}", pool_pre_ping=True)
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as session:
            populate(session)
        yield Db("postgresql", engine)
    finally:
        engine.dispose()
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture
def session(db: Db) -> Iterator[Session]:
    with db.session() as session:
        yield session
        session.rollback()


def query(session: Session, model: type[Base], *conditions: str, **params: Any) -> QueryResult:
    """``run_query`` on REST-style parameters (``base`` and ``tag_type_filter`` passed through)."""
    extra = {key: params.pop(key) for key in ("base", "tag_type_filter") if key in params}
    return run_query(session, model, parse_rest(q=list(conditions), **params), **extra)


def uuids(result: QueryResult) -> list[str]:
    return [row.uuid for row in result.rows]


def null_low(value: Any) -> tuple[bool, Any]:
    """Sort key putting None first, as the query language orders nulls."""
    return (value is not None, value)


def ordered(rows: list[dict[str, Any]], *keys: tuple[str, bool], pk: str = "uuid") -> list[Any]:
    """Python's version of an ORDER BY over ``keys`` then the primary key."""
    result = sorted(rows, key=lambda row: row[pk])
    for name, ascending in reversed(keys):
        result.sort(key=lambda row: null_low(row[name]), reverse=not ascending)
    return [row[pk] for row in result]


# -- parsing -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "name", "op", "value"),
    [
        ("size>1000", "size", ">", "1000"),
        ("size>=1000", "size", ">=", "1000"),
        ("size<1000", "size", "<", "1000"),
        ("size<=1000", "size", "<=", "1000"),
        ("name=vm1", "name", "=", "vm1"),
        ("name!=vm1", "name", "!=", "vm1"),
        ("uuid?=a,b", "uuid", "?=", "a,b"),
        ("uuid!?=a,b", "uuid", "!?=", "a,b"),
        ("name~=vm%", "name", "~=", "vm%"),
        ("name!~=vm%", "name", "!~=", "vm%"),
        ("parentUuid is null", "parentUuid", "is null", None),
        ("parentUuid  NOT  NULL", "parentUuid", "not null", None),
        ("parentUuid is not null", "parentUuid", "not null", None),
        ("backupStorageRefs.backupStorageUuid=abc", "backupStorageRefs.backupStorageUuid", "=", "abc"),
        ("backupStorageRefs.status!=Ready", "backupStorageRefs.status", "!=", "Ready"),
        ("__userTag__=prod", "__userTag__", "=", "prod"),
        ("__systemTag__~=retention::%", "__systemTag__", "~=", "retention::%"),
        ("name=", "name", "=", ""),
        ("name==x", "name", "=", "=x"),
        ("name=a=b", "name", "=", "a=b"),
        ("name=<x", "name", "=", "<x"),
        ("description=this is null", "description", "=", "this is null"),
        (" name =x ", "name", "=", "x "),
    ],
)
def test_parse_condition(text: str, name: str, op: str, value: str | None) -> None:
    assert parse_condition(text) == Condition(name, op, value)


@pytest.mark.parametrize(
    ("text", "named"),
    [("", "''"), ("novalue", "novalue"), ("=x", "=x"), ("size?5", "'?'"), ("name~x", "'~'"), ("a!b", "'!'")],
)
def test_parse_condition_rejects_garbage(text: str, named: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(named)):
        parse_condition(text)


def test_parse_rest() -> None:
    spec = parse_rest(
        q=["size>0", "name~=vm%"],
        sort="+name,-size, createDate",
        limit="20",
        start="40",
        count="false",
        reply_with_count="TRUE",
        fields="uuid, name,,",
        group_by=" ",
    )
    assert spec == QuerySpec(
        conditions=[Condition("size", ">", "0"), Condition("name", "~=", "vm%")],
        limit=20,
        start=40,
        sort=[("name", True), ("size", False), ("createDate", True)],
        count=False,
        reply_with_count=True,
        fields=["uuid", "name"],
        group_by=None,
    )
    assert parse_rest() == QuerySpec()
    assert parse_rest(sort=" name").sort == [("name", True)]  # "+name" in a URL decodes to " name"
    assert parse_rest(sort=["-size", "name"]).sort == [("size", False), ("name", True)]
    assert parse_rest(limit=0, start=0, count=True, group_by="status").group_by == "status"


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"limit": "abc"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": "10001"}, "limit"),
        ({"limit": "1.5"}, "limit"),
        ({"start": "-1"}, "start"),
        ({"start": "x"}, "start"),
        ({"count": "yes"}, "count"),
        ({"reply_with_count": "1"}, "replyWithCount"),
        ({"sort": "-"}, "sort"),
        ({"q": ["nonsense"]}, "nonsense"),
    ],
)
def test_parse_rest_rejects(params: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(named)):
        parse_rest(**params)


def test_parse_zstack() -> None:
    spec = parse_zstack(
        {
            "conditions": [
                {"name": "size", "op": ">", "value": "0"},
                {"name": "uuid", "op": "in", "value": ["a", "b"]},
                {"name": "parentUuid", "op": "is null"},
                {"name": "backupStorageRefs.status", "op": "!=", "value": "Ready"},
                {"name": "cpuNum", "op": ">=", "value": 2},
                {"name": "success", "op": "=", "value": True},
            ],
            "limit": 10,
            "start": "5",
            "count": False,
            "replyWithCount": True,
            "sortBy": "size",
            "sortDirection": "desc",
            "fields": ["uuid", "name"],
            "session": {"uuid": "ignored"},
        }
    )
    assert spec == QuerySpec(
        conditions=[
            Condition("size", ">", "0"),
            Condition("uuid", "?=", "a,b"),
            Condition("parentUuid", "is null", None),
            Condition("backupStorageRefs.status", "!=", "Ready"),
            Condition("cpuNum", ">=", "2"),
            Condition("success", "=", "true"),
        ],
        limit=10,
        start=5,
        sort=[("size", False)],
        reply_with_count=True,
        fields=["uuid", "name"],
    )
    assert parse_zstack({}) == QuerySpec()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"conditions": [{"name": "size", "op": "between", "value": "1"}]}, "between"),
        ({"conditions": [{"op": "="}]}, "conditions[0]"),
        ({"conditions": "size>1"}, "conditions"),
        ({"sortBy": "size", "sortDirection": "up"}, "sortDirection"),
        ({"limit": 10001}, "limit"),
        ({"conditions": [{"name": "x", "op": "=", "value": {"a": 1}}]}, "conditions[0].value"),
    ]
    for params, named in cases:
        with pytest.raises(InvalidArgument, match=re.escape(named)):
            parse_zstack(params)


# -- operators -----------------------------------------------------------------------------------
OPERATOR_CASES: list[tuple[str, Callable[[dict[str, Any]], bool]]] = [
    ("size=0", lambda v: v["size"] == 0),
    ("size!=0", lambda v: v["size"] != 0),
    (f"size>{5 * GiB}", lambda v: v["size"] > 5 * GiB),
    (f"size<{3 * GiB}", lambda v: v["size"] < 3 * GiB),
    (f"size>={4 * GiB}", lambda v: v["size"] >= 4 * GiB),
    (f"size<={4 * GiB}", lambda v: v["size"] <= 4 * GiB),
    (f"size>= {1024 * GiB} ", lambda v: v["size"] >= 1024 * GiB),
    ("type?=Root,Data", lambda v: True),
    ("name?=vm1-root,UPPER,nonexistent", lambda v: v["name"] in ("vm1-root", "UPPER")),
    ("name!?=vm1-root,UPPER", lambda v: v["name"] not in ("vm1-root", "UPPER")),
    ("description!?=volume 1,volume 2", lambda v: v["description"] not in ("volume 1", "volume 2")),
    ("description?=volume 1,volume 2", lambda v: v["description"] in ("volume 1", "volume 2")),
    ("name~=vm%", lambda v: v["name"].lower().startswith("vm")),
    ("name~=%ROOT", lambda v: v["name"].endswith("root")),
    ("name~=upper", lambda v: v["name"].lower() == "upper"),
    ("name~=vm_-root", lambda v: v["name"] in ("vm1-root", "vm2-root")),
    ("name~=under_score", lambda v: v["name"] in ("under_score", "underXscore")),
    ("name~=under\\_score", lambda v: v["name"] == "under_score"),
    ("name~=logs\\%old", lambda v: v["name"] == "logs%old"),
    ("name~=path\\\\share", lambda v: v["name"] == "path\\share"),
    ("name~=path\\share", lambda v: v["name"] == "pathshare"),  # "\s" is just "s"
    ("name~=备份%", lambda v: v["name"] == "备份卷"),
    ("name~=%🙂", lambda v: v["name"] == "emoji🙂"),
    ("name~=%", lambda v: True),
    ("name!~=vm%", lambda v: not v["name"].lower().startswith("vm")),
    ("description!~=volume 1%", lambda v: not (v["description"] or "").startswith("volume 1")),
    ("description is null", lambda v: v["description"] is None),
    ("description not null", lambda v: v["description"] is not None),
    ("description=volume 4", lambda v: v["description"] == "volume 4"),
    ("description!=volume 4", lambda v: v["description"] != "volume 4"),  # nulls included
    ("vmInstanceUuid is null", lambda v: v["vmInstanceUuid"] is None),
    ("projectUuid=p1", lambda v: v["projectUuid"] == "p1"),
    (f"hostUuid={HOSTS[0]['uuid']}", lambda v: v["hostUuid"] == HOSTS[0]["uuid"]),
    ("name=", lambda v: v["name"] == ""),
    ("name>vm", lambda v: v["name"] > "vm"),
    ("name<B", lambda v: v["name"] < "B"),
    ("createDate>=2024-03-01T14:00:00Z", lambda v: v["createDate"] >= T0 + timedelta(hours=2)),
    ("createDate>=2024-03-01T16:00:00+02:00", lambda v: v["createDate"] >= T0 + timedelta(hours=2)),
    ("createDate>=2024-03-01T16:00:00 02:00", lambda v: v["createDate"] >= T0 + timedelta(hours=2)),
    ("createDate<2024-03-01 14:00:00", lambda v: v["createDate"] < T0 + timedelta(hours=2)),
    (f"createDate={T1_MS}", lambda v: v["createDate"] == T0 + timedelta(hours=1)),
]  # fmt: skip


@pytest.mark.parametrize(("condition", "predicate"), OPERATOR_CASES, ids=[case[0] for case in OPERATOR_CASES])
def test_operators(session: Session, condition: str, predicate: Callable[[dict[str, Any]], bool]) -> None:
    expected = {volume["uuid"] for volume in VOLUMES if predicate(volume)}
    assert set(uuids(query(session, Volume, condition))) == expected


def test_operators_combine_with_and(session: Session) -> None:
    result = query(session, Volume, "type=Data", "projectUuid=p1", f"size>{GiB}")
    expected = {v["uuid"] for v in VOLUMES if v["type"] == "Data" and v["projectUuid"] == "p1" and v["size"] > GiB}
    assert set(uuids(result)) == expected


def test_every_operator_is_covered() -> None:
    used = {parse_condition(case[0]).op for case in OPERATOR_CASES}
    assert used == set(OPERATORS)


def test_datetime_and_bool_conversions(session: Session) -> None:
    assert uuids(query(session, Host, "lastHeartbeat is null")) == [HOSTS[1]["uuid"]]
    assert set(uuids(query(session, Host, f"lastHeartbeat>{T0.isoformat()}"))) == {HOSTS[0]["uuid"]}
    ms = int(T0.timestamp() * 1000)
    assert set(uuids(query(session, Host, f"lastHeartbeat<{ms}"))) == {HOSTS[2]["uuid"]}

    def histories(*conditions: str) -> list[bool]:
        result = query(session, SchedulerJobHistory, *conditions, sort="+executeTime")
        return [row.success for row in result.rows]

    assert histories("success=true") == [True, True, True]
    assert histories("success=FALSE") == [False, False, False]
    assert histories("success!=true") == [False, False, False]
    assert histories("success?=true,false") == [h["success"] for h in HISTORIES]
    assert histories(f"executeTime>={(T0 + timedelta(days=4)).isoformat()}") == [True, False]
    assert histories("id<=2") == [True, False]
    assert histories("schedulerJobUuid?=" + uid("job", 1)) == [False, False, False]
    for op in (">", "<", ">=", "<="):  # booleans have no order (PostgreSQL refused it: a database error)
        with pytest.raises(InvalidArgument, match=f"operator '{op}' does not apply to the boolean field 'success'"):
            query(session, SchedulerJobHistory, f"success{op}TRUE")


# -- nested fields and tags ----------------------------------------------------------------------
def backups_where(predicate: Callable[[dict[str, Any]], bool]) -> set[str]:
    return {backup["uuid"] for backup in BACKUPS if any(predicate(ref) for ref in backup["refs"])}


@pytest.mark.parametrize(
    ("condition", "predicate"),
    [
        (f"backupStorageRefs.backupStorageUuid={BS1}", lambda r: r["backupStorageUuid"] == BS1),
        (f"backupStorageRefs.backupStorageUuid={BS3}", lambda r: r["backupStorageUuid"] == BS3),
        (f"backupStorageRefs.backupStorageUuid?={BS2},{BS3}", lambda r: r["backupStorageUuid"] in (BS2, BS3)),
        ("backupStorageRefs.status!=Ready", lambda r: r["status"] != "Ready"),
        ("backupStorageRefs.status=Creating", lambda r: r["status"] == "Creating"),
        ("backupStorageRefs.installPath is null", lambda r: r["installPath"] is None),
        ("backupStorageRefs.installPath~=zstore://r2/%", lambda r: (r["installPath"] or "").startswith("zstore://r2/")),
        ("backupStorageRefs.createDate>2000-01-01", lambda r: True),
    ],
)
def test_nested_references(session: Session, condition: str, predicate: Callable[[dict[str, Any]], bool]) -> None:
    expected = backups_where(predicate)
    assert expected  # the dataset exercises the case
    assert set(uuids(query(session, VolumeBackup, condition))) == expected


def test_nested_references_combine_and_load(session: Session) -> None:
    result = query(session, VolumeBackup, f"backupStorageRefs.backupStorageUuid={BS1}", "status=Ready", sort="+name")
    expected = [b for b in BACKUPS if b["status"] == "Ready" and any(r["backupStorageUuid"] == BS1 for r in b["refs"])]
    assert uuids(result) == ordered(expected, ("name", True))
    by_uuid = {b["uuid"]: b for b in BACKUPS}
    for row in result.rows:
        assert [ref.backupStorageUuid for ref in row.backupStorageRefs] == [
            ref["backupStorageUuid"] for ref in by_uuid[row.uuid]["refs"]
        ]
    assert uuids(query(session, DatabaseBackup, "backupStorageRefs.status=Failed")) == [DB_BACKUPS[2]["uuid"]]
    assert uuids(query(session, DatabaseBackup, f"backupStorageRefs.backupStorageUuid!={BS2}")) == [
        DB_BACKUPS[1]["uuid"]
    ]
    # many-to-one works too (``has``): the references of one backup
    refs = query(session, VolumeBackupStorageRef, f"backup.name={BACKUPS[2]['name']}")
    assert {ref.backupStorageUuid for ref in refs.rows} == {r["backupStorageUuid"] for r in BACKUPS[2]["refs"]}


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("__userTag__=prod", tagged("user", lambda t: t == "prod") & set(VOL)),
        ("__userTag__~=prod", tagged("user", lambda t: t.lower() == "prod") & set(VOL)),
        ("__userTag__~=env::%", tagged("user", lambda t: t.startswith("env::")) & set(VOL)),
        ("__userTag__?=keep,env::prod,nothing", tagged("user", lambda t: t in ("keep", "env::prod")) & set(VOL)),
        ("__userTag__!=prod", set(VOL) - tagged("user", lambda t: t == "prod")),
        ("__userTag__!?=prod,Prod", set(VOL) - tagged("user", lambda t: t in ("prod", "Prod"))),
        ("__userTag__!~=env%", set(VOL) - tagged("user", lambda t: t.startswith("env"))),
        ("__userTag__ is null", set(VOL) - tagged("user", lambda t: True)),
        ("__userTag__ not null", tagged("user", lambda t: True) & set(VOL)),
        ("__userTag__>env::r", tagged("user", lambda t: t > "env::r") & set(VOL)),
        ("__systemTag__=prod", tagged("system", lambda t: t == "prod") & set(VOL)),
        ("__systemTag__~=retention::%", tagged("system", lambda t: t.startswith("retention::")) & set(VOL)),
        ("__systemTag__!~=retention%", set(VOL) - tagged("system", lambda t: t.startswith("retention"))),
        ("__systemTag__ is null", set(VOL) - tagged("system", lambda t: True)),
    ],
)
def test_tags(session: Session, condition: str, expected: set[str]) -> None:
    assert set(uuids(query(session, Volume, condition))) == expected


def test_tags_on_other_resources(session: Session) -> None:
    assert uuids(query(session, VolumeBackup, "__userTag__=prod")) == [VB[0]]
    assert uuids(query(session, VolumeBackup, "__systemTag__~=retention%")) == [VB[2]]
    assert query(session, VolumeBackup, "__userTag__=prod", "status!=Ready").rows == []
    # the user-tags and system-tags collections share the Tag model
    system = query(session, Tag, "tag~=%prod%", tag_type_filter="system")
    assert {(t.resourceUuid, t.tag) for t in system.rows} == {
        (r, t) for r, _, t, k in TAGS if k == "system" and "prod" in t
    }
    with pytest.raises(InvalidArgument, match="__userTag__"):
        query(session, SchedulerJobHistory, "__userTag__=prod")
    with pytest.raises(ValueError, match="tag_type_filter"):
        query(session, Volume, tag_type_filter="user")


# -- sorting and paging --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sort", "keys"),
    [
        (None, [("createDate", False)]),
        ("-size", [("size", False)]),
        ("+name", [("name", True)]),
        ("name", [("name", True)]),
        (" name", [("name", True)]),
        ("-name", [("name", False)]),
        ("+description", [("description", True)]),
        ("-description", [("description", False)]),
        ("-hostUuid,+size", [("hostUuid", False), ("size", True)]),
        ("+projectUuid,-createDate", [("projectUuid", True), ("createDate", False)]),
        ("+type,-uuid", [("type", True), ("uuid", False)]),
    ],
)
def test_sort(session: Session, sort: str | None, keys: list[tuple[str, bool]]) -> None:
    assert uuids(query(session, Volume, sort=sort)) == ordered(VOLUMES, *keys)


@pytest.mark.parametrize("sort", [None, "+type", "-status,+format", "+projectUuid"])
def test_paging_is_stable(session: Session, sort: str | None) -> None:
    everything = uuids(query(session, Volume, sort=sort))
    pages: list[str] = []
    for start in range(0, len(VOLUMES) + 3, 4):
        pages += uuids(query(session, Volume, sort=sort, limit="4", start=str(start)))
    assert pages == everything
    assert sorted(pages) == sorted(VOL)


def test_limit_start_count_and_reply_with_count(session: Session) -> None:
    all_sorted = ordered(VOLUMES, ("size", False))
    page = query(session, Volume, sort="-size", limit="5", start="2", reply_with_count="true")
    assert uuids(page) == all_sorted[2:7]
    assert page.total == len(VOLUMES)
    assert query(session, Volume, sort="-size", limit="5", start="2").total is None

    counted = query(session, Volume, "type=Data", count="true", limit="1")
    assert counted.rows == []
    assert counted.total == sum(1 for v in VOLUMES if v["type"] == "Data")

    none = query(session, Volume, limit="0", reply_with_count="true")
    assert none.rows == []
    assert none.total == len(VOLUMES)
    assert query(session, Volume, start="1000").rows == []
    assert query(session, Volume, "name=nothing", reply_with_count="true").total == 0


def test_fields(session: Session) -> None:
    result = query(session, Volume, "projectUuid=p2", fields="uuid,name,uuid,size", sort="-size")
    assert result.fields == ["uuid", "name", "size"]
    expected = [v for v in VOLUMES if v["projectUuid"] == "p2"]
    assert result.rows == [
        {"uuid": v["uuid"], "name": v["name"], "size": v["size"]} for v in sorted(expected, key=lambda v: -v["size"])
    ]
    backups = query(session, VolumeBackup, fields="uuid,metadata", sort="+uuid", limit="4", reply_with_count="true")
    assert backups.rows == [{"uuid": b["uuid"], "metadata": b["metadata"]} for b in BACKUPS[:4]]
    assert backups.total == len(BACKUPS)
    storages = query(session, BackupStorage, fields="name,type", sort="+name")
    assert storages.rows == [{"name": s["name"], "type": s["type"]} for s in sorted(STORAGES, key=lambda s: s["name"])]


def test_group_by(session: Session) -> None:
    def expected_groups(rows: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
        counts = Counter(row[name] for row in rows)
        ordered_values = sorted(counts, key=lambda value: (-counts[value], null_low(value)))
        return [{name: value, "count": counts[value]} for value in ordered_values]

    result = query(session, Volume, group_by="projectUuid")
    assert result.groups == expected_groups(VOLUMES, "projectUuid")
    assert result.rows == []
    assert result.total is None

    data = [v for v in VOLUMES if v["type"] == "Data"]
    assert query(session, VolumeBackup, group_by="status").groups == expected_groups(BACKUPS, "status")
    assert query(session, Volume, "type=Data", group_by="hostUuid").groups == expected_groups(data, "hostUuid")
    nested = query(session, VolumeBackup, f"backupStorageRefs.backupStorageUuid={BS2}", group_by="mode")
    assert nested.groups == expected_groups(
        [b for b in BACKUPS if any(r["backupStorageUuid"] == BS2 for r in b["refs"])], "mode"
    )

    counted = query(session, Volume, group_by="projectUuid", count="true")
    assert counted.groups == []
    assert counted.total == len({v["projectUuid"] for v in VOLUMES})
    paged = query(session, VolumeBackup, group_by="status", limit="2", start="1", reply_with_count="true")
    assert paged.groups == expected_groups(BACKUPS, "status")[1:3]
    assert paged.total == len(set(BACKUP_STATUSES))

    by_value = query(session, VolumeBackup, group_by="status", sort="-status")
    assert [g["status"] for g in by_value.groups or []] == sorted(set(BACKUP_STATUSES), reverse=True)
    by_count = query(session, Volume, group_by="format", sort="+count")
    assert [g["count"] for g in by_count.groups or []] == sorted(Counter(v["format"] for v in VOLUMES).values())


def test_base_restricts_everything(session: Session) -> None:
    base = select(Volume).where(Volume.projectUuid == "p1")
    visible = [v for v in VOLUMES if v["projectUuid"] == "p1"]
    assert uuids(query(session, Volume, base=base)) == ordered(visible, ("createDate", False))
    result = query(session, Volume, "type=Data", base=base, reply_with_count="true", limit="1")
    assert result.total == sum(1 for v in visible if v["type"] == "Data")
    assert len(result.rows) == 1
    assert query(session, Volume, base=base, count="true").total == len(visible)
    groups = query(session, Volume, base=base, group_by="format", count="true")
    assert groups.total == len({v["format"] for v in visible})
    grouped = query(session, Volume, base=base, group_by="hostUuid").groups or []
    assert sum(g["count"] for g in grouped) == len(visible)
    assert query(session, Volume, "__userTag__=prod", base=base, fields="uuid").rows == [
        {"uuid": v["uuid"]} for v in visible if v["uuid"] in tagged("user", lambda t: t == "prod")
    ]
    # a base with a join of its own
    joined = select(Volume).join(Host, Host.uuid == Volume.hostUuid).where(Host.status == "Disconnected")
    on_b = [v for v in VOLUMES if v["hostUuid"] == HOSTS[1]["uuid"]]
    assert query(session, Volume, base=joined, fields="uuid", sort="+uuid").rows == [
        {"uuid": v["uuid"]} for v in sorted(on_b, key=lambda v: v["uuid"])
    ]
    assert query(session, Volume, base=joined, count="true").total == len(on_b)
    with pytest.raises(ValueError, match="base"):
        query(session, Volume, base=select(Host))


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "params", "named"),
    [
        (Volume, {"q": ["xyz=1"]}, "'xyz'"),
        (Volume, {"q": ["size=abc"]}, "'size'"),
        (Volume, {"q": ["size=1.5"]}, "'size'"),
        (Volume, {"q": ["size>99999999999999999999"]}, "'size'"),
        (Volume, {"q": [f"size?=1,{'9' * 5000}"]}, "'size'"),
        (VmInstance, {"q": ["cpuNum>3000000000"]}, "'cpuNum'"),
        (BackupStorage, {"q": ["credentials is null"]}, "'credentials'"),
        (BackupStorage, {"sort": "-credentials"}, "'credentials'"),
        (BackupStorage, {"fields": "uuid,credentials"}, "'credentials'"),
        (BackupStorage, {"group_by": "credentials"}, "'credentials'"),
        (ApiKey, {"q": ["keyHash=abc"]}, "'keyHash'"),
        (VolumeBackup, {"q": ["metadata=x"]}, "'metadata'"),
        (VolumeBackup, {"q": ["metadata~=x%"]}, "'metadata'"),
        (VolumeBackup, {"q": ["metadata?=a,b"]}, "'metadata'"),
        (VolumeBackup, {"q": ["metadata_ is null"]}, "'metadata_'"),
        (VolumeBackup, {"sort": "+metadata"}, "'metadata'"),
        (VolumeBackup, {"group_by": "metadata"}, "'metadata'"),
        (VolumeBackup, {"q": ["backupStorageRefs.nope=1"]}, "'backupStorageRefs.nope'"),
        (VolumeBackup, {"q": ["nope.status=Ready"]}, "'nope.status'"),
        (VolumeBackup, {"q": ["backupStorageRefs.backup.name=x"]}, "'backupStorageRefs.backup.name'"),
        (VolumeBackup, {"q": ["backupStorageRefs=x"]}, "'backupStorageRefs'"),
        (VolumeBackup, {"sort": "backupStorageRefs.status"}, "'backupStorageRefs.status'"),
        (VolumeBackup, {"q": ["backupStorageRefs.status?="]}, "'backupStorageRefs.status'"),
        (Volume, {"q": ["name?="]}, "'name'"),
        (Volume, {"q": ["name!?=,,"]}, "'name'"),
        (Volume, {"q": ["__userTag__?=,"]}, "'__userTag__'"),
        (Volume, {"q": ["size~=1%"]}, "'size'"),
        (Volume, {"q": ["createDate>yesterday"]}, "'createDate'"),
        (Volume, {"q": ["createDate>99999999999999999"]}, "'createDate'"),
        (Host, {"q": ["lastHeartbeat>2024-13-01"]}, "'lastHeartbeat'"),
        (SchedulerJobHistory, {"q": ["success=yes"]}, "'success'"),
        (Volume, {"q": ["name=a\x00b"]}, "'name'"),
        (Volume, {"q": ["name~=\ud800"]}, "'name'"),
        (Volume, {"sort": "-nope"}, "'nope'"),
        (Volume, {"fields": "uuid,nope"}, "'nope'"),
        (Volume, {"group_by": "nope"}, "'nope'"),
        (Volume, {"group_by": "status", "sort": "-size"}, "'size'"),
        (Volume, {"group_by": "status", "fields": "uuid"}, "groupBy"),
    ],
)
def test_bad_input(session: Session, model: type[Base], params: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(named)):
        query(session, model, *params.get("q", []), **{k: v for k, v in params.items() if k != "q"})


@pytest.mark.parametrize(
    ("condition", "named"),
    [
        (Condition("name", "<>", "x"), "'<>'"),
        (Condition("name", "between", "x"), "'between'"),
        (Condition("name", "", "x"), "''"),
        (Condition("description", "is null", "x"), "'description'"),
        (Condition("name", "=", None), "'name'"),
        (Condition("name", "~=", None), "'name'"),
        (Condition("__userTag__", "not null", "x"), "'__userTag__'"),
        (Condition("", "=", "x"), "''"),
    ],
)
def test_bad_conditions(session: Session, condition: Condition, named: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(named)):
        run_query(session, Volume, QuerySpec(conditions=[condition]))


def test_bad_spec(session: Session) -> None:
    for spec, named in [
        (QuerySpec(limit=-1), "limit"),
        (QuerySpec(limit=10001), "limit"),
        (QuerySpec(start=-5), "start"),
        (QuerySpec(fields=[]), "fields"),
    ]:
        with pytest.raises(InvalidArgument, match=named):
            run_query(session, Volume, spec)
    # aliases of ZStack's Java operator names, and whitespace/case in the null tests, are fine
    spec = QuerySpec(conditions=[Condition("name", "in", "UPPER,upper"), Condition("description", " IS NULL ")])
    assert set(uuids(run_query(session, Volume, spec))) == {v["uuid"] for v in VOLUMES[11:13] if not v["description"]}


# -- injection -----------------------------------------------------------------------------------
def table_counts(session: Session) -> dict[str, int]:
    return {
        table.name: session.scalar(select(func.count()).select_from(table)) or 0
        for table in Base.metadata.sorted_tables
    }


EXPECTED_COUNTS = {"volume": len(VOLUMES), "volume_backup": len(BACKUPS), "tag": len(TAGS), "host": len(HOSTS)}


@pytest.mark.parametrize(
    "condition",
    [
        "name=x' OR '1'='1",
        "name=1; DROP TABLE volume; --",
        "name=vm1-root' --",
        "name~=%' OR 1=1 --",
        "name?=a','b') OR ('1'='1",
        'description=" OR ""="',
        "__userTag__=prod' OR '1'='1",
        "__systemTag__~=%'; DELETE FROM tag; --",
        f"backupStorageRefs.backupStorageUuid={BS1}' OR '1'='1",
        "installPath=$$; DROP TABLE volume; $$",
    ],
)
def test_injected_values_are_plain_values(db: Db, condition: str) -> None:
    with db.session() as session:
        before = table_counts(session)
        model = VolumeBackup if condition.startswith("backupStorageRefs") else Volume
        parsed = parse_condition(condition)
        rows = query(session, model, condition).rows
        # only rows whose field really equals/matches the whole text: the one volume named that
        if parsed.name == "name" and parsed.op == "=":
            assert [row.name for row in rows] == [v["name"] for v in VOLUMES if v["name"] == parsed.value]
        else:
            assert rows == []
    with db.session() as session:
        assert table_counts(session) == before
        assert before.items() >= EXPECTED_COUNTS.items()


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"q": ["uuid;drop=x"]}, "uuid;drop"),
        ({"q": ["name) OR (1=1"]}, "name) OR (1"),
        ({"q": ["name' OR '1'='1"]}, "name' OR '1'"),
        ({"q": ["size=1; DROP TABLE volume; --"]}, "size"),
        ({"q": ["1=1 OR name=x"]}, "1"),
        ({"q": ["backupStorageRefs.status;DROP TABLE volume=x"]}, "backupStorageRefs.status;DROP TABLE volume"),
        ({"sort": "-name;DROP TABLE volume"}, "name;DROP TABLE volume"),
        ({"sort": "name DESC, (SELECT 1)"}, "name DESC"),
        ({"fields": "uuid FROM volume; --"}, "uuid FROM volume; --"),
        ({"group_by": "status; DROP TABLE volume"}, "status; DROP TABLE volume"),
    ],
)
def test_injected_names_are_unknown_fields(db: Db, params: dict[str, Any], named: str) -> None:
    with db.session() as session:
        before = table_counts(session)
        with pytest.raises(InvalidArgument, match=re.escape(named)):
            query(session, Volume, *params.get("q", []), **{k: v for k, v in params.items() if k != "q"})
    assert set(inspect(db.engine).get_table_names()) == set(Base.metadata.tables)
    with db.session() as session:
        assert table_counts(session) == before


# -- efficiency ----------------------------------------------------------------------------------
def test_one_statement_per_part(db: Db) -> None:
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        with db.session() as session:
            conditions = ["__userTag__ is null", "backupStorageRefs.status not null", "size>0"]
            result = query(session, VolumeBackup, *conditions, reply_with_count="true")
            assert len(result.rows) > 5
            for row in result.rows:  # already loaded: no lazy load per row
                assert isinstance(row.backupStorageRefs, list)
            assert len(statements) == 3, statements  # the page, its references (one selectin), the total
            statements.clear()
            query(session, VolumeBackup, *conditions, fields="uuid,name", reply_with_count="true")
            assert len(statements) == 2, statements
            statements.clear()
            query(session, VolumeBackup, *conditions, group_by="status", reply_with_count="true")
            assert len(statements) == 2, statements
            statements.clear()
            query(session, VolumeBackup, *conditions, count="true")
            assert len(statements) == 1, statements
    finally:
        event.remove(db.engine, "before_cursor_execute", record)


# -- properties ----------------------------------------------------------------------------------
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
texts = st.one_of(
    st.text(max_size=30),
    st.sampled_from([*VOLUME_NAMES, "volume 4", "VM1-ROOT", "x' OR '1'='1", "a\x00b", "\ud800", "%", "_", "\\"]),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=10),
)


def valid_text(value: str) -> bool:
    return "\x00" not in value and not any(0xD800 <= ord(char) <= 0xDFFF for char in value)


@FUZZ
@given(value=texts)
def test_property_equals_is_exact(db: Db, value: str) -> None:
    """``name=<anything>`` returns exactly the rows a Python filter keeps, or InvalidArgument for text
    no database can hold; ``=`` and ``!=`` split every table in two."""
    with db.session() as session:
        for field_name in ("name", "description"):
            try:
                equal = set(uuids(query(session, Volume, f"{field_name}={value}")))
                unequal = set(uuids(query(session, Volume, f"{field_name}!={value}")))
            except InvalidArgument as exc:
                assert not valid_text(value)
                assert f"'{field_name}'" in str(exc)
                continue
            assert valid_text(value)
            assert equal == {v["uuid"] for v in VOLUMES if v[field_name] == value}
            assert equal | unequal == set(VOL)
            assert not equal & unequal


def like_regex(pattern: str) -> re.Pattern[str]:
    """The query language's ``~=``, in Python: %, _, backslash escapes, ASCII case folded."""
    out = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            out.append(re.escape(pattern[index + 1] if index + 1 < len(pattern) else "\\"))
            index += 2
            continue
        out.append(".*" if char == "%" else "." if char == "_" else re.escape(char))
        index += 1
    return re.compile("".join(out), re.DOTALL | re.IGNORECASE | re.ASCII)


@FUZZ
@given(pattern=st.text(alphabet="%_\\ vmVMrotRO1-2'xX=", max_size=12))
def test_property_like_matches_python(db: Db, pattern: str) -> None:
    regex = like_regex(pattern)
    with db.session() as session:
        like = set(uuids(query(session, Volume, f"name~={pattern}")))
        unlike = set(uuids(query(session, Volume, f"name!~={pattern}")))
    assert like == {v["uuid"] for v in VOLUMES if regex.fullmatch(v["name"])}
    assert like | unlike == set(VOL)
    assert not like & unlike


MODELS = [Volume, VolumeBackup, Host, VmInstance, BackupStorage, SchedulerJobHistory, DatabaseBackup, Tag, ApiKey]


def wire_names(model: type[Base]) -> list[str]:
    """Every column's wire name (secret ones included: they must be refused), references, tags."""
    names = [prop.key.rstrip("_") for prop in inspect(model).column_attrs]
    for relationship in inspect(model).relationships:
        names += [f"{relationship.key}.{prop.key}" for prop in relationship.mapper.column_attrs]
    return [*names, "__userTag__", "__systemTag__"]


values = st.one_of(
    st.none(),
    texts,
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.datetimes(timezones=st.sampled_from([UTC, None])).map(datetime.isoformat),
    st.sampled_from(["true", "false", "Ready", "prod", "p1", "", ",", "a,b", "%", "1,2,3", "2024-03-01"]),
)


@st.composite
def specs(draw: st.DrawFn) -> tuple[type[Base], QuerySpec]:
    model = draw(st.sampled_from(MODELS))
    names = wire_names(model)
    known = st.sampled_from(names)
    name_strategy = st.one_of(known, known, known, known, st.text(max_size=12))
    op_strategy = st.one_of(*[st.sampled_from(OPERATORS)] * 6, st.text(max_size=4))
    conditions = draw(st.lists(st.builds(Condition, name_strategy, op_strategy, values), max_size=2))
    sort = draw(st.lists(st.tuples(st.sampled_from([*names, "count"]), st.booleans()), max_size=1))
    group_by = draw(st.one_of(st.none(), st.none(), st.sampled_from(names)))
    fields = None if group_by else draw(st.one_of(st.none(), st.lists(st.sampled_from(names), min_size=1)))
    count = draw(st.booleans())
    return model, QuerySpec(
        conditions, limit=5, sort=sort, count=count, reply_with_count=True, fields=fields, group_by=group_by
    )


@FUZZ
@given(case=specs())
def test_property_only_invalid_argument(db: Db, case: tuple[type[Base], QuerySpec]) -> None:
    """Whatever arrives, the answer is rows or InvalidArgument: never a database error."""
    model, spec = case
    note(f"{model.__name__}: {spec}")
    with db.session() as session:
        try:
            result = run_query(session, model, spec)
        except InvalidArgument:
            observe("InvalidArgument")
            return
        observe("answered")
        assert result.total is not None
        items = result.groups if spec.group_by else result.rows
        assert items is not None
        assert len(items) <= (0 if spec.count else 5)
        assert result.total >= len(items)
