"""``blockvault accesskey create|list|delete|disable|enable``: ZStack access keys
(docs/security.md "Access keys"). ``create`` prints the secret, which is shown this once."""

from __future__ import annotations

import json

import click

from api.cli.resources import JSON, ClientGroup, _client, _list_command, _print

COLUMNS = ("uuid", "AccessKeyID", "accountUuid", "state", "description")
accesskey = ClientGroup("accesskey", help="ZStack access keys (signed requests of ZStack's SDKs).")
accesskey.add_command(_list_command("accesskeys", COLUMNS))


@accesskey.command("create")
@click.option("--account", "account_uuid", required=True, help="The account the key acts as.")
@click.option("--description")
@JSON
def accesskey_create(account_uuid: str, description: str | None, as_json: bool) -> None:
    """Make a key (admins): prints its uuid, AccessKeyID and AccessKeySecret (shown this once)."""
    made = _client().create_access_key(account_uuid, description)
    if as_json:
        click.echo(json.dumps(made))
    else:
        _print(made, False, ("uuid", "AccessKeyID", "AccessKeySecret"))


@accesskey.command("delete")
@click.argument("uuid")
def accesskey_delete(uuid: str) -> None:
    """Revoke a key: it opens nothing from now on."""
    _client().delete_access_key(uuid)


@accesskey.command("disable")
@click.argument("uuid")
@JSON
def accesskey_disable(uuid: str, as_json: bool) -> None:
    """Disable a key (admins) until it is enabled again."""
    _print(_client().change_access_key_state(uuid, "disable"), as_json, COLUMNS)


@accesskey.command("enable")
@click.argument("uuid")
@JSON
def accesskey_enable(uuid: str, as_json: bool) -> None:
    """Enable a disabled key (admins)."""
    _print(_client().change_access_key_state(uuid, "enable"), as_json, COLUMNS)
