"""`--api-key`: every /v1 route needs `Authorization: Bearer KEY` (one of the configured keys, compared in constant
time); anything else is a 401 with OpenAI's body. /health and /metrics stay open, as in vLLM."""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

_UNAUTHORIZED = json.dumps({
    "error": {
        "message": "Incorrect API key provided. Send it as the header 'Authorization: Bearer KEY'.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}).encode()


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...]) -> None:
        self.app = app
        self.api_keys = tuple(key.encode() for key in api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or not _is_api_route(scope["path"]):
            await self.app(scope, receive, send)
            return
        if self._authorized(scope):
            await self.app(scope, receive, send)
            return
        await send({
            "type": "http.response.start",
            "status": 401,
            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
        })
        await send({"type": "http.response.body", "body": _UNAUTHORIZED})

    def _authorized(self, scope: Scope) -> bool:
        header = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        matched = False
        for key in self.api_keys:  # every key compared: the time does not depend on which one matched
            matched |= hmac.compare_digest(token, key)
        return matched


def _is_api_route(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")
