"""The Prometheus alert rules shipped in ``deploy/prometheus/``: ``promtool check rules`` accepts
them, ``promtool test rules`` runs their unit tests (and fails on a rule whose threshold is
changed), ``deploy/prometheus.yml`` loads them, and every series a rule reads is one that a
real app's ``GET /metrics`` exports, with the values the rules rely on."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from shared.catalog import db
from shared.catalog import models as m
from shared.notifications.events import notify_event
from tests.api.conftest import admin_settings, app_client

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "blockvault-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "blockvault-rules.test.yml"


def promtool(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: run tests/harness/ensure-system test (Debian package prometheus)"
    return subprocess.run([tool, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd, check=False)


def rule_metric_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    exprs = [rule["expr"] for group in groups for rule in group["rules"]]
    assert len(exprs) >= 7
    return {name for expr in exprs for name in re.findall(r"\bblockvault_[a-z_]+", expr)}


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    checked = promtool("check", "rules", RULES)
    assert checked.returncode == 0 and "SUCCESS" in checked.stdout, checked.stdout + checked.stderr
    tested = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    scrape_config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    assert "prometheus/blockvault-rules.yml" in scrape_config["rule_files"]


def test_the_unit_tests_fail_when_a_rule_changes(tmp_path: Path) -> None:
    changed = RULES.read_text().replace(
        "> 1.5 * blockvault_volume_backup_interval_seconds", "> 3 * blockvault_volume_backup_interval_seconds"
    )
    assert changed != RULES.read_text()
    (tmp_path / RULES.name).write_text(changed)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    tested = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert tested.returncode != 0 and "BlockvaultBackupOverdue" in tested.stdout + tested.stderr
    (tmp_path / RULES.name).write_text(
        RULES.read_text().replace("blockvault_host_connected == 0", "blockvault_host_connected ==")
    )
    assert promtool("check", "rules", tmp_path / RULES.name).returncode != 0


def test_every_series_in_the_rules_is_exported(
    pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin_key, settings = admin_settings(pg_database, tmp_path)
    with app_client(monkeypatch, settings) as client:
        with db.session() as session:
            host = m.Host(name="node-1", status="Disconnected", lastHeartbeat=m.now() - timedelta(hours=1))
            storage = m.BackupStorage(name="master", url="file:///nowhere", totalCapacity=1000, availableCapacity=50)
            session.add_all([host, storage])
            session.flush()
            volume = m.Volume(name="root", hostUuid=host.uuid, installPath="/nowhere.raw", size=1)
            group = m.SchedulerJobGroup(name="nightly", jobType="volumeBackup", jobData={})
            trigger = m.SchedulerTrigger(name="hourly", schedulerType="simple", schedulerInterval=3600)
            failed = m.ApiJob(action="createVolumeBackup", state="Failed", error={"code": "X", "description": "y"})
            session.add_all([volume, group, trigger, failed])
            session.flush()
            session.add(m.SchedulerJob(name="j", schedulerJobGroupUuid=group.uuid, targetResourceUuid=volume.uuid))
            session.add(
                m.SchedulerJobGroupTriggerRef(schedulerJobGroupUuid=group.uuid, schedulerTriggerUuid=trigger.uuid)
            )
            notify_event(session, "verifyDamage", key="t", summary="1 bad chunk", resource_uuid=storage.uuid)
        response = client.get("/metrics", headers={"Authorization": f"Bearer {admin_key}"})
    assert response.status_code == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }
    exported = {name for name, _labels in samples}
    used = rule_metric_names()
    assert not used - exported, sorted(used - exported)
    labels = {"volume": volume.uuid, "name": "root", "host": host.uuid}
    assert samples[("blockvault_volume_backup_interval_seconds", tuple(sorted(labels.items())))] == 3600
    assert samples[("blockvault_volume_last_backup_timestamp_seconds", tuple(sorted(labels.items())))] == 0
    of_storage = {"storage": storage.uuid, "name": "master", "type": "ImageStore", "role": "master"}
    assert samples[("blockvault_storage_fill_ratio", tuple(sorted(of_storage.items())))] == pytest.approx(0.95)
    assert samples[("blockvault_notification_events_total", (("kind", "verifyDamage"),))] == 1
    assert samples[("blockvault_notification_events_total", (("kind", "jobFailed"),))] == 0
    assert samples[("blockvault_host_connected", (("host", host.uuid), ("name", "node-1")))] == 0
