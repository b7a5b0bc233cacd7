"""A token bucket per API key."""

from __future__ import annotations

import time


class RateLimiter:
    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str) -> float:
        """0 if the request may go now, else the seconds until it may. A rate of 0 turns the limit off."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        tokens, at = self.buckets.get(key, (float(self.burst), now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1:
            self.buckets[key] = (tokens - 1, now)
            return 0.0
        self.buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate
