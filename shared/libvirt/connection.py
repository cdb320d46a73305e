"""The worker's libvirt connection: which URI (``BLOCKVAULT_LIBVIRT_URI``), opening it with a
timeout, closing it, and libvirt's default event loop for whoever wants events.

``libvirt`` (libvirt-python, the ``libvirt`` extra) is imported here and only here, lazily:
:func:`module` is None when it is not installed, and every other module of the package takes
the connection it is given.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from shared.config import get_settings
from shared.errors import LibvirtError
from shared.forksafe import ForkSafeLock

log = logging.getLogger(__name__)

DEFAULT_URI = "qemu:///system"
SOCKETS = ("/run/libvirt/libvirt-sock", "/var/run/libvirt/libvirt-sock")
OFF = ("", "off", "none")

_lock = ForkSafeLock()

_event_loop: threading.Thread | None = None
_opening: dict[str, threading.Thread] = {}


def module() -> ModuleType | None:
    """The ``libvirt`` module, or None when libvirt-python is not installed."""
    try:
        import libvirt
    except ImportError:
        return None
    with _lock:
        if not getattr(libvirt, "_blockvault_quiet", False):
            # libvirt prints every error on stderr unless a handler takes them; ours are raised
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            libvirt._blockvault_quiet = True
    module_: ModuleType = libvirt
    return module_


def switched_off() -> bool:
    """``BLOCKVAULT_LIBVIRT_URI`` is ``off``: no libvirt for this worker, whatever the host runs,
    until it restarts with another setting."""
    value = get_settings().libvirt_uri
    return value is not None and value.strip().lower() in OFF


def configured_uri() -> str | None:
    """The libvirt URI this worker uses: ``BLOCKVAULT_LIBVIRT_URI`` (``off``: none), else
    ``qemu:///system`` when libvirt-python imports and libvirtd's socket is there, else None."""
    value = get_settings().libvirt_uri
    if value is not None:
        return None if switched_off() else value.strip()
    if module() is not None and any(os.path.exists(path) for path in SOCKETS):
        return DEFAULT_URI
    return None


def _reason(exc: BaseException) -> str:
    text = exc.get_error_message() if hasattr(exc, "get_error_message") else str(exc)
    return " ".join(str(text or exc).split()) or type(exc).__name__


def open_connection(uri: str, timeout: float | None = None) -> Any:
    """A read-write ``virConnect`` to ``uri``; LibvirtError (with libvirt's reason) when
    libvirt-python is missing, the URI does not answer within ``timeout`` seconds (default
    ``BLOCKVAULT_LIBVIRT_TIMEOUT_SECONDS``) or refuses."""
    libvirt = module()
    if libvirt is None:
        raise LibvirtError(uri=uri, detail="libvirt-python is not installed (pip install 'blockvault[libvirt]')")
    wait = get_settings().libvirt_timeout_seconds if timeout is None else timeout
    result: dict[str, Any] = {}

    def attempt() -> None:
        try:
            result["conn"] = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            result["error"] = _reason(exc)

    # libvirt.open has no timeout of its own (a TCP URI to a silent server hangs for good): it
    # runs in a thread of its own, and while one still waits no second one is started
    with _lock:
        waiting = _opening.get(uri)
        if waiting is not None and waiting.is_alive():
            raise LibvirtError(uri=uri, detail="no answer (an earlier connection attempt still waits)")
        opener = threading.Thread(target=attempt, daemon=True, name="libvirt-open")
        _opening[uri] = opener
    opener.start()
    opener.join(wait)
    if opener.is_alive():
        raise LibvirtError(uri=uri, detail=f"no answer within {wait:g} s")
    if "error" in result:
        raise LibvirtError(uri=uri, detail=result["error"])
    conn = result.get("conn")
    if conn is None:
        raise LibvirtError(uri=uri, detail="the connection failed")
    return conn


def close(conn: Any) -> None:
    """Close ``conn``; a connection that already broke is closed quietly."""
    libvirt = module()
    errors: tuple[type[BaseException], ...] = (libvirt.libvirtError,) if libvirt is not None else ()
    with contextlib.suppress(*errors):
        conn.close()


@contextlib.contextmanager
def connect(uri: str | None = None, timeout: float | None = None) -> Iterator[Any]:
    """``with connect() as conn``: this worker's libvirt (or ``uri``), closed after;
    LibvirtError when none is configured or it does not answer."""
    chosen = uri or configured_uri()
    if chosen is None:
        raise LibvirtError(uri="(none)", detail="this host has no libvirt (BLOCKVAULT_LIBVIRT_URI)")
    conn = open_connection(chosen, timeout)
    try:
        yield conn
    finally:
        close(conn)


def libvirt_error(exc: BaseException, uri: str) -> LibvirtError:
    """A ``libvirtError`` as ours, with libvirt's one-line reason."""
    return LibvirtError(uri=uri, detail=_reason(exc))


def error_types() -> tuple[type[BaseException], ...]:
    """What libvirt raises (for ``except``), empty when it is not installed."""
    libvirt = module()
    return (libvirt.libvirtError,) if libvirt is not None else ()


def start_event_loop() -> None:
    """Register libvirt's default event implementation and run it in a daemon thread (once
    per process): needed before opening a connection whose events (domain lifecycle, block
    jobs) a caller registers callbacks for."""
    global _event_loop  # noqa: PLW0603 - one loop per process
    libvirt = module()
    if libvirt is None:
        raise LibvirtError(uri="(none)", detail="libvirt-python is not installed")
    with _lock:
        if _event_loop is not None:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        _event_loop = threading.Thread(target=run, daemon=True, name="libvirt-events")
        _event_loop.start()
