"""The API's ASGI middleware: what no request may bring in (docs/security.md "Input").

:class:`BodyLimit` answers 413 for a body over the limit before it is read whole;
:class:`InputGuard` answers 400 for a path, query string or JSON body that no route could
store or answer (NUL, broken Unicode, nesting deeper than :data:`MAX_JSON_DEPTH`).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .envelopes import error_body


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """413 ``PAYLOAD_TOO_LARGE`` for a request body over ``limit`` bytes: before the app runs
    when Content-Length says so, else as soon as the bytes read pass it (the rest is not read,
    and whatever the app answered is replaced)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = error_body("PAYLOAD_TOO_LARGE", f"the request body exceeds {self.limit} bytes")
        await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        total = 0
        exceeded = started = False

        async def limited() -> Message:
            nonlocal total, exceeded
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.limit:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def replacing(message: Message) -> None:
            nonlocal started
            if exceeded:  # the app's answer to a body it could not read: 413 instead
                if not started:
                    started = True
                    await self._refuse(scope, receive, send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, replacing)
        except _BodyTooLarge:
            if not started:
                started = True
                await self._refuse(scope, receive, send)


MAX_JSON_DEPTH = 64


def _bad_text(text: str) -> str | None:
    """Why ``text`` cannot be stored or answered: a NUL or a lone surrogate; None when fine."""
    if "\0" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate)"
    return None


def json_problem(value: Any) -> str | None:
    """What makes a parsed JSON value unacceptable anywhere in the API (nesting deeper than
    ``MAX_JSON_DEPTH``, a string or key with NUL or a lone surrogate); None when fine. Walks
    with its own stack, so no input can exhaust the interpreter's."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return f"the JSON is nested deeper than {MAX_JSON_DEPTH} levels"
        if isinstance(item, str):
            reason = _bad_text(item)
            if reason:
                return f"a string {reason}"
        elif isinstance(item, dict):
            for key, child in item.items():
                reason = _bad_text(key)
                if reason:
                    return f"a key {reason}"
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return None


class InputGuard:
    """400 ``INVALID_ARGUMENT`` before any route runs for input no route can store or answer:
    a path or query string with NUL, or a JSON body nested too deeply or with NUL / broken
    Unicode in a string. A body that is not JSON is passed on (the route says what it wants)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        reason = _bad_text(scope.get("path", "")) or _bad_text(
            unquote(scope.get("query_string", b"").decode("latin-1"))
        )
        if reason:
            await self._refuse(scope, receive, send, f"the URL {reason}")
            return
        messages: list[Message] = []
        body = b""
        if scope.get("method") in ("POST", "PUT", "PATCH", "DELETE"):
            while True:
                message = await receive()
                messages.append(message)
                body += message.get("body", b"")
                if message["type"] != "http.request" or not message.get("more_body"):
                    break
        if body.lstrip()[:1] in (b"{", b"["):
            try:
                problem = json_problem(json.loads(body))
            except RecursionError:
                problem = f"the JSON is nested deeper than {MAX_JSON_DEPTH} levels"
            except ValueError:
                problem = None  # not JSON after all: the route answers that
            if problem:
                await self._refuse(scope, receive, send, problem)
                return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, reason: str) -> None:
        await JSONResponse(error_body("INVALID_ARGUMENT", f"invalid request: {reason}"), status_code=400)(
            scope, receive, send
        )
