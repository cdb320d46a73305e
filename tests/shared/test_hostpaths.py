"""Host paths (shared.hostpaths): only files inside a host's volume roots and VM sockets inside
its socket folder are ever opened, whatever path text a caller or a catalog row holds."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import hostpaths
from shared.config import get_settings
from shared.errors import PathNotAllowed, TargetExists, UsageError
from shared.repository.volume import open_reader


class Site:
    """A host's folders: a volume root with a symlink zoo, an outside folder, the data folder."""

    def __init__(self, tmp: Path) -> None:
        self.root = tmp / "root"
        self.outside = tmp / "outside"
        self.data = tmp / "data"
        self.sockets = tmp / "sockets"
        for folder in (self.root / "sub", self.outside, self.data, self.sockets):
            folder.mkdir(parents=True)
        (self.root / "disk.raw").write_bytes(b"\1" * 8192)
        (self.root / "sub" / "disk2.raw").write_bytes(b"\2" * 8192)
        (self.outside / "secret.raw").write_bytes(b"\3" * 8192)
        (self.data / "catalog.db").write_bytes(b"\4" * 8192)
        links = {
            "escape.raw": self.outside / "secret.raw",
            "escape-dir": self.outside,
            "passwd": Path("/etc/passwd"),
            "devnull": Path("/dev/null"),
            "inside.raw": self.root / "sub" / "disk2.raw",
            "loop": self.root / "loop",
            "dangling.raw": self.root / "nothing-here",
            "up": tmp,
        }
        for name, target in links.items():
            (self.root / name).symlink_to(target)
        os.mkfifo(self.root / "fifo")

    def inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real.startswith(str(self.root) + "/")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    made = Site(tmp_path)
    monkeypatch.setenv("BLOCKVAULT_DATA_DIR", str(made.data))
    monkeypatch.setenv("BLOCKVAULT_VOLUME_ROOTS", str(made.root))
    monkeypatch.setenv("BLOCKVAULT_VM_SOCKET_DIR", str(made.sockets))
    get_settings.cache_clear()
    yield made
    get_settings.cache_clear()


def test_the_api_side_takes_only_normal_absolute_paths_inside_a_reported_root() -> None:
    roots = ["/srv/vols", "/data/vms"]
    assert hostpaths.require_under("/srv/vols/a.raw", roots, "installPath", "h") == "/srv/vols/a.raw"
    assert hostpaths.require_under("/data/vms/x/y.qcow2", roots, "installPath", "h") == "/data/vms/x/y.qcow2"
    for bad in (
        "srv/vols/a.raw",
        "/srv/vols/../etc/cron.d/x",
        "/srv/vols/./a.raw",
        "//srv/vols/a.raw",
        "/srv/vols/a.raw/",
        "/srv/vols",
        "/srv/volsx/a.raw",
        "/srv/vols/a\0.raw",
        "/srv/vols/\ud800.raw",
        "",
        "/" + "a" * 5000,
        7,
        None,
        ["/srv/vols/a.raw"],
    ):
        with pytest.raises(PathNotAllowed):
            hostpaths.require_under(bad, roots, "installPath", "h")
    with pytest.raises(PathNotAllowed, match="reported no such folder"):
        hostpaths.require_under("/srv/vols/a.raw", None, "installPath", "h")


def test_new_volumes_are_named_by_the_platform_beside_their_source_or_in_the_first_root() -> None:
    roots = ["/srv/vols", "/data/vms"]
    assert hostpaths.new_volume_path(roots, "u1", "raw", "/data/vms/x/src.raw") == "/data/vms/x/u1.raw"
    assert hostpaths.new_volume_path(roots, "u1", "qcow2", "/data/vms/src.qcow2") == "/data/vms/u1.qcow2"
    assert hostpaths.new_volume_path(roots, "u1", "raw", "/elsewhere/src.raw") == "/srv/vols/u1.raw"
    assert hostpaths.new_volume_path(roots, "u1", "raw") == "/srv/vols/u1.raw"


def test_the_worker_resolves_real_paths_inside_its_roots(site: Site) -> None:
    assert hostpaths.resolve_volume(str(site.root / "disk.raw")) == site.root / "disk.raw"
    assert hostpaths.resolve_volume(str(site.root / "inside.raw")) == site.root / "sub" / "disk2.raw"
    for name in ("escape.raw", "passwd", "devnull", "escape-dir/secret.raw", "up/outside/secret.raw"):
        with pytest.raises(PathNotAllowed, match="not inside"):
            hostpaths.resolve_volume(str(site.root / name))
    for name, reason in (("sub", "folder"), ("fifo", "special file"), ("dangling.raw", "no such file")):
        with pytest.raises(PathNotAllowed, match=reason):
            hostpaths.resolve_volume(str(site.root / name))
    with pytest.raises(PathNotAllowed):
        hostpaths.resolve_volume(str(site.root / "loop"))  # a symlink loop resolves nowhere inside


def test_the_data_folder_stays_out_of_reach_even_under_a_root(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BLOCKVAULT_VOLUME_ROOTS", str(tmp_path))  # a root that holds the data folder
    get_settings.cache_clear()
    assert hostpaths.resolve_volume(str(site.outside / "secret.raw")) == site.outside / "secret.raw"
    with pytest.raises(PathNotAllowed, match="data folder"):
        hostpaths.resolve_volume(str(site.data / "catalog.db"))
    with pytest.raises(PathNotAllowed, match="data folder"):
        hostpaths.resolve_new_volume(str(site.data / "new.raw"))


def test_new_volume_targets_are_new_files_in_a_root(site: Site) -> None:
    assert hostpaths.resolve_new_volume(str(site.root / "new.raw")) == site.root / "new.raw"
    assert hostpaths.resolve_new_volume(str(site.root / "sub" / "new.raw")) == site.root / "sub" / "new.raw"
    with pytest.raises(TargetExists):
        hostpaths.resolve_new_volume(str(site.root / "disk.raw"))
    with pytest.raises(TargetExists):
        hostpaths.resolve_new_volume(str(site.root / "dangling.raw"))  # a symlink is not overwritten
    with pytest.raises(PathNotAllowed, match="not inside"):
        hostpaths.resolve_new_volume(str(site.root / "escape-dir" / "new.raw"))
    with pytest.raises(PathNotAllowed, match="does not exist"):
        hostpaths.resolve_new_volume(str(site.root / "nope" / "new.raw"))


def test_sockets_are_real_sockets_in_the_socket_folder(site: Site) -> None:
    inside, outside = site.sockets / "vm.qmp", site.outside / "other-tenant.qmp"
    servers = []
    for path in (inside, outside):
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(1)
        servers.append(server)
    (site.sockets / "link.qmp").symlink_to(outside)
    (site.sockets / "file.qmp").write_text("not a socket")
    try:
        assert hostpaths.resolve_socket(str(inside), "qmpSocket") == str(inside)
        assert hostpaths.resolve_socket(str(site.sockets / "later.qmp"), "qmpSocket") == str(site.sockets / "later.qmp")
        with pytest.raises(PathNotAllowed, match="not inside"):
            hostpaths.resolve_socket(str(site.sockets / "link.qmp"), "qmpSocket")
        with pytest.raises(PathNotAllowed, match="not inside"):
            hostpaths.resolve_socket(str(outside), "qmpSocket")
        with pytest.raises(PathNotAllowed, match="not a UNIX socket"):
            hostpaths.resolve_socket(str(site.sockets / "file.qmp"), "qmpSocket")
    finally:
        for server in servers:
            server.close()


def test_bad_settings_stop_the_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOCKVAULT_DATA_DIR", str(tmp_path / "data"))
    for value, reason in (
        ("relative/dir", "absolute"),
        ("/", "whole host"),
        (str(tmp_path / "none"), "folder"),
        (":", "no folder"),
    ):
        monkeypatch.setenv("BLOCKVAULT_VOLUME_ROOTS", value)
        get_settings.cache_clear()
        with pytest.raises(UsageError, match=reason):
            hostpaths.volume_roots()
    monkeypatch.delenv("BLOCKVAULT_VOLUME_ROOTS")
    get_settings.cache_clear()
    assert hostpaths.volume_roots() == [str((tmp_path / "data" / "volumes").resolve())]
    get_settings.cache_clear()


# -- the property: arbitrary path text never opens a file outside the roots ---------------------------
_OPENED: list[str] = []
_WATCHING = [False]


def _audit(event: str, args: tuple[object, ...]) -> None:
    if _WATCHING[0] and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
        _OPENED.append(os.fsdecode(args[0]))  # type: ignore[arg-type]


sys.addaudithook(_audit)

PIECES = st.sampled_from(
    ["root", "sub", "disk.raw", "disk2.raw", "escape.raw", "escape-dir", "secret.raw", "passwd", "devnull",
     "inside.raw", "loop", "dangling.raw", "up", "outside", "data", "catalog.db", "fifo", "..", ".", "", "\0",
     "x" * 300, "\ud800", "new.raw", "etc", "dev", "sda"]
)  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(PIECES, min_size=1, max_size=6), absolute=st.booleans(), anchor=st.booleans())
def test_no_path_text_opens_a_file_outside_the_roots(
    site: Site, pieces: list[str], absolute: bool, anchor: bool
) -> None:
    text = "/".join(pieces)
    if anchor:
        text = f"{site.root}/{text}"
    elif absolute:
        text = "/" + text
    _OPENED.clear()
    _WATCHING[0] = True
    try:
        try:
            real = hostpaths.resolve_volume(text)
        except PathNotAllowed:
            real = None
        if real is not None:
            assert site.inside(str(real)), (text, real)
            open_reader(str(real), fmt="raw").close()  # what a backup opens
        try:
            new = hostpaths.resolve_new_volume(text)
        except (PathNotAllowed, TargetExists):
            new = None
        if new is not None:
            assert site.inside(str(new)) and not os.path.lexists(new), (text, new)
    finally:
        _WATCHING[0] = False
    assert all(site.inside(path) for path in _OPENED), (text, _OPENED)
