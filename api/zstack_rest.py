"""ZStack's REST dialect under ``/zstack/v1`` (docs/zstack-rest.md): ZStack's types in, ZStack's
types out, around the same handlers ``/v1`` has.

``/v1`` keeps its own documented shapes; ZStack's SDKs (the Go SDK ``zstack-sdk-go-v2``: bodies in
``pkg/param``, reply types in ``pkg/view``) decode ZStack's. One layer, :class:`ZStackDialect`,
translates for every route under ``/zstack/v1`` rather than each route doing it:

- requests: a job group's or job's ``parameters`` arrive as ZStack's ``Map<String, String>``
  (``{"backupStorageUuids": "a,b", "fullBackupInterval": "3", "retention": "{...}"}``) and are
  read into the typed jobData ``/v1`` takes (:func:`job_parameters`); anything else is a 400;
- answers (:func:`zstack_types`): dates as ZStack writes them (``Jul 25, 2018 4:55:41 PM``),
  ``metadata`` and ``jobData`` as JSON strings, a trigger's ``startTime``/``stopTime`` (Unix
  seconds) as dates, a job history's ``executeTime`` and a database backup's metadata
  ``createdTime`` as integer Unix milliseconds (the history's ``startTime`` the date), a VM
  backup's result as ``inventories``;
- errors: ZStack's ``{"error": {"code", "description", "details"}}``.

The wire endpoint (``/zstack/api/``) answers with the same types (:func:`zstack_types`).
"""

from __future__ import annotations

import contextlib
import json
import re
from datetime import datetime
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import InvalidArgument
from shared.schedule import MAX_SECONDS, from_seconds

PREFIX = "/zstack/v1"
ISO_DATE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:?\d\d)?$")
JSON_STRING_FIELDS = ("metadata", "jobData")


# -- dates -----------------------------------------------------------------------------------------
def zstack_date(value: str | datetime) -> str:
    """A moment (ISO text or aware datetime) as ZStack writes dates: ``Jul 25, 2018 4:55:41 PM``
    (the server's local time, as ZStack's Gson writes a Timestamp)."""
    moment = datetime.fromisoformat(value.replace("Z", "+00:00")) if isinstance(value, str) else value
    moment = moment.astimezone()
    hour = moment.hour % 12 or 12
    return f"{moment:%b} {moment.day}, {moment.year} {hour}:{moment:%M:%S} {'AM' if moment.hour < 12 else 'PM'}"


def zstack_dates(value: Any) -> Any:
    """``value`` with every ISO timestamp in it (at any depth) written as ZStack's dates."""
    if isinstance(value, dict):
        return {k: zstack_dates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [zstack_dates(v) for v in value]
    if isinstance(value, str) and ISO_DATE.fullmatch(value):
        try:
            return zstack_date(value)
        except ValueError:
            return value
    return value


def _unix_ms(text: str) -> int:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(moment.timestamp() * 1000)


# -- answers ---------------------------------------------------------------------------------------
def zstack_inventory(row: dict[str, Any]) -> dict[str, Any]:
    """One inventory with ZStack's types (the fields' names are the same as on ``/v1``)."""
    out = dict(row)
    metadata = out.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("createdTime"), str):
        with contextlib.suppress(ValueError):  # a database backup's createdTime: Unix ms, as ZStack's
            out["metadata"] = {**metadata, "createdTime": _unix_ms(metadata["createdTime"])}
    for name in JSON_STRING_FIELDS:
        if name in out and out[name] is not None and not isinstance(out[name], str):
            out[name] = json.dumps(out[name], separators=(",", ":"))
    if "schedulerType" in out:  # a trigger: Unix seconds, answered as dates
        for name in ("startTime", "stopTime"):
            value = out.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SECONDS:
                out[name] = zstack_date(from_seconds(value))
    if isinstance(out.get("executeTime"), str) and ISO_DATE.fullmatch(out["executeTime"]):  # a job history
        out.setdefault("startTime", out["executeTime"])
        out["executeTime"] = _unix_ms(out["executeTime"])
    for name in ("backupStorageRefs",):
        if isinstance(out.get(name), list):
            out[name] = [zstack_inventory(r) if isinstance(r, dict) else r for r in out[name]]
    result: dict[str, Any] = zstack_dates(out)
    return result


