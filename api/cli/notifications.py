"""``blockvault notification-target|notification-rule|notification-history``: where alerts go,
which events go there, and what was sent (docs/notifications.md; admins only)."""

from __future__ import annotations

import sys

import click

from api.cli.resources import JSON, ClientGroup, _client, _list_command, _print

TARGET_COLUMNS = ("uuid", "name", "type", "state", "throttleSeconds")
RULE_COLUMNS = ("uuid", "name", "eventType", "state", "targetUuids")
HISTORY_COLUMNS = ("uuid", "createDate", "targetName", "status", "eventCount", "attempts", "lastError")

notification_target = ClientGroup("notification-target", help="Notification targets (webhook, smtp).")
notification_target.add_command(_list_command("notification-targets", TARGET_COLUMNS))
notification_rule = ClientGroup("notification-rule", help="Notification rules: which events go to which targets.")
notification_rule.add_command(_list_command("notification-rules", RULE_COLUMNS))
notification_history = ClientGroup("notification-history", help="What was sent to each target, and how it went.")
notification_history.add_command(_list_command("notification-histories", HISTORY_COLUMNS))


@notification_target.command("create")
@click.option("--name", required=True)
@click.option("--type", "target_type", required=True, type=click.Choice(["webhook", "smtp"]))
@click.option("--url", help="webhook: the URL to POST to.")
@click.option("--secret-env", help="webhook: the environment variable holding the signing secret.")
@click.option("--host", help="smtp: the server.")
@click.option("--port", type=int, help="smtp: default 25, or 587 with --starttls.")
@click.option("--starttls", is_flag=True, default=False, help="smtp: STARTTLS before anything else.")
@click.option("--username", help="smtp: log in as (the password from --password-env).")
@click.option("--password-env", help="smtp: the environment variable holding the password.")
@click.option("--sender", help="smtp: the From address.")
@click.option("--to", "recipients", multiple=True, help="smtp: a recipient (repeatable).")
@click.option("--throttle", "throttle_seconds", type=int, help="At most one message per this many seconds.")
@JSON
def target_create(
    name: str,
    target_type: str,
    url: str | None,
    secret_env: str | None,
    host: str | None,
    port: int | None,
    starttls: bool,
    username: str | None,
    password_env: str | None,
    sender: str | None,
    recipients: tuple[str, ...],
    throttle_seconds: int | None,
    as_json: bool,
) -> None:
    """Make a target (secrets are read from the environment, never from the command line)."""
    import os

    given = {
        "url": url,
        "host": host,
        "port": port,
        "username": username,
        "sender": sender,
        "recipients": list(recipients) or None,
        "throttleSeconds": throttle_seconds,
        "secret": os.environ.get(secret_env) if secret_env else None,
        "password": os.environ.get(password_env) if password_env else None,
    }
    params = {key: value for key, value in given.items() if value is not None}
    if starttls:
        params["starttls"] = True
    _print(_client().create_notification_target(name, target_type, **params), as_json, TARGET_COLUMNS)


@notification_target.command("test")
@click.argument("uuid")
@JSON
def target_test(uuid: str, as_json: bool) -> None:
    """Send a test message now; exit 1 when it did not arrive (the error is in the history row)."""
    row = _client().test_notification_target(uuid)
    _print(row, as_json, HISTORY_COLUMNS)
    if row.get("status") != "Sent":
        sys.exit(1)


@notification_target.command("delete")
@click.argument("uuid")
def target_delete(uuid: str) -> None:
    """Delete a target (rules stop naming it; its history stays)."""
    _client().delete_notification_target(uuid)


@notification_rule.command("create")
@click.option("--name", required=True)
@click.option(
    "--event-type",
    required=True,
    help="jobFailed, backupOverdue, storageDisconnected, storageFull, verifyDamage or hostDisconnected.",
)
@click.option("--target", "target_uuids", multiple=True, required=True, help="A target's uuid (repeatable).")
@click.option("--fill-ratio", type=float, help="storageFull: from this used share (default 0.9).")
@click.option("--tolerance", type=float, help="backupOverdue: late by more than this share of the interval.")
@JSON
def rule_create(
    name: str,
    event_type: str,
    target_uuids: tuple[str, ...],
    fill_ratio: float | None,
    tolerance: float | None,
    as_json: bool,
) -> None:
    """Send events of one type to targets."""
    parameters = {k: v for k, v in (("fillRatio", fill_ratio), ("tolerance", tolerance)) if v is not None}
    _print(_client().create_notification_rule(name, event_type, target_uuids, **parameters), as_json, RULE_COLUMNS)


@notification_rule.command("delete")
@click.argument("uuid")
def rule_delete(uuid: str) -> None:
    _client().delete_notification_rule(uuid)
