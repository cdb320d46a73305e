"""The backend registry: a new storage type is one module and one registry line.

The dummy in-memory backend below is such a module: once its entry is registered, it opens
from its URLs, a storage of its type registers through the service (its secret sealed, its
required field required, its options given from the settings), the CLI has its flags, and
rebuild takes its URLs; nothing else in the code names it. And the built-in backends read no
environment: what they need comes in as options.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from api.cli import rebuild as rebuild_cli
from api.cli import resources
from shared import storage
from shared.catalog import db
from shared.catalog.models import BackupStorage
from shared.config import get_settings
from shared.credentials import SEALED, credentials_of, set_credentials
from shared.errors import Conflict, InvalidArgument, ObjectNotFound, UsageError
from shared.repository.backends import Backend, RetryingBackend, open_backend, registry
from shared.repository.backends.base import Buffer, ObjectInfo
from shared.repository.backends.http import HttpBackend
from shared.repository.backends.registry import BackendType, Field
from shared.repository.backends.s3 import S3Backend
from shared.repository.repo import Repository
from tests.conftest import ROOT

SHELVES: dict[str, dict[str, bytes]] = {}  # the dummy's "server": one dict of objects per URL
OPENED: list[dict[str, str | None]] = []  # the options each open was given


class MemoryBackend(Backend):
    """Objects in a dict: the smallest backend there is."""

    def __init__(self, location: str) -> None:
        self.location = location
        self.objects = SHELVES.setdefault(location, {})

    def put(self, key: str, data: Buffer, *, overwrite: bool = True) -> None:
        if overwrite or key not in self.objects:
            self.objects[key] = bytes(data)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if key not in self.objects:
            raise ObjectNotFound(location=self.location, key=key)
        data = self.objects[key][offset:]
        return data if length is None else data[:length]

    def stat(self, key: str) -> ObjectInfo:
        return ObjectInfo(key=key, size=len(self.get(key)), mtime=0.0)

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        for key in list(self.objects):
            if key.startswith(prefix):
                yield ObjectInfo(key=key, size=len(self.objects[key]), mtime=0.0)

    def missing(self, keys: Iterable[str]) -> set[str]:
        return {key for key in keys if key not in self.objects}


def open_memory(location: str, options: Mapping[str, str | None]) -> MemoryBackend:
    if not options.get("shelfKey"):
        raise UsageError(detail=f"{location}: no shelfKey")
    OPENED.append(dict(options))
    return MemoryBackend(location)


# The one registry line (a test registers it, and takes it out again, in the fixture).
MEMORY = BackendType(
    "Memory",
    ("mem",),
    open_memory,
    fields=(
        Field("shelfKey", help="the shelf's key.", secret=True, required=True, envvar="BLOCKVAULT_TEST_SHELF_KEY"),
        Field("shelfZone", help="its zone.", setting="s3_region"),  # a setting any process has
    ),
    encrypted=True,
    url_form="mem://shelf/name",
)


@pytest.fixture
def memory() -> Iterator[BackendType]:
    registry.register(MEMORY)
    SHELVES.clear()
    OPENED.clear()
    yield MEMORY
    registry.unregister(MEMORY.storage_type)


@pytest.fixture
def catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An embedded catalog in ``tmp_path`` with its own server secret, and no settings from the
    environment but the ones a test sets."""
    for name in ("BLOCKVAULT_DATABASE_URL", "BLOCKVAULT_S3_REGION", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BLOCKVAULT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BLOCKVAULT_SECRET_KEY", "a-server-secret-for-registry-tests")
    get_settings.cache_clear()
    db.reset()
    db.migrate()
    yield
    db.reset()
    get_settings.cache_clear()


def test_a_registered_backend_opens_from_its_urls(memory: BackendType) -> None:
    assert registry.for_scheme("mem") is memory and registry.for_type("Memory") is memory
    assert [t.storage_type for t in registry.types()] == ["ImageStore", "Remote", "PublicCloud", "Memory"]
    backend = open_backend("mem://shelf/a", {"shelfKey": "k"})
    assert isinstance(backend, RetryingBackend) and isinstance(backend.inner, MemoryBackend)
    with Repository.init(backend, encrypt=True, passphrase="pw") as repo:
        created = repo.id
    with Repository.open(open_backend("mem://shelf/a", {"shelfKey": "k"}, retry_seconds=None), "pw") as repo:
        assert repo.id == created and repo.codec.encrypted
    with pytest.raises(UsageError, match="no shelfKey"):
        open_backend("mem://shelf/a", {})
    with pytest.raises(UsageError) as unknown:
        open_backend("ftp://host/x")
    assert str(unknown.value) == "unknown repository scheme 'ftp' in 'ftp://host/x'"
    assert "shelfKey" in registry.secret_names() and "shelfZone" in registry.option_names()


def test_a_storage_of_the_new_type_registers_through_the_service(
    memory: BackendType, catalog: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BLOCKVAULT_S3_REGION", "zone-from-the-settings")
    get_settings.cache_clear()
    params: dict[str, Any] = {"type": "Memory", "url": "mem://shelf/one", "name": "m"}
    with db.session() as session:
        with pytest.raises(InvalidArgument, match="missing required params: shelfKey, encryptionPassphrase"):
            storage.register_storage(session, params)
        with pytest.raises(InvalidArgument, match="a Memory backup storage url starts with mem://"):
            storage.register_storage(session, {**params, "url": "file:///x", "shelfKey": "k"})
        with pytest.raises(InvalidArgument) as unknown:
            storage.register_storage(session, {**params, "type": "Tape"})
        assert str(unknown.value) == "type must be one of ImageStore, Remote, PublicCloud, Memory"
        row = storage.register_storage(session, {**params, "shelfKey": "the-shelf-key", "encryptionPassphrase": "pw"})
        session.commit()
        assert (row.type, row.status, row.role) == ("Memory", "Connected", "master")
        assert row.repositoryUuid and SHELVES["mem://shelf/one"]["config"]
        assert set(row.credentials or {}) == {SEALED}  # the secret is sealed, as the registry says
        assert "the-shelf-key" not in json.dumps(row.credentials)
        assert credentials_of(row) == {"shelfKey": "the-shelf-key", "encryptionPassphrase": "pw"}
        # the backend was given the stored secret and, for what the storage lacks, the setting
        assert OPENED[-1] == {"shelfKey": "the-shelf-key", "shelfZone": "zone-from-the-settings"}
        with pytest.raises(Conflict, match="registered with mem://shelf/one already"):
            storage.register_storage(session, {**params, "shelfKey": "k", "encryptionPassphrase": "pw"})
        assert storage.type_of_url("mem://shelf/two") == "Memory" and storage.type_of_url("shelf/two") is None


class RecordingClient:
    def __init__(self) -> None:
        self.added: list[tuple[str, str, dict[str, Any]]] = []

    def add_backup_storage(self, name: str, url: str, **params: Any) -> dict[str, Any]:
        self.added.append((name, url, params))
        return {"uuid": "u", "name": name}


def test_the_cli_has_the_new_types_flags(memory: BackendType, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    shown = runner.invoke(resources.storage, ["add", "--help"])
    assert shown.exit_code == 0, shown.output
    assert "--shelf-key" in shown.output and "Memory: the shelf's key." in shown.output
    assert "mem://shelf/name (Memory)" in shown.output and "ImageStore|Remote|PublicCloud|Memory" in shown.output
    client = RecordingClient()
    monkeypatch.setattr(resources, "_client", lambda: client)
    monkeypatch.setenv("BLOCKVAULT_TEST_SHELF_KEY", "from-the-variable")
    args = ["add", "--name", "m", "--url", "mem://shelf/x", "--type", "Memory", "--shelf-zone", "z1"]
    done = runner.invoke(resources.storage, [*args, "--token", "not-memorys", "--encryption-passphrase", "pw"])
    assert done.exit_code == 0, done.output
    assert client.added == [
        (
            "m",
            "mem://shelf/x",
            {"type": "Memory", "shelfKey": "from-the-variable", "shelfZone": "z1", "encryptionPassphrase": "pw"},
        )
    ]
    rebuilt = rebuild_cli._storage_params("mem://shelf/x", {"shelfKey": "k", "token": "t"})
    assert rebuilt == {"type": "Memory", "url": "mem://shelf/x", "shelfKey": "k"}
    with pytest.raises(UsageError) as bad:
        rebuild_cli._storage_params("ftp://x/y", {})
    assert str(bad.value) == "--backup-storage-url must be file://, http(s)://, s3:// or mem://, got 'ftp://x/y'"
    assert "--shelf-key" in runner.invoke(rebuild_cli.rebuild_command, ["--help"]).output


def test_without_the_new_type_everything_is_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    assert registry.for_type("Memory") is None
    assert {(f.flag, f.name, f.envvar, f.secret) for f in registry.fields()} == {
        ("--token", "token", "BLOCKVAULT_STORAGE_TOKEN", True),
        ("--ca-file", "caFile", "BLOCKVAULT_STORAGE_CAFILE", False),
        ("--endpoint", "endpoint", "BLOCKVAULT_S3_ENDPOINT", False),
        ("--region", "region", None, False),
        ("--access-key", "accessKey", "AWS_ACCESS_KEY_ID", True),
        ("--secret-key", "secretKey", "AWS_SECRET_ACCESS_KEY", True),
        ("--object-lock-mode", "objectLockMode", None, False),
        ("--object-lock-days", "objectLockDays", None, False),
        ("--encryption-passphrase", "encryptionPassphrase", "BLOCKVAULT_STORAGE_PASSPHRASE", True),
    }
    assert {t.storage_type: t.required for t in registry.types()} == {
        "ImageStore": (),
        "Remote": ("token",),
        "PublicCloud": ("encryptionPassphrase",),
    }
    with pytest.raises(UsageError) as bad:
        rebuild_cli._storage_params("ftp://x/y", {})
    assert str(bad.value) == "--backup-storage-url must be file://, http(s):// or s3://, got 'ftp://x/y'"
    shown = CliRunner().invoke(resources.storage, ["add", "--help"]).output
    assert "--shelf-key" not in shown and "[ImageStore|Remote|PublicCloud]" in shown
    assert rebuild_cli._storage_params("https://dc2:8081/r", {"token": "t", "caFile": "/ca", "region": "r"}) == {
        "type": "Remote",
        "url": "https://dc2:8081/r",
        "token": "t",
        "caFile": "/ca",
    }


def test_the_registry_refuses_a_type_that_clashes(memory: BackendType) -> None:
    with pytest.raises(ValueError, match="registered already"):
        registry.register(MEMORY)
    with pytest.raises(ValueError, match="s3 belong to PublicCloud"):
        registry.register(BackendType("Other", ("s3",), open_memory))
    with pytest.raises(ValueError, match="field token differs"):
        registry.register(BackendType("Other", ("other",), open_memory, fields=(Field("token"),)))
    with pytest.raises(ValueError, match="flag --shelf-key is field shelfKey's"):
        registry.register(BackendType("Other", ("other",), open_memory, fields=(Field("key", flag="--shelf-key"),)))
    assert registry.for_type("Other") is None


# -- the backends read no environment --------------------------------------------------------------
def test_no_backend_module_reads_the_environment() -> None:
    for path in sorted((ROOT / "shared" / "repository" / "backends").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("environ", "getenv"), f"{path.name} reads os.{node.attr}"
            if isinstance(node, ast.ImportFrom) and node.module == "shared.config":
                names = {alias.name for alias in node.names}
                # open_backend without options takes the settings, through the one settings module
                assert (path.name, names) == ("__init__.py", {"setting"}), f"{path.name} imports {names}"


def test_backends_take_their_options_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOCKVAULT_STORAGE_TOKEN", "a-token-in-the-environment")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    with pytest.raises(UsageError, match="no token"):
        HttpBackend.from_url("http://127.0.0.1:1/r", {})
    s3 = S3Backend.from_url("s3://bucket/p", {})
    assert s3.endpoint is None and s3._client.meta.region_name == "us-east-1"
    given = S3Backend.from_url("s3://bucket/p", {"endpoint": "http://127.0.0.1:7", "region": "ap-1"})
    assert given.endpoint == "http://127.0.0.1:7" and given._client.meta.region_name == "ap-1"
    # without options, open_backend gives the settings (the repository CLI's way)
    http = open_backend("http://127.0.0.1:1/r", retry_seconds=None)
    assert (
        isinstance(http, HttpBackend) and http._client.headers["authorization"] == "Bearer a-token-in-the-environment"
    )
    bucket = open_backend("s3://bucket/p", retry_seconds=None)
    assert isinstance(bucket, S3Backend) and bucket.endpoint == "http://127.0.0.1:9"
    assert bucket._client.meta.region_name == "eu-west-3"


def test_the_service_gives_a_storage_the_settings_it_lacks(catalog: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOCKVAULT_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-north-1")
    get_settings.cache_clear()
    row = BackupStorage(uuid=None, name="cloud", type="PublicCloud", url="s3://bucket/p")
    set_credentials(row, {"accessKey": "AK", "secretKey": "SK", "encryptionPassphrase": "pw"})
    backend = storage.open_storage_backend(row, retry_seconds=None)
    assert isinstance(backend, S3Backend) and backend.endpoint == "http://127.0.0.1:9"
    assert backend._client.meta.region_name == "eu-north-1"
    set_credentials(row, {"endpoint": "http://127.0.0.1:8", "region": "r1", "accessKey": "AK", "secretKey": "SK"})
    backend = storage.open_storage_backend(row, retry_seconds=None)
    assert isinstance(backend, S3Backend) and backend.endpoint == "http://127.0.0.1:8"
    assert backend._client.meta.region_name == "r1"


def test_built_in_backends_load_only_when_needed_and_list_first() -> None:
    """In a fresh process: a folder opens without httpx or boto3, an http URL without boto3; a
    type registered before the built-in ones loaded still lists after them."""
    script = """
import sys
from shared.repository.backends import open_backend, registry
registry.register(registry.BackendType("Early", ("early",), lambda location, options: None))
open_backend(sys.argv[1])
print("httpx" in sys.modules, "boto3" in sys.modules)
open_backend("http://127.0.0.1:1/r", {"token": "t"})
print("httpx" in sys.modules, "boto3" in sys.modules)
print(",".join(t.storage_type for t in registry.types()))
"""
    done = subprocess.run(
        [sys.executable, "-c", script, str(ROOT)], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["False False", "True False", "ImageStore,Remote,PublicCloud,Early"]
