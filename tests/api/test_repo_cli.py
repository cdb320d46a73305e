"""The repository CLI as people run it: a real process, its exit codes, its one-line errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from shared.repository.repo import Repository
from shared.repository.stream import restore_stream
from tests.conftest import ROOT, Cli, MiB

BACKUP_KEYS = {
    "id",
    "installPath",
    "mode",
    "parent",
    "size",
    "bytesRead",
    "bytesWritten",
    "chunks",
    "newChunks",
    "seconds",
}


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("blockvault: error: ")
    return lines[0]


def test_backup_restore_ls_verify_json_contract(cli: Cli, make_raw: Callable[..., Path], tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    volume = make_raw(size=20 * MiB)
    assert cli.json("repo", "init", repo)["encryption"] == "none"
    full = cli.json("repo", "backup", repo, str(volume), "--name", "first")
    assert set(full) == BACKUP_KEYS
    assert full["mode"] == "full" and full["parent"] is None and full["size"] == 20 * MiB
    with open(volume, "r+b") as handle:
        handle.write(b"new data" * 100)
    incr = cli.json("repo", "backup", repo, str(volume))
    assert incr["mode"] == "incremental" and incr["parent"] == full["id"] and incr["newChunks"] == 1
    listed = cli.json("repo", "ls", repo)
    assert [row["id"] for row in listed] == [full["id"], incr["id"]]
    assert listed[0]["name"] == "first"
    restored = cli.json("repo", "restore", repo, incr["id"][:12], str(tmp_path / "out.raw"))
    assert set(restored) == {"id", "bytesWritten", "seconds"}
    assert (tmp_path / "out.raw").read_bytes() == volume.read_bytes()
    verified = cli.run("repo", "verify", repo, "--read-data", check=True)
    assert verified.stdout.startswith("ok: 2 backups")
    forced = cli.json("repo", "backup", repo, str(volume), "--full")
    assert forced["mode"] == "full"
    text = cli.run("repo", "backup", repo, str(volume), check=True).stdout
    assert text.startswith("backup ") and "incremental" in text


def test_bad_usage_exits_2_with_one_line(cli: Cli, make_raw: Callable[..., Path], tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, check=True)
    volume = make_raw(size=4 * MiB)
    cases = {
        "no repository at": ("repo", "backup", str(tmp_path / "none"), str(volume)),
        "no such file": ("repo", "backup", repo, str(tmp_path / "absent.raw")),
        "is a folder": ("repo", "backup", repo, str(tmp_path)),
        "already exists": ("repo", "init", repo),
        "at least 6 hex": ("repo", "restore", repo, "xyz", str(tmp_path / "o.raw")),
        "no backup": ("repo", "restore", repo, "abcdef12", str(tmp_path / "o.raw")),
        "keep-last must be at least 1": ("repo", "prune", repo, "--keep-last", "0"),
        "dirty bitmaps need a qcow2": ("repo", "backup", repo, str(volume), "--bitmap", "b"),
        "exclude each other": ("repo", "backup", repo, str(volume), "--full", "--parent", "abcdef12"),
        "unknown repository scheme": ("repo", "ls", "ftp://host/x"),
        "no token": ("repo", "ls", "http://127.0.0.1:9/x"),
    }
    for expected, args in cases.items():
        proc = cli.run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert expected in one_line_error(proc.stderr), (expected, proc.stderr)
    usage = cli.run("repo", "backup", repo)
    assert usage.returncode == 2 and "Missing argument" in usage.stderr
    assert cli.json("repo", "ls", repo) == []  # nothing was written by the failures


def test_corrupt_qcow2_header_is_a_clear_error(cli: Cli, tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, check=True)
    bad = tmp_path / "broken.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\x00\x00\x00\x09" + b"\x00" * 600)
    proc = cli.run("repo", "backup", repo, str(bad))
    assert proc.returncode == 2
    assert "broken.qcow2" in one_line_error(proc.stderr)


def test_restore_target_that_exists_is_refused_and_untouched(
    cli: Cli, make_raw: Callable[..., Path], tmp_path: Path
) -> None:
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, check=True)
    backup = cli.json("repo", "backup", repo, str(make_raw(size=4 * MiB)))
    target = tmp_path / "keep.raw"
    target.write_bytes(b"do not touch")
    proc = cli.run("repo", "restore", repo, backup["id"], str(target))
    assert proc.returncode == 2 and "exists" in one_line_error(proc.stderr)
    assert target.read_bytes() == b"do not touch"


def test_encrypted_repository_and_passphrases(cli: Cli, make_raw: Callable[..., Path], tmp_path: Path) -> None:
    repo = str(tmp_path / "enc")
    good = {"BLOCKVAULT_PASSPHRASE": "s3cret passphrase"}
    no_pass = cli.run("repo", "init", repo, "--encrypt")
    assert no_pass.returncode == 2 and "BLOCKVAULT_PASSPHRASE" in one_line_error(no_pass.stderr)
    assert cli.json("repo", "init", repo, "--encrypt", env=good)["encryption"] == "aes-256-gcm"
    volume = make_raw(size=8 * MiB)
    backup = cli.json("repo", "backup", repo, str(volume), env=good)
    wrong = cli.run("repo", "backup", repo, str(volume), env={"BLOCKVAULT_PASSPHRASE": "guess"})
    assert wrong.returncode == 2 and "wrong passphrase" in one_line_error(wrong.stderr)
    assert "s3cret" not in wrong.stderr + wrong.stdout
    missing = cli.run("repo", "ls", repo)
    assert missing.returncode == 2 and "encrypted" in one_line_error(missing.stderr)
    cli.run("repo", "restore", repo, backup["id"], str(tmp_path / "o.raw"), env=good, check=True)
    assert (tmp_path / "o.raw").read_bytes() == volume.read_bytes()


def test_repository_url_form(cli: Cli, make_raw: Callable[..., Path], tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'r'}"
    cli.run("repo", "init", url, check=True)
    backup = cli.json("repo", "backup", url, str(make_raw(size=4 * MiB)))
    assert cli.json("repo", "ls", str(tmp_path / "r"))[0]["id"] == backup["id"]


def test_backup_stream_reads_standard_input_and_dedups_per_source(cli: Cli, tmp_path: Path) -> None:
    repo, good = str(tmp_path / "enc"), {"BLOCKVAULT_PASSPHRASE": "stream passphrase"}
    cli.run("repo", "init", repo, "--encrypt", env=good, check=True)
    dump = b"".join(b"INSERT INTO t VALUES (%d, 'row text');\n" % i for i in range(300_000))

    def backup(data: bytes) -> dict[str, object]:
        args = ["repo", "backup-stream", repo, "--source", "database:catalog", "--format", "pg_dump", "--json"]
        done = subprocess.run(
            [sys.executable, "-m", "api.cli", *args],
            input=data,
            capture_output=True,
            env={**cli.env, **good},
            cwd=ROOT,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        result: dict[str, object] = json.loads(done.stdout)
        return result

    first, again = backup(dump), backup(dump)
    assert first["size"] == len(dump) and first["newChunks"] == first["chunks"]
    assert again["newChunks"] == 0 and again["bytesWritten"] == 0 and again["md5"] == first["md5"]
    out = io.BytesIO()
    with Repository.open(repo, "stream passphrase") as opened:
        assert [e.manifest.format for e in opened.backups()] == ["pg_dump", "pg_dump"]
        restore_stream(opened, str(again["id"]), out)
    assert out.getvalue() == dump


def test_a_cli_process_freezes_its_imports_and_still_flushes_unlocks_and_exits(
    cli: Cli, make_raw: Callable[..., Path], tmp_path: Path
) -> None:
    """``blockvault`` freezes what it imported before the command runs (api.cli.freeze_start_heap:
    the teardown at exit no longer walks it); a command that fails still prints its whole
    report, leaves no lock in the repository and exits with its code."""
    repo = tmp_path / "repo"
    cli.run("repo", "init", str(repo), check=True)
    cli.json("repo", "backup", str(repo), str(make_raw(size=4 * MiB)))
    next(path for path in (repo / "chunks").rglob("*") if path.is_file()).unlink()
    # the command as `python -m api.cli` runs it, and how many objects are frozen when it exits
    program = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('frozen', gc.get_freeze_count(), file=sys.stderr))\n"
        "from api.cli import main\n"
        "main(sys.argv[1:], prog_name='blockvault')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", program, "repo", "verify", str(repo)],
        capture_output=True,
        text=True,
        env=cli.env,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith("BAD ") and proc.stdout.splitlines()[-1].startswith("FAILED: 1 backups"), proc.stdout
    assert not list((repo / "locks").iterdir())
    frozen = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("frozen ")]
    assert frozen and frozen[0] > 10_000, proc.stderr
