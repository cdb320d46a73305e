"""The CLI's backup storage options, read from the backend registry.

``blockvault backup-storage add`` and ``blockvault rebuild`` take a storage's URL, (for add) its
type, and every credential flag the registered types declare (:class:`StorageCommand`): each
also read from its variable, so that ``ps`` need not show a secret, and reaching the command as
a keyword argument named like the registration param. The options are made when the command
parses, so a backend registered after this module was imported has its flags too (and the
other client commands, which import this module, never load the backends).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from shared.repository.backends.registry import BackendType


def credential_params(kind: str, flags: Mapping[str, str | None]) -> dict[str, str]:
    """The registration params of a ``kind`` storage among CLI ``flags``: its type's fields and
    the passphrase, the unset ones left out."""
    from shared.repository.backends import registry

    entry = registry.for_type(kind)
    wanted = entry.all_fields if entry is not None else (registry.ENCRYPTION_PASSPHRASE,)
    return {one.name: value for one in wanted if (value := flags.get(one.name))}


@functools.lru_cache(maxsize=16)
def _options(entries: tuple[BackendType, ...], url_flag: str, with_type: bool) -> tuple[click.Option, ...]:
    """The storage options for these registered types (cached: click looks them up several
    times per command line, and must see the same objects each time)."""
    from shared.repository.backends import registry

    forms = ", ".join(f"{entry.url_form} ({entry.storage_type})" for entry in entries)
    made = [click.Option([url_flag, "url"], required=True, help=forms)]
    if with_type:
        names = [entry.storage_type for entry in entries]
        made.append(click.Option(["--type", "kind"], type=click.Choice(names), default=names[0], show_default=True))
    every = {one.name: one for entry in entries for one in entry.fields}
    every[registry.ENCRYPTION_PASSPHRASE.name] = registry.ENCRYPTION_PASSPHRASE
    for one in every.values():
        owners = ", ".join(e.storage_type for e in entries if one in e.fields) or "any type"
        required = [e.storage_type for e in entries if one.name in e.required]
        text = (f"{owners}: {one.help}" if one.help else f"{owners}.") + (
            f" Required by {', '.join(required)}." if required else ""
        )
        made.append(click.Option([one.flag, one.name], envvar=one.envvar, help=text))
    return tuple(made)


class StorageCommand(click.Command):
    """A command taking a storage URL (``url_flag``), with ``with_type`` a ``--type``, and the
    credential flags of every registered type, before its own options."""

    def __init__(self, *args: Any, url_flag: str = "--url", with_type: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.url_flag = url_flag
        self.with_type = with_type

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        from shared.repository.backends import registry

        return [*_options(registry.types(), self.url_flag, self.with_type), *super().get_params(ctx)]


def url_prefixes() -> str:
    """How the URLs of the registered types start: ``file://, http(s):// or s3://``."""
    from shared.repository.backends import registry

    return registry.either([entry.url_prefix for entry in registry.types()])
