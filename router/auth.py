"""The API key check, for every route that needs one (the OpenAI routes, the membership
routes, and /cluster and /metrics when protected).

A pure ASGI middleware, not FastAPI's `@app.middleware("http")`: that one runs the app
behind Starlette's BaseHTTPMiddleware, which hides the client's disconnect from
`Request.is_disconnected()`, so a client that hung up would keep its request running."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from router.protocol import error_body

WRONG_KEY = "missing or wrong API key: send 'Authorization: Bearer <key>'"


def bearer_token(header: str | None) -> str | None:
    """`Authorization: Bearer KEY`, the scheme in any case (RFC 9110)."""
    scheme, _, token = (header or "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def key_matches(header: str | None, expected: str) -> bool:
    """Constant-time: how much of a wrong key matched must not show in the answer's time."""
    token = bearer_token(header)
    return token is not None and hmac.compare_digest(token.encode(), expected.encode())


class ApiKeyMiddleware:
    """401 for a request to a protected path without the key; everything else passes."""

    def __init__(self, app: ASGIApp, api_key: str, protected: Callable[[str], bool]):
        self.app, self.api_key, self.protected = app, api_key, protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and self.protected(scope["path"])
                and not key_matches(Headers(scope=scope).get("authorization"), self.api_key)):
            response = JSONResponse(error_body(WRONG_KEY, "authentication_error", 401), status_code=401)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
