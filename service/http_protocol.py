"""uvicorn's HTTP/1.1 protocol (h11) with a deadline and a size bound on a request's headers.

A client that opens a connection and sends its headers a byte at a time (slowloris) holds the
connection, and a file descriptor, for as long as it likes: uvicorn times out idle keep-alive
connections, but not a request whose headers are still arriving. `HeaderLimitsH11Protocol`
closes a connection whose request line and headers are not complete `header_timeout_s` after
the request's first byte (or after the connection opened), and answers 431 to a request line
and headers longer than `max_header_bytes` (h11's own bound, uvicorn's
`h11_max_incomplete_event_size`, applies only while the headers are incomplete in its buffer: a
large head that arrives in one read passes it).

Both come from OVD_* settings (service/settings.py), read once per process, so the class can be
named by import path and used by every uvicorn worker.
"""

from __future__ import annotations

import asyncio
import logging
from functools import cache

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)


@cache
def _limits() -> tuple[float, int]:
    from .settings import Settings

    settings = Settings()
    return settings.header_timeout_s, settings.max_header_bytes


def header_timeout_s() -> float:
    return _limits()[0]


class HeaderLimitsH11Protocol(H11Protocol):
    """H11Protocol that closes connections whose request headers arrive too slowly and refuses
    headers that are too large."""

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # bytes of a new request's head
            self._arm_header_timer()
            end = data.find(b"\r\n\r\n")
            head = len(self.conn.trailing_data[0]) + (len(data) if end < 0 else end + 4)
            if head > _limits()[1]:
                self._refuse_large_head()
                return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # its request line and headers are complete
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(header_timeout_s(), self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _refuse_large_head(self) -> None:
        # Written by hand: h11 sends a response only to a request it has parsed.
        self._cancel_header_timer()
        body = f"request line and headers exceed {_limits()[1]} bytes (OVD_MAX_HEADER_BYTES)".encode()
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; "
                             b"charset=utf-8\r\nconnection: close\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        self.transport.close()

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.info("closed a connection from %s: its request headers took over %g s",
                        self.client, header_timeout_s())
            self.transport.close()
