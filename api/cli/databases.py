"""``blockvault database register|list|delete``: MySQL/MariaDB databases registered for
database backups (docs/database-backups.md). The password is best kept off the command line:
give the URL without it and ``--password-stdin``."""

from __future__ import annotations

import sys

import click

from api.cli.resources import JSON, ClientGroup, _client, _list_command, _print
from shared.errors import UsageError

COLUMNS = ("uuid", "name", "host", "port", "databaseName")
database = ClientGroup("database", help="Registered MySQL/MariaDB databases (for database backups).")
database.add_command(_list_command("databases", COLUMNS))


@database.command("register")
@click.option("--name", required=True)
@click.option("--url", required=True, help="mysql://user@host:port/database (TCP only)")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
@click.option("--description")
@JSON
def database_register(name: str, url: str, password_stdin: bool, description: str | None, as_json: bool) -> None:
    """Register a database to back up (admins); its password is kept sealed."""
    if password_stdin:
        from sqlalchemy.engine import make_url  # here only: the other REST commands load no SQLAlchemy
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(url).set(password=sys.stdin.readline().rstrip("\n")).render_as_string(hide_password=False)
        except ArgumentError:
            raise UsageError(detail="--url must be mysql://user@host:port/database") from None
    params = {"description": description} if description else {}
    _print(_client().register_database(name, url, **params), as_json, COLUMNS)


@database.command("delete")
@click.argument("uuid")
def database_delete(uuid: str) -> None:
    """Forget a registered database (its backups stay)."""
    _client().request("DELETE", f"/v1/databases/{uuid}")
