"""Rate-limited logging: a client cannot grow the daemon's log faster than a few lines a
minute per kind of event, however many bad requests it sends."""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass

BURST = 10      # lines per key and period
PERIOD = 60.0   # seconds


@dataclass
class _Bucket:
    window_start: float
    lines: int = 0
    dropped: int = 0


class RateLimitedLog:
    """At most `burst` lines per `period` seconds per key; the first line of the next period
    says how many were dropped. Keys are few (an RPC and a status code), so buckets are kept."""

    def __init__(self, logger: logging.Logger, burst: int = BURST, period: float = PERIOD) -> None:
        self.logger = logger
        self.burst = burst
        self.period = period
        self._buckets: dict[Hashable, _Bucket] = {}

    def log(self, level: int, key: Hashable, message: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        bucket = self._buckets.setdefault(key, _Bucket(now))
        if now - bucket.window_start >= self.period:
            if bucket.dropped:
                self.logger.log(level, "(%d similar lines dropped in the last %.0fs)", bucket.dropped, self.period)
            bucket.window_start, bucket.lines, bucket.dropped = now, 0, 0
        if bucket.lines >= self.burst:
            bucket.dropped += 1
            return
        bucket.lines += 1
        self.logger.log(level, message, *args, exc_info=exc_info)
