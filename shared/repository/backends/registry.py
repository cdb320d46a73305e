"""The backend registry: every storage type, one entry per backend module (restic's ``location.Registry``).

A backend module declares one :class:`BackendType` and registers it when imported (``ENTRY =
register(BackendType(...))``): its URL schemes, its backup storage type name, its credential
and option fields (:class:`Field`: which are secret, which required, the CLI flag and the
variable it also reads, the setting a missing one falls back on), whether its repositories must
be encrypted, and how it opens from a URL and options. Everything that knows storage types reads
the registry and nothing else: :func:`~shared.repository.backends.open_backend`, registering
and checking backup storage (:mod:`shared.storage`), which credentials are sealed
(:mod:`shared.credentials`), the CLI's storage flags and ``rebuild`` (:mod:`api.cli.storage_flags`).

The built-in backend modules (:data:`BUILTIN`, one line each) are imported only when a read
needs them: a lookup by scheme imports them in order until one claims the scheme (opening a
folder never imports httpx or boto3); a read of every type imports them all. A backend from
elsewhere registers the same way, by importing its module.
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlparse

from shared.forksafe import ForkSafeLock

from .base import Backend

# The built-in backend modules of this package, in lookup order: a new one is a module here
# and its name in this list.
BUILTIN = ("file", "http", "s3")

Opener = Callable[[str, Mapping[str, str | None]], Backend]
Lookup = Callable[[str], str | None]


def needs_host(url: str) -> str | None:
    """Why ``url`` cannot locate a network storage (it names no host or bucket), or None."""
    return None if urlparse(url).netloc else f"{url!r} names no host or bucket"


@dataclass(frozen=True)
class Field:
    """One credential or option of a storage type.

    It is a registration param named ``name``, kept in the storage's credentials (sealed in the
    catalog when ``secret``), given to the backend as option ``option``, and on the CLI the flag
    ``flag`` (also read from ``envvar``, so that ``ps`` need not show a secret). Registration
    refuses a storage without a ``required`` one. A process opening a storage that lacks it
    takes the value of the settings field ``setting`` (:class:`~shared.settings_model.Settings`).
    An ``identity`` field is part of where the storage is: two storages with one URL are the
    same unless it differs (an S3 endpoint). A field name means the same in every type that
    declares it.
    """

    name: str
    help: str = ""
    secret: bool = False
    required: bool = False
    option: str = ""
    flag: str = ""
    envvar: str | None = None
    setting: str | None = None
    identity: bool = False

    def __post_init__(self) -> None:
        if not self.option:
            object.__setattr__(self, "option", self.name)
        if not self.flag:
            object.__setattr__(self, "flag", "--" + re.sub(r"(?<!^)([A-Z])", r"-\1", self.name).lower())

    def same_meaning(self, other: Field) -> bool:
        """Whether ``other`` (a field of another type with the same name) means the same:
        sealed alike, the same backend option, CLI flag, variable and setting."""
        keys = ("secret", "option", "flag", "envvar", "setting", "identity")
        return all(getattr(self, key) == getattr(other, key) for key in keys)


# Every storage type takes it: the passphrase of a repository encrypted client-side. It is the
# repository's, not the backend's, so it is no backend option.
ENCRYPTION_PASSPHRASE = Field(
    "encryptionPassphrase",
    help="the repository's passphrase: encrypted client-side.",
    secret=True,
    envvar="BLOCKVAULT_STORAGE_PASSPHRASE",
)


@dataclass(frozen=True)
class BackendType:
    """One storage type: what the registry knows of a backend.

    ``storage_type`` is the backup storage ``type`` (ImageStore, Remote, PublicCloud); its URLs
    start with one of ``schemes`` and pass ``check_url`` (which says why one cannot locate such
    a storage, or None); ``plain_paths``: a location without a scheme (a folder) is this
    backend's too. ``open(location, options)`` makes the backend from a URL and the options its
    ``fields`` name; it reads nothing else (no environment) and raises UsageError for a location
    or options it cannot use. ``encrypted``: its repositories are always encrypted client-side,
    so registration requires :data:`ENCRYPTION_PASSPHRASE`. ``url_form`` shows a URL in help.
    """

    storage_type: str
    schemes: tuple[str, ...]
    open: Opener
    fields: tuple[Field, ...] = ()
    encrypted: bool = False
    url_form: str = ""
    plain_paths: bool = False
    check_url: Callable[[str], str | None] = needs_host

    @property
    def all_fields(self) -> tuple[Field, ...]:
        """Its fields and the passphrase every type takes."""
        return (*self.fields, ENCRYPTION_PASSPHRASE)

    @property
    def required(self) -> tuple[str, ...]:
        """The params registration requires (the passphrase when ``encrypted``)."""
        names = [f.name for f in self.fields if f.required]
        return (*names, ENCRYPTION_PASSPHRASE.name) if self.encrypted else tuple(names)

    @property
    def url_prefix(self) -> str:
        """How its URLs start, for messages: ``file://``, ``http(s)://``."""
        return self.url_form.split("//", 1)[0] + "//" if self.url_form else f"{self.schemes[0]}://"

    def options(self, credentials: Mapping[str, object], settings: Lookup | None = None) -> dict[str, str | None]:
        """The options :attr:`open` takes, from a storage's ``credentials`` (registration params
        or what the catalog keeps); a field they lack (or leave empty) is the ``settings`` value
        of its setting, when ``settings`` is given. Empty ones are left out."""
        options: dict[str, str | None] = {}
        for one in self.fields:
            value = credentials.get(one.name)
            if not value and settings is not None and one.setting:
                value = settings(one.setting)
            if value:
                options[one.option] = str(value)
        return options