def zstack_types(value: Any) -> Any:
    """An inventory, or a list of them, with ZStack's types."""
    if isinstance(value, list):
        return [zstack_inventory(v) if isinstance(v, dict) else v for v in value]
    if isinstance(value, dict):
        return zstack_inventory(value)
    return value


def zstack_answer(status: int, body: Any) -> Any:
    """A ``/v1`` answer as ZStack's REST answers it."""
    if not isinstance(body, dict):
        return body
    if status >= 400:
        found = body.get("error")
        error: dict[str, Any] = found if isinstance(found, dict) else {}
        return {
            "error": {
                "code": str(error.get("code") or "INTERNAL_ERROR"),
                "description": str(error.get("description") or f"HTTP {status}"),
                "details": str(error.get("details") or ""),
            }
        }
    out = dict(body)
    inventory = out.get("inventory")
    if isinstance(inventory, dict) and isinstance(inventory.get("volumeBackups"), list) and "groupUuid" in inventory:
        # CreateVmBackup: ZStack answers the VM's volume backups, CreateVmBackupEvent.inventories
        out.pop("inventory")
        out["inventories"] = inventory["volumeBackups"]
    elif isinstance(inventory, dict) and isinstance(inventory.get("inventories"), list) and inventory["inventories"]:
        # a sync or recover: ZStack's VM events carry inventories, the one-backup ones inventory
        out["inventories"] = inventory["inventories"]
        out["inventory"] = inventory["inventories"][0]
    for key in ("inventory", "inventories"):
        if key in out:
            out[key] = zstack_types(out[key])
    return out


# -- requests --------------------------------------------------------------------------------------
JOB_DATA_INTS = ("fullBackupInterval", "bandwidthLimit", "chunksPerRun")
JOB_DATA_BOOLS = ("readData", "repair")  # verify groups'


def _whole(name: str, text: str) -> int:
    if not re.fullmatch(r"\d{1,18}", text.strip()):
        raise InvalidArgument(detail=f"parameters.{name} must be a whole number as a string, got {text[:64]!r}")
    return int(text.strip())


def job_parameters(raw: Any) -> dict[str, Any]:
    """ZStack's ``parameters`` (a map of strings) as the typed jobData: ``backupStorageUuids``
    comma-separated (or a JSON list), ``fullBackupInterval``, ``bandwidthLimit`` and
    ``chunksPerRun`` whole numbers, ``readData`` and ``repair`` "true" or "false", ``retention``
    a JSON object. Other keys pass on as strings (the jobData check names
    unknown ones). InvalidArgument for what is not a map of strings or does not parse."""
    if not isinstance(raw, dict):
        raise InvalidArgument(detail="parameters must be a map of strings, as ZStack's")
    out: dict[str, Any] = {}
    for name, text in raw.items():
        if not isinstance(text, str):
            raise InvalidArgument(
                detail=f"parameters.{name} must be a string (ZStack's parameters are a map of strings), "
                f"got {type(text).__name__}"
            )
        if name == "backupStorageUuids":
            stripped = text.strip()
            if stripped.startswith("["):
                try:
                    value = json.loads(stripped)
                except ValueError:
                    raise InvalidArgument(detail="parameters.backupStorageUuids is not a JSON list") from None
            else:
                value = [part.strip() for part in stripped.split(",") if part.strip()]
            out[name] = value
        elif name in JOB_DATA_INTS:
            out[name] = _whole(name, text)
        elif name in JOB_DATA_BOOLS:
            if text.strip().lower() not in ("true", "false"):
                raise InvalidArgument(detail=f'parameters.{name} must be "true" or "false", got {text[:64]!r}')
            out[name] = text.strip().lower() == "true"
        elif name == "retention":
            try:
                value = json.loads(text)
            except ValueError:
                raise InvalidArgument(detail="parameters.retention must be a JSON object as a string") from None
            if not isinstance(value, dict):
                raise InvalidArgument(detail="parameters.retention must be a JSON object as a string")
            out[name] = value
        else:
            out[name] = text
    return out


