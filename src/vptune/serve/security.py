"""What lets the server be exposed: API keys, allowed Host headers and time limits on clients.

- ``ApiKeys``: keys read from a file (one per line, optionally followed by the tasks it may
  use); requests carry ``Authorization: Bearer KEY``. Only SHA-256 digests of the keys are
  kept, and a presented key is compared with every one of them by ``hmac.compare_digest``,
  so neither the time taken nor any message or log line tells anything about a key.
- ``AccessControl`` (ASGI middleware) checks the key before the request body is read:
  401 without a valid key, 403 for a task outside the key's scope; ``/health`` stays open.
- ``AllowedHosts`` refuses a request whose ``Host`` header names another server (DNS
  rebinding, host-header poisoning) with 400.
- ``BodyDeadline`` cuts a request whose body arrives too slowly with 408, and
  ``timed_http_protocol`` gives uvicorn's HTTP/1.1 protocol a deadline for the request line
  and headers, so slow-header and slow-body clients cannot hold connections open.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import re
from pathlib import Path
from typing import Any, Callable, Iterable

from .multitask import TASK_NAME

OPEN_PATHS = frozenset({"/health"})
MIN_KEY_LENGTH = 16
_KEY = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces
_TASK_PATH = re.compile(r"^/v1/tasks/([^/]+)(/|$)")


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


@dataclasses.dataclass(frozen=True)
class ApiKeys:
    """Digests of the accepted keys, each with the tasks it may use (``None``: every task)."""

    entries: tuple[tuple[bytes, frozenset[str] | None], ...]

    def scope_of(self, presented: bytes | None) -> tuple[bool, frozenset[str] | None]:
        """(valid, tasks) for a presented key; every stored digest is compared, match or not."""
        digest = _digest(presented or b"\0")
        valid, tasks = False, None
        for stored, scope in self.entries:
            if hmac.compare_digest(stored, digest) and presented:
                valid, tasks = True, scope
        return valid, tasks

    def __repr__(self) -> str:  # never print digests either
        return f"ApiKeys({len(self.entries)} keys)"


def read_api_keys(path: str | Path) -> ApiKeys:
    """Keys from ``path``: ``KEY [TASK ...]`` per line (tasks separated by spaces or commas);
    blank lines and ``#`` comments are skipped. Errors name the line, never the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--api-key-file {path} not found: give a file with one key per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"--api-key-file {path} is not UTF-8 text: write one key per line") from None
    entries, seen = [], {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, *tasks = [part for part in re.split(r"[\s,]+", line) if part]
        where = f"--api-key-file {path}, line {number}"
        if not _KEY.match(key) or len(key) < MIN_KEY_LENGTH:
            raise ValueError(
                f"{where}: a key must be at least {MIN_KEY_LENGTH} printable characters without spaces "
                "(e.g. from `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
        bad = [task for task in tasks if not TASK_NAME.match(task)]
        if bad:
            raise ValueError(f"{where}: {bad[0]!r} is not a task name (letters, digits, '_' or '-', at most 64)")
        digest = _digest(key)
        if digest in seen:
            raise ValueError(f"{where}: the same key as line {seen[digest]}; give each key one line")
        seen[digest] = number
        entries.append((digest, frozenset(tasks) if tasks else None))
    if not entries:
        raise ValueError(f"--api-key-file {path} holds no key: write one key per line, optionally followed by its tasks")
    return ApiKeys(tuple(entries))


def _bearer(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" and token.strip() else None
    return None


async def _json(send: Callable, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class AccessControl:
    """401 without a valid key, 403 for a task outside its scope, before the body is read.
    The key's task scope is left in ``scope["state"]["vptune_tasks"]`` for the task listing."""

    def __init__(self, app: Any, keys: ApiKeys) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        valid, tasks = self.keys.scope_of(_bearer(scope["headers"]))
        if not valid:
            return await _json(
                send, 401, "missing or invalid API key: send the header 'Authorization: Bearer KEY'",
                {"WWW-Authenticate": "Bearer"},
            )
        match = _TASK_PATH.match(scope["path"])
        if tasks is not None and match and match.group(1) not in tasks:
            return await _json(send, 403, "this API key may not use this task")
        scope.setdefault("state", {})["vptune_tasks"] = tasks
        await self.app(scope, receive, send)


def default_allowed_hosts(bind: str | None = None) -> tuple[str, ...]:
    """localhost, 127.0.0.1 and ::1, and the address the server binds to (unless a wildcard)."""
    hosts = ["localhost", "127.0.0.1", "::1"]
    if bind and bind not in ("0.0.0.0", "::", "") and bind.lower() not in hosts:
        hosts.append(bind.strip("[]").lower())
    return tuple(hosts)


def host_name(header: str) -> str:
    """The host part of a ``Host`` header: ``[::1]:8000`` -> ``::1``, ``Example.com:80`` -> ``example.com``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class AllowedHosts:
    """400 for a ``Host`` header outside ``hosts`` (``"*"`` allows any; ``.example.com`` any subdomain)."""

    def __init__(self, app: Any, hosts: Iterable[str]) -> None:
        self.app = app
        self.hosts = {h.strip().strip("[]").lower() for h in hosts if h.strip()}
        self.any = "*" in self.hosts

    def allowed(self, name: str) -> bool:
        return name in self.hosts or any(h.startswith(".") and name.endswith(h) for h in self.hosts)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or self.any:
            return await self.app(scope, receive, send)
        header = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"host"), "")
        if not header or not self.allowed(host_name(header)):
            return await _json(
                send, 400, f"Host header {header[:100]!r} is not one this server answers to: "
                "use an allowed host name, or start the server with --allowed-hosts NAME",
                {"Connection": "close"},
            )
        await self.app(scope, receive, send)


class BodyDeadline:
    """408 (and the connection closed) when a request body is not complete ``timeout_s`` after
    the request started, however slowly its bytes keep coming."""

    def __init__(self, app: Any, timeout_s: float) -> None:
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastapi import HTTPException

        loop = asyncio.get_running_loop()
        deadline, done = loop.time() + self.timeout_s, False

        async def timed() -> dict:
            nonlocal done
            if done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise HTTPException(
                    408, f"the request body did not arrive within {self.timeout_s:g} s: send it at once",
                    headers={"Connection": "close"},
                ) from None
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed, send)


def timed_http_protocol(header_timeout_s: float) -> type:
    """uvicorn's HTTP/1.1 protocol (httptools where installed, else h11, as uvicorn picks) with a
    deadline for each request's line and headers: a connection that has not sent a whole request
    head ``header_timeout_s`` after it opened (or after its last response) is closed. uvicorn
    itself only times out idle keep-alive connections, and any byte received stops that timer."""
    try:
        import httptools  # noqa: F401
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class TimedHTTPProtocol(Base):
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self.logger.warning("closed a connection whose request head took over %g s", header_timeout_s)
                self.transport.close()

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a whole request head arrived
                self._disarm()

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._arm()  # the next request on this connection gets the same deadline
            super().on_response_complete()

    return TimedHTTPProtocol
