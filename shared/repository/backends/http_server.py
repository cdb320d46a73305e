"""``blockvault storage-server``: repositories over HTTP(S) for backups kept in another data center.

Objects live in a :class:`~shared.repository.backends.file.FileBackend` under ``--root``
(``ROOT/<name>`` for the repository ``http(s)://host:port/<name>``, ``ROOT`` for the bare
URL), so a stored object is always whole: a body streams into ``tmp/``, is fdatasynced and
renamed (or, for ``overwrite=0``, hard-linked) into place; ``flush`` fsyncs the folders.
The routes, key rules and status table are those of :mod:`shared.repository.backends.http`,
the client's side of the same protocol.

Tokens (any combination, at least one): ``--token`` opens every repository and may do
everything, or with ``--append-only`` only list, read and store new objects (no overwrite, no
delete: 403) except below ``locks/`` (the repository's lock files, as restic's rest-server
allows). A site token (``--site-token NAME=TOKEN``) opens only the repository ``/NAME`` and is
always append-only there; anywhere else it is answered 401 like a wrong token, so it does not
tell whether another site exists. ``--admin-token`` opens every repository and may always do
everything (prune, gc).

What is stored is checked first (:mod:`shared.repository.backends.http_checks`): lock objects, the names of
chunks and manifests, and in repositories without keys their content against their names.
An address that sends too many wrong or missing tokens gets 429 for those (a valid token is
always served): ``--auth-max-failures`` within ``--auth-failure-window`` seconds.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NoReturn

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from shared.errors import BackendError, BackendForbidden, UsageError
from shared.failpoints import failpoint
from shared.ratelimit import FailureWindow
from shared.repository.backends.file import FileBackend, os_error
from shared.repository.backends.http import API, MISSING_LIMIT, Status, invalid_key
from shared.repository.locks import LOCK_MAX_BYTES

from .http_checks import Check, ObjectChecks, Refused, classify

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_MAX_OBJECT = 256 * MiB
LIST_CHUNK = 64 * 1024  # bytes of listing per write: one thread hop per ~700 objects
CHECKS_AT_ONCE = 4  # bodies decoded and hashed at once (http_checks.py)
AUTH_MAX_FAILURES = 10  # bad tokens from one address in AUTH_FAILURE_WINDOW seconds: then 429
AUTH_FAILURE_WINDOW = 60.0
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_TOKEN = re.compile(r"[!-+\--~]+")  # printable ASCII, no space, no comma (the list separator)
Role = Literal["admin", "writer", "appender"]


@dataclass(frozen=True)
class Grant:
    """What a token may do: ``role`` in every repository, or (``site`` set) only in ``ROOT/<site>``."""

    role: Role
    site: str | None = None


def parse_site_tokens(entries: Iterable[str], source: str) -> dict[str, str]:
    """``{name: token}`` from ``NAME=TOKEN`` entries (``source`` names them in errors, which
    never contain a token). UsageError for a malformed entry, an invalid or duplicate name, or
    a name inside another site's folder (``a`` and ``a/b``: ``a``'s token could read ``a/b``)."""
    pairs: list[tuple[str, str]] = []
    for number, entry in enumerate(entries, 1):
        name, sep, token = entry.strip().partition("=")
        if not sep or not name.strip("/") or not token:
            raise UsageError(detail=f"{source} entry {number} is not NAME=TOKEN")
        pairs.append((name, token))
    return check_sites(pairs, source)


def check_sites(pairs: Iterable[tuple[str, str]], source: str) -> dict[str, str]:
    """``{name: token}`` of ``(name, token)`` pairs, checked as :func:`parse_site_tokens` says."""
    sites: dict[str, str] = {}
    for raw_name, token in pairs:
        name = raw_name.strip("/")
        if not name or "=" in name or invalid_key(name) or API in name.split("/"):
            raise UsageError(detail=f"{source}: {name!r} is no valid repository name")
        if not _TOKEN.fullmatch(token):
            raise UsageError(
                detail=f"{source}: the token of site {name!r} must be printable ASCII without spaces or commas"
            )
        if name in sites:
            raise UsageError(detail=f"{source}: site {name!r} is given twice")
        for other in sites:
            if name.startswith(other + "/") or other.startswith(name + "/"):
                raise UsageError(
                    detail=f"{source}: site {name!r} and site {other!r} nest: one's folder holds the other"
                )
        sites[name] = token
    return sites


def site_tokens_from_env(value: str | None) -> dict[str, str]:
    """``BLOCKVAULT_STORAGE_SITE_TOKENS``: ``name=token,name2=token2`` (blanks around entries
    and empty entries ignored)."""
    entries = [entry for entry in (value or "").split(",") if entry.strip()]
    return parse_site_tokens(entries, "BLOCKVAULT_STORAGE_SITE_TOKENS")


def check_tokens(token: str | None, site_tokens: Mapping[str, str], admin_token: str | None) -> None:
    """UsageError unless there is a token and no two tokens (of any kind) are the same."""
    if not (token or site_tokens or admin_token):
        raise UsageError(
            detail="storage-server needs a token: --token (BLOCKVAULT_STORAGE_TOKEN), --site-token NAME=TOKEN "
            "(BLOCKVAULT_STORAGE_SITE_TOKENS) or --admin-token (BLOCKVAULT_STORAGE_ADMIN_TOKEN)"
        )
    if token and admin_token == token:
        raise UsageError(detail="--admin-token must differ from --token")
    owners: dict[str, str] = {}
    named = [("--token", token), ("--admin-token", admin_token)]
    named += [(f"the token of site {name!r}", value) for name, value in site_tokens.items()]
    for owner, value in named:
        if not value:
            continue
        if value in owners:
            raise UsageError(detail=f"{owner} is the same as {owners[value]}: every token must be different")
        owners[value] = owner


@dataclass
class Counters:
    """What ``GET /v1/stats`` reports (since the process started)."""

    requests: int = 0
    bytesReceived: int = 0
    bytesSent: int = 0
    objectsWritten: int = 0


class StorageServer:
    """The ASGI application's state and handlers (``app`` is the Starlette app)."""

    def __init__(
        self,
        root: Path,
        token: str | None,
        *,
        append_only: bool = False,
        admin_token: str | None = None,
        site_tokens: Mapping[str, str] | None = None,
        max_object_size: int = DEFAULT_MAX_OBJECT,
        auth_max_failures: int = AUTH_MAX_FAILURES,
        auth_failure_window: float = AUTH_FAILURE_WINDOW,
    ) -> None:
        sites = check_sites((site_tokens or {}).items(), "site tokens")
        check_tokens(token, sites, admin_token)
        self.root = root.absolute()
        self.append_only = append_only
        self.max_object_size = max_object_size
        self._tokens: list[tuple[bytes, Grant]] = []
        if admin_token:
            self._tokens.append((f"Bearer {admin_token}".encode(), Grant("admin")))
        if token:
            self._tokens.append((f"Bearer {token}".encode(), Grant("appender" if append_only else "writer")))
        for site, site_token in sites.items():
            self._tokens.append((f"Bearer {site_token}".encode(), Grant("appender", site)))
        self._stores: dict[str, FileBackend] = {}
        self._checks = ObjectChecks()
        self._failures = FailureWindow(auth_max_failures, auth_failure_window)
        self._checking = anyio.Semaphore(CHECKS_AT_ONCE)
        self.counters = Counters()
        methods = ["GET", "HEAD", "PUT", "DELETE", "POST"]
        self.app = Starlette(routes=[Route("/{path:path}", self.dispatch, methods=methods)])

    # -- helpers ----------------------------------------------------------------------------
    def _grant(self, request: Request) -> Grant | None:
        given = request.headers.get("authorization", "").encode("latin-1")
        grant: Grant | None = None
        for expected, candidate in self._tokens:  # compare with every token: no timing hint
            if hmac.compare_digest(given, expected) and grant is None:
                grant = candidate
        return grant

    def _refuse_token(self, request: Request) -> NoReturn:
        """Refuse a request without a valid token for its repository: 429 with Retry-After
        while its address is throttled (not counted again), else 401, counted. Requests with
        a valid token are never throttled: another client behind the same address is served."""
        client = request.client.host if request.client else "unknown"
        wait = self._failures.retry_after(client)
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            raise Refused(
                Status.TOO_MANY_REQUESTS,
                f"too many failed authentications from {client}: retry in {seconds} s",
                headers={"retry-after": str(seconds)},
            )
        self._failures.failed(client)
        if self._failures.retry_after(client) is not None:
            log.warning("storage_server.auth_throttled client=%s seconds=%s", client, self._failures.seconds)
        raise Refused(Status.UNAUTHORIZED, "a valid Authorization: Bearer token is required")

    def _store(self, repository: str) -> FileBackend:
        store = self._stores.get(repository)
        if store is None:
            store = self._stores[repository] = FileBackend(self.root / repository if repository else self.root)
        return store

    def _create(self, repository: str) -> bool:
        """Make ``ROOT/<repository>`` (never ROOT itself: a vanished disk must fail)."""
        path = self.root
        created = False
        try:
            os.stat(path)
            for part in Path(repository).parts:
                path = path / part
                with contextlib.suppress(FileExistsError):
                    path.mkdir()
                    created = True
        except OSError as exc:
            raise os_error(str(self.root), exc, f"create {repository}") from None
        return created

    @staticmethod
    def _error(status: Status, detail: str) -> JSONResponse:
        return JSONResponse({"error": status.name.lower(), "detail": detail}, status_code=status)

    # -- dispatch ---------------------------------------------------------------------------
    async def dispatch(self, request: Request) -> Response:
        started = time.perf_counter()
        self.counters.requests += 1
        try:
            response = await self._route(request)
        except Refused as exc:
            body = {"error": exc.error, "detail": exc.detail}
            response = JSONResponse(body, status_code=exc.status, headers=exc.headers)
        except BackendError as exc:
            status = Status.for_error(exc)
            response = self._error(status, str(exc.fields.get("detail") or exc.fields.get("key") or status.meaning))
            if status >= 500:
                log.warning("storage_server.storage_error path=%s detail=%s", request.url.path, exc)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "storage_server.request %s %s %s %.1fms",
                request.method,
                request.url.path,
                response.status_code,
                (time.perf_counter() - started) * 1000,
            )
        return response

    async def _route(self, request: Request) -> Response:
        path: str = request.scope["path"]
        repository, sep, rest = path.partition(f"/{API}/")
        if not sep:
            raise Refused(Status.NOT_FOUND, f"no route {path}: the protocol is under /{API}/")
        repository = repository.strip("/")
        op, _, key = rest.partition("/")
        method = request.method
        if op == "health" and method in ("GET", "HEAD"):
            return JSONResponse({"status": "ok"})
        grant = self._grant(request)
        if grant is None or (grant.site is not None and repository != grant.site):
            # a site token elsewhere is answered like a wrong token: whether that repository
            # (another site's) exists is not told
            self._refuse_token(request)
        if op == "stats" and grant.site is not None:  # server-wide counters: other sites' traffic
            raise Refused(Status.FORBIDDEN, "stats are server-wide: they need --token or --admin-token")
        if repository and (invalid_key(repository) or API in repository.split("/")):
            raise Refused(Status.BAD_REQUEST, f"invalid repository name {repository!r}")
        store = self._store(repository)
        try:
            return await self._operation(request, store, repository, op, key, grant.role)
        except BackendError:
            if not store.root.is_dir():
                raise Refused(Status.GONE, f"no repository folder {repository or '(root)'}: create it first") from None
            raise

    async def _operation(
        self, request: Request, store: FileBackend, repository: str, op: str, key: str, role: Role
    ) -> Response:
        method = request.method
        if op == "objects":
            reason = invalid_key(key)
            if reason:
                raise Refused(Status.BAD_REQUEST, f"{reason}: {key!r}")
            if method == "GET":
                return await self._get(request, store, key)
            if method == "HEAD":
                return self._head(store, key)
            if method == "PUT":
                return await self._put(request, store, repository, key, role)
            if method == "DELETE":
                return self._delete(store, key, role)
        elif op == "list" and method == "GET":
            return self._list(store, request.query_params.get("prefix", ""))
        elif op == "missing" and method == "POST":
            return await self._missing(request, store)
        elif op == "create" and method == "POST":
            return Response(status_code=Status.CREATED if self._create(repository) else Status.NO_CONTENT)
        elif op == "flush" and method == "POST":
            await run_in_threadpool(store.flush)
            return Response(status_code=Status.NO_CONTENT)
        elif op == "capacity" and method == "GET":
            total, available = self._store("").capacity() or (0, 0)
            return JSONResponse({"total": total, "available": available})
        elif op == "stats" and method == "GET":
            return JSONResponse(asdict(self.counters))
        raise Refused(Status.BAD_REQUEST, f"no route {method} /{API}/{op}")

    # -- objects ----------------------------------------------------------------------------
    async def _get(self, request: Request, store: FileBackend, key: str) -> Response:
        spec = request.headers.get("range")
        if spec is None:
            data = await run_in_threadpool(store.get, key)
            self.counters.bytesSent += len(data)
            return Response(data, media_type="application/octet-stream")
        match = _RANGE.fullmatch(spec.strip())
        if not match or not (match[1] or match[2]):
            raise Refused(Status.BAD_REQUEST, f"unsupported range {spec!r}: use bytes=a-b or bytes=a-")
        size = store.stat(key).size
        if match[1]:
            start = int(match[1])
            end = min(int(match[2]), size - 1) if match[2] else size - 1
        else:  # bytes=-n: the last n bytes
            start, end = max(0, size - int(match[2])), size - 1
        if start >= size:
            return Response(status_code=Status.RANGE_PAST_END, headers={"content-range": f"bytes */{size}"})
        if end < start:
            raise Refused(Status.BAD_REQUEST, f"empty range {spec!r}")
        data = await run_in_threadpool(store.get, key, start, end - start + 1)
        self.counters.bytesSent += len(data)
        headers = {"content-range": f"bytes {start}-{start + len(data) - 1}/{size}"}
        return Response(data, status_code=Status.PARTIAL, headers=headers, media_type="application/octet-stream")

    def _head(self, store: FileBackend, key: str) -> Response:
        info = store.stat(key)
        headers = {
            "content-length": str(info.size),
            "x-object-size": str(info.size),
            "x-object-mtime": repr(info.mtime),
        }
        return Response(headers=headers, media_type="application/octet-stream")

    async def _drain(self, request: Request) -> int:
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
        return received

    async def _put(self, request: Request, store: FileBackend, repository: str, key: str, role: Role) -> Response:
        place = classify(self.root, repository, key)
        check = self._checks.check_for(place, appender=role == "appender")
        limit = LOCK_MAX_BYTES if place is not None and place.kind == "locks" else self.max_object_size
        declared = request.headers.get("content-length")
        if declared is not None and int(declared) > limit:
            raise Refused(Status.TOO_LARGE, f"{declared} bytes is over the limit of {limit}")
        overwrite = request.query_params.get("overwrite", "1") not in ("0", "false")
        no_overwrite = role == "appender" and not key.startswith("locks/")
        if (not overwrite or no_overwrite) and os.path.exists(store.root / key):
            # Deduplicated or refused: read the body off the connection, write nothing.
            self.counters.bytesReceived += await self._drain(request)
            if overwrite:
                raise BackendForbidden(location=store.location, detail=f"append-only: {key} exists")
            return Response(status_code=Status.NO_CONTENT)
        received = await self._receive(request, store, key, limit)
        if received is None:
            return Response(status_code=Status.BAD_REQUEST)  # nobody is listening any more
        fd, tmp = received
        if check is not None:
            await self._check(check, store, fd, tmp, f"{repository}/{key}" if repository else key)
        created = await run_in_threadpool(
            lambda: store.install_tmp(fd, tmp, key, overwrite=overwrite and not no_overwrite)
        )
        if not created:
            if overwrite:  # an appender lost a race with another writer of the same key
                raise BackendForbidden(location=store.location, detail=f"append-only: {key} exists")
            return Response(status_code=Status.NO_CONTENT)
        self.counters.objectsWritten += 1
        failpoint("storage_server.object_written")
        return Response(status_code=Status.CREATED)

    async def _receive(self, request: Request, store: FileBackend, key: str, limit: int) -> tuple[int, Path] | None:
        """Stream the body into a new temporary file of ``store``: its descriptor (open) and
        path, or None when the client went away (nothing kept). Refused (413) past ``limit``
        bytes."""
        fd, tmp = store.open_tmp(key)
        received = 0
        try:
            with _discarded_on_error(store, fd, tmp, key):
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > limit:
                        raise Refused(Status.TOO_LARGE, f"body over the limit of {limit} bytes")
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
        except ClientDisconnect:
            log.info("storage_server.put_abandoned key=%s after=%d", key, received)
            return None
        finally:
            self.counters.bytesReceived += received
        return fd, tmp

    async def _check(self, check: Check, store: FileBackend, fd: int, tmp: Path, where: str) -> None:
        """Run ``check`` on a received body off the event loop, ``CHECKS_AT_ONCE`` at a time
        (decoding holds up to zstd's window in memory); a body refused (logged) or that
        cannot be read back is discarded: nothing is stored."""
        try:
            with _discarded_on_error(store, fd, tmp, where):
                async with self._checking:
                    await run_in_threadpool(check, tmp)
        except Refused as exc:
            log.warning("storage_server.object_refused key=%s error=%s detail=%s", where, exc.error, exc.detail)
            raise

    def _delete(self, store: FileBackend, key: str, role: Role) -> Response:
        if role == "appender" and not key.startswith("locks/"):
            raise BackendForbidden(location=store.location, detail=f"append-only: cannot delete {key}")
        store.delete(key)
        return Response(status_code=Status.NO_CONTENT)

    # -- batches ----------------------------------------------------------------------------
    def _list(self, store: FileBackend, prefix: str) -> Response:
        if prefix and (prefix.startswith("/") or any(part in (".", "..") for part in prefix.split("/"))):
            raise Refused(Status.BAD_REQUEST, f"invalid prefix {prefix!r}")
        counters = self.counters

        def lines() -> Iterator[bytes]:
            count = 0
            parts: list[bytes] = []
            size = 0
            try:
                for info in store.list(prefix):
                    line = json.dumps({"key": info.key, "size": info.size, "mtime": info.mtime}).encode() + b"\n"
                    parts.append(line)
                    size += len(line)
                    count += 1
                    if size >= LIST_CHUNK:
                        block = b"".join(parts)
                        parts, size = [], 0
                        counters.bytesSent += len(block)
                        yield block
                parts.append(json.dumps({"end": True, "count": count}).encode() + b"\n")
            except (BackendError, OSError) as exc:  # the status is sent: say so in the stream
                log.warning("storage_server.list_failed prefix=%s: %s", prefix, exc)
                parts.append(json.dumps({"error": "server_error", "detail": str(exc)}).encode() + b"\n")
            block = b"".join(parts)
            counters.bytesSent += len(block)
            yield block

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def _missing(self, request: Request, store: FileBackend) -> Response:
        body = await request.body()
        self.counters.bytesReceived += len(body)
        try:
            keys = json.loads(body)["keys"]
            if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise Refused(Status.BAD_REQUEST, 'the body must be {"keys": [string, ...]}') from None
        if len(keys) > MISSING_LIMIT:
            raise Refused(Status.BAD_REQUEST, f"at most {MISSING_LIMIT} keys per request")
        for key in keys:
            reason = invalid_key(key)
            if reason:
                raise Refused(Status.BAD_REQUEST, f"{reason}: {key!r}")
        root = store.root
        absent = await run_in_threadpool(lambda: [key for key in keys if not os.path.exists(root / key)])
        data = json.dumps({"missing": absent}).encode()
        self.counters.bytesSent += len(data)
        return Response(data, media_type="application/json")


