"""`RetryBudget`: retries may add at most a share of a client's calls, plus a few per
second, so an outage cannot multiply the load on the nodes that are left.

Finagle's RetryBudget semantics (`percent` of calls may be retried, plus
`min_per_second` retries a second for clients that call rarely), as a token bucket:
each call deposits percent/100 of a token, time adds `min_per_second` tokens a
second, a retry withdraws one whole token. Unlike Finagle's 10-second window, the
bank is capped at `max_banked` (one second's `min_per_second`) plus what the last
second's calls deposited, so retries over any stretch of time stay within
percent × calls + min_per_second × seconds + that cap, even after a long quiet
spell or a long healthy one.

Threading and asyncio: `deposit` is one attribute increment (a lost increment under
a thread race only makes the budget stricter); `try_withdraw` takes a short lock.
"""

import math
import threading
import time
from typing import Callable, Optional

from ..errors import InvalidHealthPolicy


class RetryBudget(object):
    """Retries allowed: `percent` % of calls plus `min_per_second` a second.

    :param percent: share of calls that may be retried, 0..1000 (20).
    :param min_per_second: retries a second allowed whatever the call rate (10).
    :param max_banked: tokens that may be saved up for a burst (default:
        `min_per_second`, at least 1).
    :param clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, percent: float = 20.0, min_per_second: float = 10.0, *,
                 max_banked: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        for name, value, high in (("percent", percent, 1000.0),
                                  ("min_per_second", min_per_second, 1e6)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or math.isnan(value) or not 0 <= value <= high:
                raise InvalidHealthPolicy("RetryBudget %s must be a number in [0, %g], got %r"
                                          % (name, high, value))
        if max_banked is None:
            max_banked = max(1.0, float(min_per_second))
        if isinstance(max_banked, bool) or not isinstance(max_banked, (int, float)) \
                or math.isnan(max_banked) or not 0 <= max_banked <= 1e9:
            raise InvalidHealthPolicy("RetryBudget max_banked must be a number in [0, 1e9], "
                                      "got %r" % (max_banked,))
        self.percent = float(percent)
        self.min_per_second = float(min_per_second)
        self.max_banked = float(max_banked)
        self._clock = clock
        self._lock = threading.Lock()
        self._deposits = 0  # calls deposited since the start (written without the lock)
        self._counted = 0  # of them, already turned into tokens
        self._tokens = self.max_banked  # a new client may retry at once (as Finagle)
        self._at = clock()
        self.withdrawn = 0  # retries allowed
        self.refused = 0  # retries refused: the budget was spent

    def __repr__(self) -> str:
        return "RetryBudget(percent=%g, min_per_second=%g)" % (self.percent, self.min_per_second)

    def deposit(self) -> None:
        """Count one call (not its retries)."""
        self._deposits += 1

    def try_withdraw(self) -> bool:
        """Take one retry from the budget: False when it is spent."""
        with self._lock:
            now = self._clock()
            deposits = self._deposits
            fresh = deposits - self._counted
            self._counted = deposits
            self._tokens = self._refill(self._tokens, fresh, now - self._at)
            self._at = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                self.withdrawn += 1
                return True
            self.refused += 1
            return False

    def balance(self) -> float:
        """Tokens available now (a float; a retry needs 1)."""
        with self._lock:
            return self._refill(self._tokens, self._deposits - self._counted,
                                self._clock() - self._at)

    def _refill(self, tokens: float, fresh: int, elapsed: float) -> float:
        elapsed = max(elapsed, 0.0)
        earned = fresh * self.percent / 100.0
        # The cap admits what the last second's calls bought (deposits are not
        # timestamped: over a longer gap they count pro rata), so a busy client is
        # never held to `max_banked` alone while savings cannot pile up.
        recent = earned if elapsed <= 1.0 else earned / elapsed
        # The cap stops growth only: tokens banked by an earlier refill are not taken
        # back by the next withdrawal (a burst of failures at once, as an asyncio
        # client with many calls in flight sees when a node dies, would otherwise get
        # max_banked retries in all).
        cap = max(self.max_banked + recent, tokens)
        return min(tokens + earned + elapsed * self.min_per_second, cap)


__all__ = ["RetryBudget"]
