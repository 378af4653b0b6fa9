"""One error type for every refused request, rendered as JSON by the app.

Body: `{"error": {"status": 413, "code": "image_too_large", "message": "..."}}`; the code is
stable for clients, the message is for people.
"""

from __future__ import annotations


class ApiError(Exception):
    """A request the service refuses, with its HTTP status and a stable error code.

    Args:
        status: HTTP status code (4xx, or 503/504 for overload and timeouts).
        code: machine-readable code, e.g. "invalid_base64".
        message: human-readable explanation.
        headers: extra response headers (e.g. Retry-After).
    """

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict:
        # A message may quote client text; one that is not valid Unicode (a lone surrogate from
        # a JSON "\ud800") could not be encoded as UTF-8, so it is escaped here.
        message = self.message.encode("utf-8", "backslashreplace").decode("utf-8")
        return {"error": {"status": self.status, "code": self.code, "message": message}}