@contextlib.contextmanager
def _discarded_on_error(store: FileBackend, fd: int, tmp: Path, what: str) -> Iterator[None]:
    """Close and remove the temporary file ``tmp`` when the body raises (an OSError becomes a
    BackendError naming ``what``); nothing of a failed put is kept."""
    try:
        yield
    except OSError as exc:
        store.discard_tmp(fd, tmp)
        raise os_error(store.location, exc, what) from None
    except BaseException:
        store.discard_tmp(fd, tmp)
        raise


def usable_root(root: Path) -> str | None:
    """Why ``root`` cannot hold repositories, or None when it can."""
    if not root.is_dir():
        return f"--root {root} is not a folder"
    if not os.access(root, os.W_OK | os.X_OK):
        return f"--root {root} is not writable"
    return None


def run(
    root: Path,
    token: str | None,
    *,
    host: str = "127.0.0.1",
    port: int = 8081,
    append_only: bool = False,
    admin_token: str | None = None,
    site_tokens: Mapping[str, str] | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    max_object_size: int = DEFAULT_MAX_OBJECT,
    auth_max_failures: int = AUTH_MAX_FAILURES,
    auth_failure_window: float = AUTH_FAILURE_WINDOW,
) -> None:
    """Serve until stopped (SIGTERM / Ctrl-C)."""
    import uvicorn

    server = StorageServer(
        root,
        token,
        append_only=append_only,
        admin_token=admin_token,
        site_tokens=site_tokens,
        max_object_size=max_object_size,
        auth_max_failures=auth_max_failures,
        auth_failure_window=auth_failure_window,
    )
    log.info(  # which kinds of token and the site names; never a token
        "storage_server.tokens global=%s admin=%s sites=%s",
        ("append-only" if append_only else "full") if token else "none",
        "yes" if admin_token else "no",
        ",".join(sorted(site_tokens or {})) or "none",
    )
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(
            server.app,
            host=host,
            port=port,
            ssl_certfile=tls_cert,
            ssl_keyfile=tls_key,
            log_level="info",
            access_log=False,  # storage_server.request lines instead (with -v): no headers, no token
            timeout_keep_alive=75,
            server_header=False,
        )
