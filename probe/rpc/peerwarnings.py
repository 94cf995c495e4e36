"""Warnings about misbehaving peers, at most one line per peer per interval.

A peer that sends garbage can do so as fast as it can connect; logging every
occurrence (with a traceback, as a generic `except` would) lets it fill the disk.
"""

import logging
import time
from collections import OrderedDict
from typing import Hashable


class PeerWarnings(object):
    """Log a peer's protocol errors at WARNING, one line, at most once per `interval`
    seconds per peer, and at most `per_interval` lines in all per interval (many
    distinct peers must not flood the log either).

    Memory is bounded: at most `max_peers` peers are remembered; the oldest is
    forgotten first. Thread-safe enough for its job: a race can at worst log one
    extra line.

    :param logger: where the lines go.
    :param interval: seconds between two lines about the same peer.
    :param max_peers: how many peers' last line time is remembered.
    :param per_interval: lines in all per interval before lines are only counted.
    """

    def __init__(self, logger: logging.Logger, interval: float = 60.0, max_peers: int = 4096,
                 per_interval: int = 100) -> None:
        self.logger = logger
        self.interval = interval
        self.max_peers = max_peers
        self.per_interval = per_interval
        self.suppressed = 0
        # peer -> monotonic time of its last line
        self._last: "OrderedDict[Hashable, float]" = OrderedDict()
        self._window_start = 0.0
        self._window_lines = 0
        self._window_suppressed = 0

    def warn(self, peer: Hashable, text: str, *args: object) -> bool:
        """Log `text % args` about `peer` unless it was logged about recently.
        Returns True if a line was written."""
        now = time.monotonic()
        last = self._last.get(peer)
        if last is not None and now - last < self.interval:
            self.suppressed += 1
            return False
        if now - self._window_start >= self.interval:
            if self._window_suppressed:
                self.logger.warning("%d more peer warning(s) were not logged in the last %.0f s",
                                    self._window_suppressed, self.interval)
            self._window_start, self._window_lines, self._window_suppressed = now, 0, 0
        if self._window_lines >= self.per_interval:
            self._window_suppressed += 1
            self.suppressed += 1
            return False
        self._window_lines += 1
        self._last[peer] = now
        self._last.move_to_end(peer)
        while len(self._last) > self.max_peers:
            self._last.popitem(last=False)
        self.logger.warning(text, *args)
        return True
