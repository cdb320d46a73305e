"""A small ZStack RPC client, written from the contract (docs/api.md, "ZStack wire compatibility")
and ``zstack-messages.tsv`` alone -- deliberately not from the server code.

    zs = ZStackClient("http://127.0.0.1:8080")
    zs.login("admin", "password")                     # APILogInByAccountMsg, SHA-512 hex
    event = zs.call("CreateVolumeBackup", volumeUuid=v, backupStorageUuid=bs, name="b1")
    reply = zs.call("QueryVolumeBackup", conditions=[{"name": "volumeUuid", "op": "=", "value": v}])
    zs.logout()

Sync messages return the Reply's body (``{"inventories": [...], "success": true, ...}``), async
ones poll the job's ``location`` until ``Done`` and return the Event's body
(``{"inventory": {...}, "success": true}``). Every failure is a :class:`ZStackError`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

# the contract's message list, as the repository carries it (a copy of the handbook's, kept equal)
MESSAGES_TSV = Path(__file__).resolve().parents[2] / "docs" / "zstack-messages.tsv"
API_PATH = "/zstack/api/"
LOGIN_REPLY = "org.zstack.header.identity.APILogInReply"  # ZStack's shared reply of every LogIn*Msg


class ZStackError(Exception):
    """An error answer: a failed Reply or Event, an async job in state Error, or an HTTP error
    with the error envelope. ``status`` is the HTTP status of the answer that carried it."""

    def __init__(self, code: str, description: str, details: str = "", *, status: int = 0, body: Any = None) -> None:
        super().__init__(f"{code}: {description}" + (f" ({details})" if details else ""))
        self.code, self.description, self.details = code, description, details
        self.status, self.body = status, body


@dataclass(frozen=True)
class Message:
    name: str  # e.g. CreateVolumeBackup
    java_class: str  # e.g. org.zstack.header.storage.volume.backup.APICreateVolumeBackupMsg
    kind: str  # sync | async
    parameters: tuple[str, ...]
    required: frozenset[str]

    @property
    def reply_class(self) -> str:
        if self.java_class.endswith(".APILogInByAccountMsg"):
            return LOGIN_REPLY
        return self.java_class.removesuffix("Msg") + "Reply"

    @property
    def event_class(self) -> str:
        return self.java_class.removesuffix("Msg") + "Event"


def load_messages(path: Path = MESSAGES_TSV) -> dict[str, Message]:
    """The TSV's messages keyed by name, by Java class and by the class's short name."""
    if not path.is_file():
        raise FileNotFoundError(
            f"zstack-messages.tsv not found at {path} (the repository's copy of the contract's list)"
        )
    table: dict[str, Message] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        columns = line.split("\t")
        if len(columns) < 3:
            raise ValueError(f"{path}: bad line {line!r}")
        name, java_class, kind = (c.strip() for c in columns[:3])
        if kind not in ("sync", "async"):
            raise ValueError(f"{path}: {name}: call kind {kind!r} is neither sync nor async")
        parameters: list[str] = []
        required: set[str] = set()
        for raw in (columns[3] if len(columns) > 3 else "").split(","):
            param = raw.split("(")[0].strip()  # "*password (SHA-512 hex ...)" -> "*password"
            if not param:
                continue
            if param.startswith("*"):
                param = param[1:]
                required.add(param)
            parameters.append(param)
        message = Message(name, java_class, kind, tuple(parameters), frozenset(required))
        for key in (name, java_class, java_class.rsplit(".", 1)[-1]):
            table[key] = message
    return table


def sha512_hex(password: str) -> str:
    return hashlib.sha512(password.encode()).hexdigest()


def raise_for_error(error: Any, *, status: int, body: Any) -> None:
    if not isinstance(error, dict):
        raise ZStackError("BAD_RESPONSE", f"error is not an object: {error!r}", status=status, body=body)
    raise ZStackError(
        str(error.get("code", "")),
        str(error.get("description", "")),
        str(error.get("details", "")),
        status=status,
        body=body,
    )


class ZStackClient:
    def __init__(self, base_url: str, *, session: str | None = None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout)
        self.messages = load_messages()
        self.session = session

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ZStackClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------------------------
    def message(self, name_or_class: str) -> Message:
        try:
            return self.messages[name_or_class]
        except KeyError:
            raise KeyError(f"{name_or_class!r} is not in {MESSAGES_TSV.name}") from None

    def post_raw(self, body: bytes | dict[str, Any]) -> tuple[int, Any]:
        """POST ``body`` (bytes as they are, a dict as JSON) to /zstack/api/: (status, parsed JSON).
        An answer that is not JSON is a ZStackError(BAD_RESPONSE) carrying the status."""
        if isinstance(body, bytes):
            response = self.http.post(API_PATH, content=body, headers={"Content-Type": "application/json"})
        else:
            response = self.http.post(API_PATH, json=body)
        return response.status_code, self._json(response)

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise ZStackError(
                "BAD_RESPONSE",
                f"HTTP {response.status_code} {response.request.method} {response.request.url}: not JSON",
                response.text[:500],
                status=response.status_code,
            ) from None

    def envelope(self, message: Message, params: dict[str, Any], session: str | None) -> dict[str, Any]:
        inner = dict(params)
        if session is not None:
            inner["session"] = {"uuid": session}
        return {message.java_class: inner}

    # -- calls -------------------------------------------------------------------------------------
    def call(
        self,
        message_name_or_java_class: str,
        *,
        session: str | bool | None = True,
        timeout: float = 180.0,
        **params: Any,
    ) -> dict[str, Any]:
        """Send one message. ``session=True`` (default) uses the logged-in session, ``False``/``None``
        sends none, a string sends that one. Returns the Reply's (sync) or Event's (async) body."""
        message = self.message(message_name_or_java_class)
        uuid = self.session if session is True else (session or None)
        status, body = self.post_raw(self.envelope(message, params, uuid))
        if message.kind == "sync":
            return self._reply(message, status, body)
        return self._await(message, status, body, timeout)

    def _reply(self, message: Message, status: int, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ZStackError("BAD_RESPONSE", f"HTTP {status}: answer is not an object", status=status, body=body)
        reply = body.get(message.reply_class)
        if reply is None:
            if "error" in body:  # HTTP error envelope (e.g. a body the server could not dispatch)
                raise_for_error(body["error"], status=status, body=body)
            raise ZStackError(
                "BAD_RESPONSE", f"HTTP {status}: no {message.reply_class} in {sorted(body)}", status=status, body=body
            )
        if not isinstance(reply, dict):
            raise ZStackError("BAD_RESPONSE", f"{message.reply_class} is not an object", status=status, body=body)
        if reply.get("success") is not True:
            raise_for_error(reply.get("error"), status=status, body=body)
        return reply

    def _await(self, message: Message, status: int, body: Any, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        location: str | None = None
        while True:
            if not isinstance(body, dict):
                raise ZStackError("BAD_RESPONSE", f"HTTP {status}: answer is not an object", status=status, body=body)
            state = body.get("state")
            if state == "Done":
                return self._event(message, status, body)
            if state == "Error" or "error" in body:
                raise_for_error(body.get("error"), status=status, body=body)
            if message.event_class in body:  # an Event answered at once (e.g. a failed validation)
                return self._event(message, status, {"result": json.dumps(body)})
            if state != "Processing":
                raise ZStackError(
                    "BAD_RESPONSE", f"HTTP {status}: unexpected job state {state!r}", status=status, body=body
                )
            location = str(body.get("location") or location or "")
            if not location:
                raise ZStackError(
                    "BAD_RESPONSE", f"HTTP {status}: Processing without a location", status=status, body=body
                )
            if time.monotonic() > deadline:
                raise ZStackError("TIMEOUT", f"{message.name} still Processing after {timeout} s at {location}")
            time.sleep(0.3)
            response = self.http.get(location)
            status, body = response.status_code, self._json(response)

    def _event(self, message: Message, status: int, body: dict[str, Any]) -> dict[str, Any]:
        result = body.get("result")
        if not isinstance(result, str):
            raise ZStackError("BAD_RESPONSE", "Done without a result JSON string", status=status, body=body)
        try:
            decoded = json.loads(result)
        except ValueError:
            raise ZStackError("BAD_RESPONSE", "result is not a JSON string", result[:500], status=status) from None
        event = decoded.get(message.event_class) if isinstance(decoded, dict) else None
        if not isinstance(event, dict):
            keys = sorted(decoded) if isinstance(decoded, dict) else type(decoded).__name__
            raise ZStackError("BAD_RESPONSE", f"no {message.event_class} in result: {keys}", status=status, body=body)
        if event.get("success") is not True:
            raise_for_error(event.get("error"), status=status, body=body)
        return event

    # -- conveniences ------------------------------------------------------------------------------
    def login(self, account_name: str, password_plain: str) -> dict[str, Any]:
        """LogInByAccount; keeps the session uuid. Returns the session inventory."""
        reply = self.call("LogInByAccount", session=None, accountName=account_name, password=sha512_hex(password_plain))
        inventory = reply.get("inventory")
        if not isinstance(inventory, dict) or not inventory.get("uuid"):
            raise ZStackError("BAD_RESPONSE", f"{LOGIN_REPLY} without inventory.uuid", body=reply)
        self.session = str(inventory["uuid"])
        return inventory

    def logout(self) -> dict[str, Any]:
        reply = self.call("LogOut", sessionUuid=self.session)
        self.session = None
        return reply

    def query(self, message: str, *conditions: tuple[str, str, Any], **params: Any) -> dict[str, Any]:
        """A Query* message: conditions as (name, op, value) triples, other parameters as they are."""
        rows = [{"name": n, "op": o, "value": str(v)} for n, o, v in conditions]
        return self.call(message, conditions=rows, **params)

    def inventories(self, message: str, *conditions: tuple[str, str, Any], **params: Any) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.query(message, *conditions, **params).get("inventories", [])
        return rows