# an action path whose empty body names one action (ZStack's SDK sends ReconnectBackupStorage so)
EMPTY_ACTIONS = ((re.compile(rf"^{PREFIX}/backup-storage/[0-9a-f]{{32}}/actions$"), "reconnectBackupStorage"),)


def rewrites(path: str) -> bool:
    """Whether :func:`zstack_request` may change the body of a request to ``path``."""
    return path.startswith(f"{PREFIX}/scheduler/") or any(p.fullmatch(path) for p, _ in EMPTY_ACTIONS)


def zstack_request(path: str, body: Any) -> Any:
    """A request body as ``/v1`` takes it: the ``parameters`` (or ``jobData``) of a scheduling
    call, under ``params`` or an action's key, read by :func:`job_parameters`; an empty body
    (none, or ``{}``) where the path names the action, that action."""
    for pattern, action in EMPTY_ACTIONS:
        if body in (None, {}) and pattern.fullmatch(path):
            return {action: {}}
    if not path.startswith(f"{PREFIX}/scheduler/") or not isinstance(body, dict):
        return body
    out = dict(body)
    for key, value in body.items():
        if isinstance(value, dict):
            for name in ("parameters", "jobData"):
                if name in value and value[name] is not None:
                    out[key] = {**out[key], name: job_parameters(value[name])}
    return out


# -- the layer -------------------------------------------------------------------------------------
def _json_response(status: int, body: Any) -> tuple[Message, Message]:
    data = json.dumps(body, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    return (
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": data, "more_body": False},
    )


class ZStackDialect:
    """ZStack's types on every route under ``/zstack/v1`` (module docstring); everything else
    passes untouched. Sits inside :class:`~api.middleware.BodyLimit`, so the body it reads is
    bounded; JSON answers are rewritten whole, any other answer (a file download) streams on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path != PREFIX and not path.startswith(PREFIX + "/"):
            await self.app(scope, receive, send)
            return
        replayed = await self._rewrite_request(scope, receive, send)
        if replayed is None:
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def rewriting(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                if "json" in Headers(raw=message.get("headers", [])).get("content-type", ""):
                    start = message
                    return
                await send(message)
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            await send_rewritten(start, b"".join(chunks))

        async def send_rewritten(first: Message, data: bytes) -> None:
            try:
                body = json.loads(data) if data else None
            except ValueError:
                body = None
            if body is not None:
                data = json.dumps(zstack_answer(first["status"], body), separators=(",", ":")).encode()
            headers = MutableHeaders(raw=list(first.get("headers", [])))
            headers["content-length"] = str(len(data))
            await send({**first, "headers": headers.raw})
            await send({"type": "http.response.body", "body": data, "more_body": False})

        await self.app(scope, replayed, rewriting)

    async def _rewrite_request(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """The request's receive, its JSON body read as ``/v1`` takes it; None when a 400 was sent."""
        if scope.get("method") not in ("POST", "PUT") or not rewrites(scope["path"]):
            return receive
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            parsed = json.loads(body) if body.strip() else None
        except (ValueError, RecursionError):
            parsed = None  # not JSON (the route answers that), or too deep (InputGuard's 400)
        if parsed is not None or not body.strip():
            try:
                changed = zstack_request(scope["path"], parsed)
            except InvalidArgument as exc:
                start, end = _json_response(
                    400, zstack_answer(400, {"error": {"code": exc.code, "description": str(exc)}})
                )
                await send(start)
                await send(end)
                return None
            if changed is not parsed:
                body = json.dumps(changed).encode()
                headers = MutableHeaders(scope=scope)
                headers["content-length"] = str(len(body))
                headers["content-type"] = "application/json"
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay
