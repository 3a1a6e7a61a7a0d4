"""Token buckets per (remote peer, protocol), in a table whose size stays bounded."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from hivenode.agent.settings import RequestRate


@dataclass
class _Bucket:
    tokens: float
    last: float
    """When `tokens` was last brought up to date (the caller's clock)."""
    throttled: bool = False
    """The last request was refused: the next refusal is not news (logged once per spell)."""


class RateLimiter:
    """Admits or refuses one request at a time, by key, at the key's rate.

    Nothing is queued: a request over its rate is refused at once, with the seconds until a
    token is due. Buckets are kept least recently used first; a bucket untouched for
    `forget_after` seconds is dropped, and the least recently used one goes when
    `max_buckets` are held, so peers that came once and left cost nothing for long.
    `forget_after` is at least the time any bucket takes to fill, so forgetting a bucket
    changes nothing: a fresh one starts full, as the old one would be by then.
    """

    def __init__(self, idle_s: float, max_buckets: int, rates: list[RequestRate]) -> None:
        longest_fill = max((r.burst / r.per_s for r in rates), default=0.0)
        self.forget_after = max(idle_s, longest_fill)
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def admit(self, key: tuple[str, str], rate: RequestRate, now: float) -> float | None:
        """None when the request may go ahead (one token spent), else the seconds until
        the key's next token."""
        self._forget_idle(now)
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            while len(self._buckets) >= self.max_buckets:
                self._buckets.popitem(last=False)
            bucket = _Bucket(tokens=float(rate.burst), last=now)
        self._buckets[key] = bucket  # most recently used last
        bucket.tokens = min(float(rate.burst), bucket.tokens + (now - bucket.last) * rate.per_s)
        bucket.last = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            bucket.throttled = False
            return None
        return (1.0 - bucket.tokens) / rate.per_s

    def first_refusal(self, key: tuple[str, str]) -> bool:
        """True once per spell of refusals of `key` (call after `admit` refused it)."""
        bucket = self._buckets.get(key)
        if bucket is None or bucket.throttled:
            return False
        bucket.throttled = True
        return True

    def _forget_idle(self, now: float) -> None:
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if now - oldest.last < self.forget_after:
                return
            self._buckets.popitem(last=False)
