"""Token buckets: one for the whole web server (the web config's ``rate_limit``) and one per
client address for ``/probe``."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenBucket:
    """``burst`` tokens at most, refilled at ``rate`` per second; a request takes one."""

    tokens: float
    at: float

    def take(self, now: float, rate: float, burst: int) -> bool:
        self.tokens = min(float(burst), self.tokens + (now - self.at) * rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class ClientLimiter:
    """One token bucket per client address, in an LRU table of at most ``max_clients``.

    Eviction forgets a client's debt, so a client that rotates through more than
    ``max_clients`` source addresses can exceed its rate; ``max_concurrent`` still bounds the
    work the agent does for all of them together."""

    rate: float
    burst: int
    max_clients: int
    clock: Callable[[], float] = time.monotonic
    _buckets: OrderedDict[str, TokenBucket] = field(default_factory=OrderedDict)

    def allow(self, client: str) -> bool:
        now = self.clock()
        b = self._buckets.get(client)
        if b is None:
            b = self._buckets[client] = TokenBucket(float(self.burst), now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(client)
        return b.take(now, self.rate, self.burst)

    def __len__(self) -> int:
        return len(self._buckets)
