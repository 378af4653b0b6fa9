"""Admission by cost: what one request, and all admitted requests together, may spend.

A detect request is priced before its work starts: the pixels its images decode to (read from
their headers) and the prompts its vocabulary needs that no cache holds (names x templates,
after the memory and Redis lookups). Each price is held in a `Budget` while that work runs:

    with model.admission.pixels.hold(pixels):   # 413 request_too_large / 503 server_busy
        decode ...

Over the per-request limit is the request's own fault (a 4xx that names the limit and its
setting); over the shared limit is transient (503 `server_busy`, Retry-After). The third cost,
classification, is capped, not refused: the batcher runs every request with
`ClassifyOptions.max_candidates` (OVD_MAX_CLASSIFY_CANDIDATES), the most (box, name) pairs the
model regresses and gives NMS, the best first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .errors import ApiError
from .settings import Settings


class Budget:
    """Units of one resource held by the admitted requests (event-loop only, no locking).

    Args:
        unit: what is counted ("pixels", "prompts"), for messages.
        per_request: most one request may hold; `per_request_setting` names its setting.
        total: most all requests together may hold; `total_setting` names its setting.
        status, code: the answer to a request over `per_request`.
        on_reject: callback(reason) per refusal ("request" or "busy"), for metrics.
    """

    def __init__(self, unit: str, *, per_request: int, per_request_setting: str, total: int,
                 total_setting: str, status: int, code: str,
                 on_reject: Callable[[str], None] | None = None, retry_after_s: int = 1):
        self.unit = unit
        self.per_request, self.per_request_setting = per_request, per_request_setting
        self.total, self.total_setting = total, total_setting
        self.status, self.code = status, code
        self.retry_after_s = retry_after_s
        self.in_use = 0
        self._on_reject = on_reject or (lambda reason: None)

    def check(self, amount: int) -> None:
        """Raise the refusal `hold(amount)` would raise now, without holding anything."""
        if amount > self.per_request or amount > self.total:
            self._on_reject("request")
            limit, setting = ((self.per_request, self.per_request_setting) if self.per_request <= self.total
                              else (self.total, self.total_setting))
            raise ApiError(self.status, self.code,
                           f"the request needs {amount} {self.unit}; the limit per request is {limit} ({setting})")
        if self.in_use + amount > self.total:
            self._on_reject("busy")
            raise ApiError(503, "server_busy",
                           f"the server is busy: {self.in_use} {self.unit} in progress, {amount} more would pass "
                           f"the limit of {self.total} ({self.total_setting}); retry shortly",
                           headers={"Retry-After": str(self.retry_after_s)})

    @contextlib.contextmanager
    def hold(self, amount: int) -> Iterator[None]:
        """Hold `amount` units for the duration of the block (released however it ends)."""
        if amount <= 0:
            yield
            return
        self.check(amount)
        self.in_use += amount
        try:
            yield
        finally:
            self.in_use -= amount


@dataclass
class Admission:
    """The service's budgets: decoded pixels and new prompts."""

    pixels: Budget
    prompts: Budget

    @classmethod
    def from_settings(cls, s: Settings, on_reject: Callable[[str, str], None] | None = None) -> Admission:
        report = on_reject or (lambda resource, reason: None)
        return cls(
            pixels=Budget("decoded pixels", per_request=s.max_request_pixels,
                          per_request_setting="OVD_MAX_REQUEST_PIXELS", total=s.max_pending_pixels,
                          total_setting="OVD_MAX_PENDING_PIXELS", status=413, code="request_too_large",
                          on_reject=lambda reason: report("pixels", reason)),
            prompts=Budget("uncached prompts (class names x templates)", per_request=s.max_request_new_prompts,
                           per_request_setting="OVD_MAX_REQUEST_NEW_PROMPTS", total=s.max_pending_prompts,
                           total_setting="OVD_MAX_PENDING_PROMPTS", status=422, code="too_many_new_prompts",
                           on_reject=lambda reason: report("prompts", reason)))
