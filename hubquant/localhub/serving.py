"""Serving limits shared by the local Hub and the conversion service: request-body size caps, a deadline for
slow or idle clients, and uvicorn settings that apply them.

- `BodyGuard` (ASGI middleware): a body announced or grown beyond the route's limit gets 413; a client that
  sends no body bytes for `idle_s` while its body is incomplete gets 408 and the connection is closed.
- `GuardedH11Protocol` (uvicorn protocol): a connection that has not sent a complete request head within
  `HEADER_TIMEOUT_S` of connecting (or of its previous response) is closed, so trickled headers cannot hold a
  connection open; uvicorn's keep-alive timeout covers idle connections between requests.
"""
from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_ENV = "HUBQUANT_HTTP_HEADER_TIMEOUT"
BODY_IDLE_ENV = "HUBQUANT_HTTP_BODY_IDLE_TIMEOUT"


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


class BodyTooLarge(Exception):
    pass


class BodyIdle(Exception):
    pass


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), (b"x-error-message", message.encode("ascii", "replace"))]})
    await send({"type": "http.response.body", "body": body})


class BodyGuard:
    """Wraps an ASGI app: `limit(scope)` bytes at most per request body (None: no cap), `idle_s` seconds at
    most between two body chunks."""

    def __init__(self, app, *, limit: Callable[[dict], int | None], idle_s: float | None = None):
        self.app, self.limit = app, limit
        self.idle_s = idle_s if idle_s is not None else _env_float(BODY_IDLE_ENV, 60.0)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit(scope)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if limit is not None and declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_error(send, 413, f"request body over the {limit}-byte limit of this route")
        state = {"got": 0, "done": False, "started": False}

        async def guarded_receive():
            if state["done"]:  # the body is complete: what follows is a disconnect notice, wait for it freely
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), self.idle_s)
            except asyncio.TimeoutError:
                raise BodyIdle(f"no request body bytes for {self.idle_s:g} s") from None
            if msg["type"] == "http.request":
                state["got"] += len(msg.get("body", b""))
                state["done"] = not msg.get("more_body", False)
                if limit is not None and state["got"] > limit:
                    raise BodyTooLarge(f"request body over the {limit}-byte limit of this route")
            return msg

        async def tracking_send(msg):
            if msg["type"] == "http.response.start":
                state["started"] = True
            await send(msg)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except (BodyTooLarge, BodyIdle) as e:
            if state["started"]:
                raise
            if isinstance(e, BodyTooLarge):
                await _send_error(send, 413, f"request body over the {limit}-byte limit of this route")
            else:
                await _send_error(send, 408, f"no request body bytes for {self.idle_s:g} s")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for receiving each request head."""

    header_timeout_s = _env_float(HEADER_TIMEOUT_ENV, 10.0)

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._head_timer = None
        super().connection_made(transport)
        self._arm_head_timer()

    def _waiting_for_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_deadline)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_deadline(self) -> None:
        self._head_timer = None
        if self._waiting_for_head() and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_head():
            self._arm_head_timer()
        else:
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        self._cancel_head_timer()  # uvicorn's keep-alive timer takes over until the next request's bytes
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)


def uvicorn_config(app, **kw):
    """A uvicorn.Config that serves `app` with the guarded protocol and a short keep-alive."""
    import uvicorn

    kw.setdefault("timeout_keep_alive", 5)
    kw.setdefault("log_level", "warning")
    return uvicorn.Config(app, http=GuardedH11Protocol, **kw)
