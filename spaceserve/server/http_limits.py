"""What a slow or hostile sender may hold: a deadline for the request headers (uvicorn's HTTP protocol waits for
them forever) and one for the whole body, so a client trickling bytes is cut off instead of holding a connection
and a request task; and a cap on the body's size.

`uvicorn_config` is the one place the server's uvicorn settings are made: `spaceserve serve` and the tests' real
loopback server both use it."""

from __future__ import annotations

import asyncio
import json

import h11
import uvicorn
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from spaceserve.server.args import ServerArgs


_HEADER_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 38\r\nconnection: close\r\n\r\n"
    b"request headers not received in time\r\n"
)


def header_timeout_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete `header_timeout_s`
    after their first byte (or after the connection opened). An idle kept-alive connection is closed by uvicorn's
    own keep-alive timeout."""

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            if self._awaiting_headers() and self._header_timer is None:
                self._arm_header_timer()
            super().data_received(data)
            if not self._awaiting_headers():
                self._cancel_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _awaiting_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self._awaiting_headers() and not self.transport.is_closing():
                if self.conn.our_state is h11.IDLE:  # nothing of a response sent on this connection's cycle
                    self.transport.write(_HEADER_TIMEOUT_RESPONSE)
                self.transport.close()

    return HeaderTimeoutH11Protocol


class BodyLimitsMiddleware:
    """A declared Content-Length over `max_body_bytes` is answered with a 413 at once, in OpenAI's error format; a
    chunked body that grows past it makes the read raise HTTPException(413). The whole body must arrive within
    `timeout_s` of the app's first read; otherwise the read raises HTTPException(408), answered in OpenAI's error
    format. Reads after the body (waiting for a disconnect) are not limited."""

    def __init__(self, app: ASGIApp, timeout_s: float, max_body_bytes: int) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((value for name, value in scope["headers"] if name == b"content-length"), b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await _send_json(send, 413, {"error": {
                "message": f"the request body is larger than the server's limit of {self.max_body_bytes} bytes",
                "type": "RequestTooLargeError", "param": None, "code": None,
            }})
            return
        deadline: float | None = None
        body_done = False
        received = 0
        loop = asyncio.get_running_loop()

        async def receive_with_deadline() -> Message:
            nonlocal deadline, body_done, received
            if body_done:
                return await receive()
            if deadline is None:
                deadline = loop.time() + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.timeout_s:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, "the request body is too large")
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, receive_with_deadline, send)


async def _send_json(send: Send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def uvicorn_config(app: ASGIApp, args: ServerArgs, *, host: str | None = None, port: int | None = None,
                   log_level: str | None = None) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=args.host if host is None else host,
        port=args.port if port is None else port,
        log_level=args.uvicorn_log_level if log_level is None else log_level,
        http=header_timeout_protocol(args.header_timeout_s),
        timeout_keep_alive=5,
        lifespan="off",
    )
