"""Per-tenant rate limits: a token bucket per tenant (requests per second, with a burst).

One tenant's flood answers RESOURCE_EXHAUSTED (with `retry-after-ms`) to that tenant only,
before any work is queued, so it cannot starve the others of the shared queue.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from serving.errors import RateLimited


class TenantRateLimiter:
    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic):
        """`rate_per_s` <= 0 disables limiting."""
        self.rate = rate_per_s
        self.burst = max(1, burst)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, last time)
        self._lock = threading.Lock()

    def acquire(self, tenant: str) -> None:
        """Take one token of `tenant`'s bucket. Raises RateLimited when it is empty."""
        if self.rate <= 0:
            return
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(tenant, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[tenant] = (tokens, now)
                wait_ms = math.ceil((1.0 - tokens) / self.rate * 1000)
                raise RateLimited(
                    f"tenant rate limit of {self.rate:g} requests/s (burst {self.burst}) "
                    f"exceeded; retry after the hint in `retry-after-ms`", wait_ms)
            self._buckets[tenant] = (tokens - 1.0, now)
