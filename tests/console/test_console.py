"""The web console in a real browser, against the real service: an admin signs in with a key,
sees the VMs, backs a VM up and watches the job reach Ready, reverts a volume and creates one
from a backup (bytes checked on disk), schedules a job group and sees its history, adds a
Remote storage and syncs to it; a project member signs in with a password and sees its project
only; a wrong password and an expired session. No page asks the API for something it refuses,
and every request stays on the API's origin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from api.client import Client
from tests.conftest import MiB, vm_like_regions, write_regions
from tests.console.conftest import Browser
from tests.service.conftest import Stack
from tests.service.test_storage_topologies import start_host

PASSWORD = "alice's password"


def make_vm(stack: Stack, host: str, name: str, project: str | None, seed: int) -> dict[str, Any]:
    """A VM with a raw root volume and a raw data volume in ``project``."""
    admin = stack.client
    vm = admin.register_vm(name, hostUuid=host, projectUuid=project)
    volumes = {}
    for kind in ("Root", "Data"):
        path = stack.tmp / f"{name}-{kind.lower()}.raw"
        write_regions(path, 8 * MiB, vm_like_regions(8 * MiB, seed=seed + len(volumes)))
        volumes[kind] = admin.register_volume(
            host, str(path), type=kind, vmInstanceUuid=vm["uuid"], name=f"{name}-{kind.lower()}"
        )
    return {"vm": vm, "root": volumes["Root"], "data": volumes["Data"]}


def world(stack: Stack) -> dict[str, Any]:
    host = start_host(stack)
    admin = stack.client
    local = admin.add_backup_storage("local", f"file://{stack.tmp / 'local'}")
    projects = {p: admin.create("projects", {"name": f"team-{p}"})["uuid"] for p in ("a", "b")}
    vms = {"a": make_vm(stack, host, "web-a", projects["a"], 1), "b": make_vm(stack, host, "mail-b", projects["b"], 5)}
    alice = admin.create("accounts", {"name": "alice", "password": PASSWORD})
    admin.request("POST", f"/v1/projects/{projects['a']}/members", json={"params": {"accountUuid": alice["uuid"]}})
    return {"host": host, "local": local, "projects": projects, "vms": vms, "alice": alice}


def off_origin(browser: Browser) -> list[str]:
    return [r.url for r in browser.responses if not r.url.startswith(browser.base + "/")]


def test_admin_backs_up_restores_schedules_and_syncs(stack: Stack, browser: Browser, start_storage_server: Any) -> None:
    setup = world(stack)
    stack.start_beat()
    admin = stack.client
    vm = setup["vms"]["a"]
    page = browser.page

    browser.sign_in_with_key(stack.key)
    table = page.locator("#vm-table")
    for name in ("web-a", "mail-b"):
        assert table.get_by_role("link", name=name).is_visible()
    assert page.locator(f'tr[data-vm="{vm["vm"]["uuid"]}"]').get_by_text("No backup").is_visible()
    browser.shot("overview-empty")
    # the find box and the status filter are the API's selection (GET /v1/overview?q=&status=)
    page.get_by_label("Find").fill("MAIL-")
    table.get_by_role("link", name="web-a").wait_for(state="detached")
    assert table.get_by_role("link", name="mail-b").is_visible()
    page.get_by_label("Find").fill("")
    page.locator("form[role=search] select").select_option("ok")
    table.get_by_role("link", name="mail-b").wait_for(state="detached")
    assert table.locator("tbody tr").count() == 0  # nothing is backed up yet
    page.locator("form[role=search] select").select_option("")
    table.get_by_role("link", name="web-a").wait_for()

    # back the VM up, full, from its page, and watch the job
    table.get_by_role("link", name="web-a").click()
    page.get_by_role("button", name="Back up the VM now").click()
    browser.dialog().get_by_label("Mode").select_option("full")
    browser.dialog().get_by_role("button", name="Back up").click()
    browser.wait_jobs(1)
    states = page.evaluate("window.__jobStates")
    assert any(s.startswith("Running:") for s in states) and states[-1].startswith("Succeeded"), states
    assert "Ready" in next(iter(page.evaluate("window.__jobs").values()))
    root_path, data_path = Path(vm["root"]["installPath"]), Path(vm["data"]["installPath"])
    at_backup = {root_path: root_path.read_bytes(), data_path: data_path.read_bytes()}
    backups = admin.query("volume-backups", f"volumeUuid={vm['root']['uuid']}")["inventories"]
    assert [(b["status"], b["mode"]) for b in backups] == [("Ready", "full")]
    page.wait_for_selector("#vm-backups tr[data-group]")
    browser.shot("vm")

    # the VM writes; revert the root volume from the volume page
    with open(root_path, "r+b") as handle:
        handle.seek(MiB)
        handle.write(b"written after the backup" * 4096)
    assert root_path.read_bytes() != at_backup[root_path]
    page.locator("#volumes").get_by_role("link", name="web-a-root").click()
    row = page.locator(f'tr[data-backup="{backups[0]["uuid"]}"]')
    row.get_by_role("button", name="Revert").click()
    browser.dialog().get_by_role("button", name="Revert").click()
    browser.wait_jobs(2)
    assert root_path.read_bytes() == at_backup[root_path]

    # a new volume from the same backup: the bytes of the root volume at backup time
    row.get_by_role("button", name="New volume").click()
    browser.dialog().get_by_label("Name of the new volume").fill("web-a-restored")
    browser.dialog().get_by_role("button", name="Create volume").click()
    browser.wait_jobs(3)
    made = admin.query("volumes", "name=web-a-restored")["inventories"]
    assert len(made) == 1 and Path(made[0]["installPath"]).read_bytes() == at_backup[root_path]
    browser.shot("volume")

    # a job group with a trigger; its runs appear in the history
    page.get_by_role("navigation").get_by_role("link", name="Scheduling").click()
    page.get_by_role("button", name="New job group").click()
    dialog = browser.dialog()
    dialog.get_by_label("Name").fill("nightly-web")
    dialog.get_by_label("local (ImageStore, master)").check()
    dialog.get_by_label("web-a").check()
    dialog.get_by_role("button", name="Create").click()
    page.wait_for_selector('#groups tr:has-text("nightly-web")')
    page.get_by_role("button", name="New trigger").click()
    dialog = browser.dialog()
    dialog.get_by_label("Name").fill("every-4s")
    dialog.get_by_label("Interval (seconds)").fill("4")
    dialog.get_by_label("Repeat count (empty: forever)").fill("2")
    dialog.get_by_label("Attach to job group").select_option(label="nightly-web")
    dialog.get_by_role("button", name="Create").click()
    trigger_row = page.locator('#triggers tr:has-text("every-4s")')
    trigger_row.wait_for()
    trigger = admin.query("scheduler/triggers", "name=every-4s")["inventories"][0]
    page.locator("#history tr[data-history]").nth(1).wait_for(timeout=120_000)  # both fires' runs
    histories = admin.histories(f"triggerUuid={trigger['uuid']}")
    assert len(histories) == 2 and all(h["success"] for h in histories), histories
    page.locator("#history tr[data-history]").first.get_by_role("button", name="Details").click()
    details = browser.dialog()
    details.wait_for()  # open (shown modal), not only in the DOM, before a key is pressed
    assert vm["vm"]["uuid"] in details.locator("#request-dump").inner_text()
    assert histories[0]["resultDump"] and '"volumeBackupUuids"' in details.locator("#result-dump").inner_text()
    page.keyboard.press("Escape")  # the dialog closes from the keyboard, and leaves the page
    page.locator("dialog").wait_for(state="detached")
    browser.shot("scheduling")

    # a Remote storage (a storage-server) added from the Storage page, then a sync to it
    server = start_storage_server(stack.tmp / "remote-site")
    page.get_by_role("navigation").get_by_role("link", name="Storage").click()
    page.get_by_role("button", name="Add backup storage").click()
    dialog = browser.dialog()
    dialog.get_by_label("Type").select_option("Remote")
    dialog.get_by_label("Name").fill("remote-site")
    dialog.get_by_label("URL of the storage-server").fill(server.url + "/dc1")
    dialog.get_by_label("token").fill(server.token)
    dialog.get_by_role("button", name="Add").click()
    page.wait_for_selector('#storages tr:has-text("remote-site")')
    remote = admin.query("backup-storage", "name=remote-site")["inventories"][0]
    assert remote["type"] == "Remote" and remote["status"] == "Connected"
    browser.shot("storage")
    browser.go(f"vm/{vm['vm']['uuid']}")
    group = backups[0]["groupUuid"]
    page.locator(f'#vm-backups tr[data-group="{group}"]').get_by_role("button", name="Sync").click()
    browser.dialog().get_by_label("To").select_option(label="remote-site (Remote)")
    browser.dialog().get_by_role("button", name="Sync").click()
    browser.wait_jobs(4)
    for backup in vm_backups(admin, group):
        assert {r["backupStorageUuid"]: r["status"] for r in backup["backupStorageRefs"]}[remote["uuid"]] == "Ready"

    browser.go("overview")
    page.wait_for_selector(f'tr[data-vm="{vm["vm"]["uuid"]}"] .badge.ok')
    # its last good backup is the trigger's newest run, which the group did not copy to the remote
    shown = admin.request("GET", "/v1/overview")[1]["vmInstances"]
    assert [v["copies"] for v in shown if v["uuid"] == vm["vm"]["uuid"]] == [{"remote": False}]
    assert page.locator(f'tr[data-vm="{vm["vm"]["uuid"]}"]').get_by_text("behind").count() == 1
    browser.shot("overview")
    browser.go("access")
    page.wait_for_selector("#keys")
    browser.shot("access")

    assert browser.refused() == []
    assert off_origin(browser) == []


def vm_backups(admin: Client, group: str) -> list[dict[str, Any]]:
    return admin.request("GET", f"/v1/vm-backups/{group}")[1]["inventories"]


def test_member_sees_its_project_only_wrong_password_and_expired_session(
    stack: Stack, browser: Browser, pg_database: str
) -> None:
    setup = world(stack)
    other = setup["vms"]["b"]
    own = setup["vms"]["a"]
    stack.client.wait(stack.client.backup_vm(own["root"]["uuid"], name="web-a-first"))
    stack.client.wait(stack.client.backup_vm(other["root"]["uuid"], name="mail-b-first"))
    page = browser.page

    browser.sign_in("alice", "not the password")
    assert "wrong account name or password" in page.get_by_role("alert").inner_text()
    login_refusals = browser.refused()
    assert len(login_refusals) == 1 and "/v1/accounts/login" in login_refusals[0], login_refusals
    browser.responses.clear()

    browser.sign_in("alice", PASSWORD)
    page.wait_for_selector("#vm-table")
    assert page.get_by_text("Signed in as").inner_text().endswith("alice")
    assert page.locator("#vm-table").get_by_role("link", name="web-a").is_visible()
    assert page.get_by_role("navigation").get_by_role("link", name="Storage").count() == 0  # admins only
    browser.shot("overview-member")
    page.locator("#vm-table").get_by_role("link", name="web-a").click()
    page.wait_for_selector("#vm-backups tr[data-group]")
    page.locator("#volumes").get_by_role("link", name="web-a-data").click()
    page.wait_for_selector("tr[data-backup]")
    for route, ready in (("scheduling", "#history"), ("access", "#keys"), ("overview", "#vm-table")):
        browser.go(route)
        page.wait_for_selector(ready)
    page.wait_for_timeout(500)
    assert browser.refused() == []
    assert off_origin(browser) == []
    seen = browser.bodies() + page.content()
    # the other project's uuids and its VM's name, which has letters no hex uuid has: the
    # storage's repositoryUuid is dashed, and once in a thousand runs held "db-b", the old name
    others = [other["vm"]["uuid"], other["root"]["uuid"], other["data"]["uuid"], setup["projects"]["b"], "mail-b"]
    leaks = [
        (call, body)
        for call, body in [*browser.answers(), ("the page", page.content())]
        if any(o in body for o in others)
    ]
    assert leaks == []
    assert own["vm"]["uuid"] in seen

    # the session expires (as BLOCKVAULT_SESSION_TIMEOUT_SECONDS after login): back to sign-in
    engine = create_engine(pg_database)
    with engine.begin() as connection:
        connection.execute(text("UPDATE session SET \"expiredDate\" = now() - interval '1 second'"))
    engine.dispose()
    browser.go("scheduling")
    page.wait_for_selector("form[aria-label='Sign in']")
    assert "the session has expired: log in again" in page.get_by_role("status").inner_text()
    browser.shot("signin-expired")
