"""Security headers on every response (pure ASGI middleware: no body buffering).

All responses: `X-Content-Type-Options: nosniff` (a JSON or image body is never sniffed into
HTML), `X-Frame-Options: DENY` and `Referrer-Policy: no-referrer`. The web page and its static
files also get a Content-Security-Policy that allows only this origin's scripts and styles
(the page has no inline script), images from this origin and from data:/blob: URLs (the
uploaded picture), and no framing. /docs and /redoc are left without CSP: their HTML (FastAPI's)
starts Swagger UI and ReDoc with an inline script; their assets come from this server.
"""

from __future__ import annotations

PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
_ALL = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"no-referrer")]


class SecurityHeadersMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        extra = _ALL + ([(b"content-security-policy", PAGE_CSP.encode())]
                        if path == "/" or path.startswith("/static/") else [])

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *((k, v) for k, v in extra if k not in names)]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
