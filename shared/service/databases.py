"""Registered databases: the MySQL/MariaDB databases (ZStack's management database) an admin
names for database backups, by a TCP URL ``mysql://user:password@host:port/database`` (or
``mariadb://``). The password is sealed to the row (:func:`shared.secret.seal`) and read only
by the worker that dumps or loads it (:func:`target_of`); answers show the URL without it. A
URL that names no host, a socket, or any option is refused: a worker reaches a registered
database over TCP only, never a path of its host.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session

from shared.catalog.models import ManagedDatabase, new_uuid
from shared.errors import InvalidArgument, require
from shared.mysqldump import NAME, Target
from shared.secret import seal, unseal

LABEL = b"blockvault database password v1"
SCHEMES = ("mysql", "mariadb")
DEFAULT_PORT = 3306


def _parse(url: object) -> tuple[str, int, str, str | None, str]:
    """host, port, user, password, database of a registered database's URL."""
    if not isinstance(url, str):
        raise InvalidArgument(detail="url must be a string: mysql://user:password@host:port/database")
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InvalidArgument(detail="url must be mysql://user:password@host:port/database") from None
    if parsed.get_backend_name() not in SCHEMES:
        raise InvalidArgument(detail="url: only mysql:// and mariadb:// databases are registered")
    if not parsed.host or "/" in parsed.host:
        raise InvalidArgument(detail="url must name a host (TCP only: no sockets)")
    if parsed.query:
        raise InvalidArgument(detail="url may carry no options (sockets and client options are refused)")
    if not parsed.username:
        raise InvalidArgument(detail="url must name a user")
    if not parsed.database or not NAME.match(parsed.database):
        raise InvalidArgument(detail="url must name the database (letters, digits and _)")
    port = parsed.port or DEFAULT_PORT
    if not 1 <= port <= 65535:
        raise InvalidArgument(detail="url: the port must be 1 to 65535")
    password = None if parsed.password is None else str(parsed.password)
    return parsed.host, port, parsed.username, password, parsed.database


def register(session: Session, params: dict[str, Any]) -> ManagedDatabase:
    """POST /v1/databases {name, description, url} (admins)."""
    require(params, "name", "url")
    host, port, user, password, database = _parse(params["url"])
    Target(host, port, user, password or "", database)  # line breaks and names checked once, here
    row = ManagedDatabase(
        uuid=new_uuid(),
        name=params["name"],
        description=params.get("description"),
        engine="MySQL",
        host=host,
        port=port,
        username=user,
        databaseName=database,
    )
    if password is not None:
        row.sealedPassword = seal(LABEL, row.uuid, password.encode())
    session.add(row)
    session.flush()
    return row


def url_of(row: ManagedDatabase) -> str:
    """The row's URL without its password (for answers and job results)."""
    return f"mysql://{row.username}@{row.host}:{row.port}/{row.databaseName}"


def target_of(row: ManagedDatabase, database: str | None = None) -> Target:
    """How a worker reaches the registered database (or ``database`` on its server)."""
    try:
        password = unseal(LABEL, row.uuid, row.sealedPassword).decode() if row.sealedPassword else ""
    except ValueError:
        raise InvalidArgument(
            detail=f"database {row.name} ({row.uuid}): its password was sealed under another server secret; "
            "register it again"
        ) from None
    return Target(row.host, row.port, row.username, password, database or row.databaseName)