_lock = ForkSafeLock(threading.RLock)

_types: dict[str, BackendType] = {}  # by storage type, in registration order


def register(entry: BackendType) -> BackendType:
    """Add ``entry`` to the registry; returns it. ValueError when its type name or a scheme is
    taken, or a field name another type declares means something else there."""
    with _lock:
        if entry.storage_type in _types:
            raise ValueError(f"storage type {entry.storage_type} is registered already")
        for other in _types.values():
            taken = set(entry.schemes) & set(other.schemes)
            if taken or (entry.plain_paths and other.plain_paths):
                what = ", ".join(sorted(taken)) or "plain paths"
                raise ValueError(f"{entry.storage_type}: {what} belong to {other.storage_type}")
        known = {f.name: f for other in _types.values() for f in other.all_fields}
        flags = {f.flag: f.name for f in known.values()}
        for one in entry.all_fields:
            if one.name in known and not one.same_meaning(known[one.name]):
                raise ValueError(f"{entry.storage_type}: field {one.name} differs from the one of the same name")
            if flags.get(one.flag, one.name) != one.name:
                raise ValueError(f"{entry.storage_type}: flag {one.flag} is field {flags[one.flag]}'s")
        _types[entry.storage_type] = entry
        return entry


def unregister(storage_type: str) -> None:
    """Remove a registered type (a test's dummy backend); built-in modules stay imported and so
    are not registered again."""
    with _lock:
        _types.pop(storage_type, None)


def _load_builtin(until: Callable[[], BackendType | None] | None = None) -> BackendType | None:
    """Import the built-in backend modules in order, stopping once ``until`` finds its entry."""
    for name in (None, *BUILTIN):
        if name is not None:
            importlib.import_module(f"{__package__}.{name}")
        found = until() if until is not None else None
        if found is not None:
            return found
    return None


def for_scheme(scheme: str) -> BackendType | None:
    """The type whose URLs have ``scheme`` (``""``: a plain path), or None."""

    def find() -> BackendType | None:
        return next((t for t in list(_types.values()) if scheme in t.schemes or (not scheme and t.plain_paths)), None)

    return _load_builtin(find)


def for_location(location: str) -> BackendType | None:
    """The type that opens ``location`` (a URL, or a plain path), or None."""
    return for_scheme(urlparse(location).scheme)


def for_type(storage_type: str) -> BackendType | None:
    """The type named ``storage_type`` (``Remote``), or None."""
    return _load_builtin(lambda: _types.get(storage_type))


def types() -> tuple[BackendType, ...]:
    """Every registered type: the built-in ones first, in :data:`BUILTIN` order, then the
    others in the order they registered."""
    _load_builtin()
    builtin = [f"{__package__}.{name}" for name in BUILTIN]
    entries = list(_types.values())

    def rank(entry: BackendType) -> int:
        module = getattr(entry.open, "__module__", "")
        return builtin.index(module) if module in builtin else len(builtin) + entries.index(entry)

    return tuple(sorted(entries, key=rank))


def fields() -> tuple[Field, ...]:
    """Every field of every type, once each; the passphrase last."""
    every: dict[str, Field] = {}
    for entry in types():
        every.update({f.name: f for f in entry.fields})
    return (*every.values(), ENCRYPTION_PASSPHRASE)


def secret_names() -> tuple[str, ...]:
    """The names of the fields sealed at rest."""
    return tuple(f.name for f in fields() if f.secret)


def option_names() -> tuple[str, ...]:
    """The names of the fields kept readable (not secret)."""
    return tuple(f.name for f in fields() if not f.secret)


def either(words: list[str]) -> str:
    """``a, b or c``."""
    return " or ".join(filter(None, (", ".join(words[:-1]), words[-1]))) if words else ""
