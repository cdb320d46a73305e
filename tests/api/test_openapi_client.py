"""A client generated from ``/openapi.json`` by a standard generator (openapi-python-client)
works against the API: the document describes the real request and answer shapes, so the
generated models parse what the routes answer (fields, types, envelopes), success and error."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from tests.api.conftest import World


def generate(world: World, tmp: Path) -> Any:
    """The generated package, imported."""
    (tmp / "openapi.json").write_text(json.dumps(world.client.app.openapi()))  # type: ignore[attr-defined]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    made = subprocess.run(
        [
            str(Path(sys.executable).parent / "openapi-python-client"),
            "generate",
            "--path",
            str(tmp / "openapi.json"),
            "--output-path",
            str(tmp / "blockvault_generated"),
            "--meta",
            "none",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    assert "Warning" not in made.stdout + made.stderr, made.stdout + made.stderr  # every operation generated
    sys.path.insert(0, str(tmp))
    try:
        return importlib.import_module("blockvault_generated")
    finally:
        sys.path.remove(str(tmp))


def test_a_generated_client_works(world: World, tmp_path: Path) -> None:
    generated = generate(world, tmp_path)
    calls = importlib.import_module("blockvault_generated.api.default")
    models = importlib.import_module("blockvault_generated.models")
    client = generated.AuthenticatedClient(base_url="http://testserver", token=world.admin_key)
    # the generated client's own transport, pointed at the app in process
    client.set_httpx_client(TestClient(world.client.app, headers={"Authorization": f"Bearer {world.admin_key}"}))

    def call(name: str, **kwargs: Any) -> Any:
        module = importlib.import_module(f"blockvault_generated.api.default.{name}")
        return module.sync_detailed(client=client, **kwargs)

    assert calls is not None
    health = call("health")
    assert health.status_code == 200 and health.parsed.status == "ok"
    # a create, typed both ways: the Envelope in, the Project inventory out
    made = call("create_project", body=models.Envelope(params=models.EnvelopeParams.from_dict({"name": "generated"})))
    assert made.status_code == 200, made.content
    project = made.parsed.inventory
    assert project.name == "generated" and isinstance(project.uuid, str) and isinstance(project.create_date, str)
    # a query: inventories with their types, total with replyWithCount
    listed = call("query_volumes", reply_with_count="true")
    assert listed.status_code == 200, listed.content
    volumes = listed.parsed.inventories
    assert listed.parsed.total == len(volumes) and volumes
    own = world.parties["own"].rows["volume"]
    found = next(v for v in volumes if v.uuid == own)
    assert found.host_uuid == world.host and isinstance(found.size, int) and found.format_ == "raw"
    assert found.user_tags == [] and found.status == "Ready"
    backups = call("query_volume_backups", q=[f"uuid={world.parties['own'].rows['volume-backup']}"]).parsed
    [backup] = backups.inventories
    [ref] = backup.backup_storage_refs
    assert ref.backup_storage_uuid == world.shared["local"] and ref.install_path.startswith("zstore://")
    # an action that starts a job: 202 with the job to poll, then the job's answer
    started = call(
        "volume_backup_action",
        uuid=backup.uuid,
        body=models.VolumeBackupActionBody.from_dict({"verifyVolumeBackup": {}}),
    )
    assert started.status_code == 202 and started.parsed.job_uuid, started.content
    job = call("get_job", uuid=started.parsed.job_uuid)
    assert job.status_code == 202 and job.parsed.state == "Running"
    # an error: the error envelope, parsed
    missing = call("get_projects", uuid="0" * 32)
    assert missing.status_code == 404 and missing.parsed.error.code == "NOT_FOUND"
