"""Protected backups in the repository itself (the ``protected/`` markers): prune leaves them
and does not count them, ``repo forget`` refuses them in one line, until ``repo protect --off``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from tests.api.test_repo_cli import one_line_error
from tests.conftest import Cli, MiB


def test_protected_backups_survive_prune_and_forget_until_unprotected(
    cli: Cli, make_raw: Callable[..., Path], tmp_path: Path
) -> None:
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, check=True)
    volume = make_raw("a.raw", 4 * MiB, seed=1)
    ids = []
    for _round in range(3):
        with open(volume, "r+b") as handle:
            handle.write(os.urandom(MiB))
        ids.append(cli.json("repo", "backup", repo, str(volume))["id"])
    oldest, middle, newest = ids

    assert cli.json("repo", "protect", repo, oldest[:12]) == {"id": oldest, "protected": True}
    assert [row["protected"] for row in cli.json("repo", "ls", repo)] == [True, False, False]
    pruned = cli.json("repo", "prune", repo, "--keep-last", "1")
    assert (pruned["kept"], pruned["removed"], pruned["protected"]) == ([newest], [middle], [oldest])
    refused = cli.run("repo", "forget", repo, oldest)
    assert refused.returncode == 1
    assert one_line_error(refused.stderr) == (
        f"blockvault: error: backup {oldest[:12]} is protected: delete refused until an admin unprotects it"
    )
    assert cli.json("repo", "gc", repo)["chunksKept"] > 0
    assert cli.run("repo", "verify", repo, "--read-data").returncode == 0  # gc kept its chunks

    missing = cli.run("repo", "protect", repo, "f" * 64)
    assert missing.returncode == 2 and "f" * 12 in one_line_error(missing.stderr)
    assert cli.json("repo", "protect", repo, oldest, "--off") == {"id": oldest, "protected": False}
    assert cli.json("repo", "forget", repo, oldest) == {"removed": oldest}
    assert [row["id"] for row in cli.json("repo", "ls", repo)] == [newest]
