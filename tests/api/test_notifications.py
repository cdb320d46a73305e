"""Notification targets, rules and history through the REST API, the CLI and the Python client
(the app in process on a real PostgreSQL catalog; a real SMTP server and a real webhook
receiver): admins only, secrets never answered, bad inputs 4xx with stable codes, the test
action delivering a signed message and recording it in the history."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from api.cli import notifications as cli
from api.client import Client
from shared.catalog import db
from shared.catalog.models import NotificationDelivery
from tests import notify_fixtures
from tests.api.conftest import admin_settings, app_client
from tests.notify_fixtures import SMTP_PASSWORD, SMTP_USER, WEBHOOK_SECRET, Mailbox, Receiver
from tests.ports import free_port

smtp_server, webhook = notify_fixtures.smtp_server, notify_fixtures.webhook  # fixtures


class Api:
    def __init__(self, client: TestClient, admin_key: str) -> None:
        self.client, self.admin_key = client, admin_key

    def call(self, method: str, path: str, body: Any = None, key: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key or self.admin_key}"}
        response = self.client.request(method, f"/v1{path}", headers=headers, json=body)
        return response.status_code, response.json()

    def ok(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        status, answer = self.call(method, path, body)
        assert status == 200, answer
        return dict(answer)


@pytest.fixture
def api(pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    admin_key, settings = admin_settings(pg_database, tmp_path)
    with app_client(monkeypatch, settings) as client:
        yield Api(client, admin_key)


def hook_params(url: str) -> dict[str, Any]:
    return {"name": "ops-hook", "type": "webhook", "url": url, "secret": WEBHOOK_SECRET, "throttleSeconds": 600}


def mail_params(box: Mailbox) -> dict[str, Any]:
    return {
        "name": "ops-mail",
        "type": "smtp",
        "host": box.host,
        "port": box.port,
        "username": SMTP_USER,
        "password": SMTP_PASSWORD,
        "sender": "blockvault@example.org",
        "recipients": "ops@example.org, oncall@example.org",
    }


def no_secret(answer: Any) -> None:
    text = json.dumps(answer)
    assert WEBHOOK_SECRET not in text and SMTP_PASSWORD not in text and "sealedSecrets" not in text


def test_targets_rules_test_action_and_history(api: Api, webhook: Receiver, smtp_server: Mailbox) -> None:
    hook = api.ok("POST", "/notification-targets", {"params": hook_params(webhook.url)})["inventory"]
    no_secret(hook)
    assert hook["options"] == {"url": webhook.url} and hook["throttleSeconds"] == 600
    mail = api.ok("POST", "/notification-targets", {"params": mail_params(smtp_server)})["inventory"]
    no_secret(mail)
    assert mail["options"]["recipients"] == ["ops@example.org", "oncall@example.org"]
    listed = api.ok("GET", "/notification-targets")
    no_secret(listed)
    assert sorted(t["name"] for t in listed["inventories"]) == ["ops-hook", "ops-mail"]
    no_secret(api.ok("GET", f"/notification-targets/{hook['uuid']}"))

    rule = {"name": "failures", "eventType": "jobFailed", "targetUuids": [hook["uuid"], mail["uuid"]]}
    made = api.ok("POST", "/notification-rules", {"params": rule})["inventory"]
    assert made["targetUuids"] == sorted([hook["uuid"], mail["uuid"]]) and made["state"] == "Enabled"

    sent = api.ok("PUT", f"/notification-targets/{hook['uuid']}/actions", {"testNotificationTarget": {}})["inventory"]
    assert sent["status"] == "Sent" and sent["test"] is True
    assert webhook.signed == [True] and webhook.bodies[0]["test"] is True
    mailed = api.ok("PUT", f"/notification-targets/{mail['uuid']}/actions", {"testNotificationTarget": {}})
    assert mailed["inventory"]["status"] == "Sent" and len(smtp_server.messages) == 1
    assert smtp_server.messages[0]["To"] == "ops@example.org, oncall@example.org"

    # an update that does not name the secret keeps it: the next message is still signed
    moved = Receiver(free_port())
    moved.start()
    try:
        body = {"updateNotificationTarget": {"url": moved.url, "throttleSeconds": 60}}
        updated = api.ok("PUT", f"/notification-targets/{hook['uuid']}/actions", body)["inventory"]
        assert updated["options"] == {"url": moved.url} and updated["throttleSeconds"] == 60
        api.ok("PUT", f"/notification-targets/{hook['uuid']}/actions", {"testNotificationTarget": {}})
        assert moved.signed == [True]
    finally:
        moved.stop()
    # and the target answers nothing any more: the test is a Failed row in the history
    failed = api.ok("PUT", f"/notification-targets/{hook['uuid']}/actions", {"testNotificationTarget": {}})
    assert failed["inventory"]["status"] == "Failed" and "ConnectError" in failed["inventory"]["lastError"]

    histories = api.ok("GET", "/notification-histories?sort=createDate")["inventories"]
    assert [(h["targetName"], h["status"]) for h in histories] == [
        ("ops-hook", "Sent"),
        ("ops-mail", "Sent"),
        ("ops-hook", "Sent"),
        ("ops-hook", "Failed"),
    ]
    no_secret(histories)

    with db.session() as session:  # a digest the beat has not sent yet
        session.add(NotificationDelivery(targetUuid=hook["uuid"], targetName="ops-hook", status="Pending", eventIds=[]))
    api.ok("DELETE", f"/notification-targets/{hook['uuid']}")
    closed = api.ok("GET", f"/notification-histories?q=targetUuid={hook['uuid']}&q=test=false")["inventories"]
    assert [(h["status"], h["lastError"]) for h in closed] == [("Failed", "the target was deleted")]
    assert api.ok("GET", f"/notification-rules/{made['uuid']}")["inventories"][0]["targetUuids"] == [mail["uuid"]]
    status, answer = api.call("GET", f"/notification-targets/{hook['uuid']}")
    assert (status, answer["error"]["code"]) == (404, "NOT_FOUND")


def test_members_get_403_and_bad_inputs_are_4xx_with_stable_codes(api: Api) -> None:
    account = api.ok("POST", "/accounts", {"params": {"name": "member"}})["inventory"]["uuid"]
    member = api.ok("POST", "/api-keys", {"params": {"accountUuid": account}})["inventory"]["key"]
    target = api.ok("POST", "/notification-targets", {"params": hook_params("http://127.0.0.1:9/hook")})["inventory"]
    for method, path, body in (
        ("GET", "/notification-targets", None),
        ("POST", "/notification-targets", {"params": hook_params("http://127.0.0.1:9/x")}),
        ("PUT", f"/notification-targets/{target['uuid']}/actions", {"testNotificationTarget": {}}),
        ("GET", "/notification-histories", None),
        ("GET", "/notification-events", None),
    ):
        status, answer = api.call(method, path, body, key=member)
        assert (status, answer["error"]["code"]) == (403, "FORBIDDEN"), (path, answer)

    bad_targets = [
        {"name": "x"},
        {"name": "x", "type": "gotify", "url": "http://127.0.0.1/"},
        {"name": "x", "type": "webhook", "url": "ftp://example.org/"},
        {"name": "x", "type": "webhook", "url": "http://user:pw@example.org/"},
        {"name": "x", "type": "webhook", "url": "http://example.org/", "throttleSeconds": -1},
        {"name": "x", "type": "webhook", "url": "http://example.org/", "secret": 5},
        {"name": "x", "type": "smtp", "host": "mail", "sender": "a@b"},
        {"name": "x", "type": "smtp", "host": "mail", "sender": "a@b", "recipients": ["c@d"], "port": 70000},
        {"name": "x", "type": "smtp", "host": "mail", "sender": "a@b", "recipients": ["c@d"], "username": "u"},
        {"name": "x", "type": "smtp", "host": "mail", "sender": "a@b", "recipients": ["c@d"], "starttls": "yes"},
    ]
    for params in bad_targets:
        status, answer = api.call("POST", "/notification-targets", {"params": params})
        assert (status, answer["error"]["code"]) == (400, "INVALID_ARGUMENT"), (params, answer)
    uuid = target["uuid"]
    bad_rules: list[tuple[dict[str, Any], int, str]] = [
        ({"name": "r", "eventType": "diskOnFire", "targetUuids": [uuid]}, 400, "INVALID_ARGUMENT"),
        ({"name": "r", "eventType": "jobFailed", "targetUuids": []}, 400, "INVALID_ARGUMENT"),
        ({"name": "r", "eventType": "jobFailed", "targetUuids": ["nope"]}, 400, "INVALID_ARGUMENT"),
        ({"name": "r", "eventType": "jobFailed", "targetUuids": ["0" * 32]}, 404, "NOT_FOUND"),
        ({"name": "r", "eventType": "storageFull", "targetUuids": [uuid], "parameters": {"fillRatio": 2}}, 400, ""),
        ({"name": "r", "eventType": "jobFailed", "targetUuids": [uuid], "parameters": {"fillRatio": 0.5}}, 400, ""),
    ]
    for params, want, code in bad_rules:
        status, answer = api.call("POST", "/notification-rules", {"params": params})
        assert (status, answer["error"]["code"]) == (want, code or "INVALID_ARGUMENT"), (params, answer)
    full = {"name": "r", "eventType": "storageFull", "targetUuids": [uuid], "parameters": {"fillRatio": 0.8}}
    made = api.ok("POST", "/notification-rules", {"params": full})["inventory"]
    body = {"updateNotificationRule": {"eventType": "jobFailed"}}  # fillRatio means nothing to jobFailed
    status, answer = api.call("PUT", f"/notification-rules/{made['uuid']}/actions", body)
    assert (status, answer["error"]["code"]) == (400, "INVALID_ARGUMENT"), answer
    for body in ({"sendEverything": {}}, {"changeNotificationTargetState": {"stateEvent": "off"}}):
        status, answer = api.call("PUT", f"/notification-targets/{uuid}/actions", body)
        assert (status, answer["error"]["code"]) == (400, "INVALID_ARGUMENT"), answer
    status, answer = api.call("PUT", f"/notification-targets/{'f' * 32}/actions", {"testNotificationTarget": {}})
    assert (status, answer["error"]["code"]) == (404, "NOT_FOUND")


def test_the_cli_and_the_client(api: Api, webhook: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    api.client.headers["Authorization"] = f"Bearer {api.admin_key}"
    client = Client("http://testserver", api.admin_key)
    client.http = api.client  # the CLI's calls go to the app in process
    monkeypatch.setattr(cli, "_client", lambda: client)
    monkeypatch.setenv("HOOK_SECRET", WEBHOOK_SECRET)
    args = ["create", "--name", "cli-hook", "--type", "webhook", "--url", webhook.url, "--secret-env", "HOOK_SECRET"]
    run = CliRunner().invoke(cli.notification_target, [*args, "--json"])
    assert run.exit_code == 0, run.output
    target = json.loads(run.output)
    assert WEBHOOK_SECRET not in run.output
    run = CliRunner().invoke(cli.notification_target, ["test", target["uuid"]])
    assert run.exit_code == 0 and "Sent" in run.output, run.output
    assert webhook.signed == [True]
    run = CliRunner().invoke(
        cli.notification_rule, ["create", "--name", "r", "--event-type", "nope", "--target", target["uuid"]]
    )
    assert run.exit_code == 2 and len(run.output.strip().splitlines()) == 1 and "eventType" in run.output, run.output
    rule = client.create_notification_rule("full", "storageFull", [target["uuid"]], fillRatio=0.8)
    assert rule["parameters"] == {"fillRatio": 0.8}
    webhook.stop()  # down: the test action exits 1, its row says why
    run = CliRunner().invoke(cli.notification_target, ["test", target["uuid"]])
    assert run.exit_code == 1 and "Failed" in run.output, run.output
    statuses = [row["status"] for row in client.notification_histories()]
    assert statuses == ["Failed", "Sent"]
    assert os.environ["HOOK_SECRET"] not in json.dumps(client.notification_histories())
