"""Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And Jitter").

Full jitter (``uniform(0, min(cap, base * 2**attempt))``) spreads a crowd of clients that lost
the same server over the whole window instead of re-synchronising them into waves, which is
what turns a server restart into a reconnect storm.
"""

from __future__ import annotations

import random

__all__ = ("FullJitterBackoff",)


class FullJitterBackoff:
    """Successive delays ``uniform(0, min(max_delay, min_delay * 2**attempt))``.

    ``min_delay`` is the ceiling of the first delay, ``max_delay`` the ceiling of every delay.
    :meth:`reset` after a success starts the sequence over. ``rng`` makes it reproducible.
    """

    def __init__(
        self,
        min_delay: float = 0.5,
        max_delay: float = 30.0,
        *,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < min_delay <= max_delay:
            raise ValueError("need 0 < min_delay <= max_delay")
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.attempt = 0
        self._rng = rng if rng is not None else random.Random()

    def ceiling(self, attempt: int | None = None) -> float:
        """The upper bound of the delay for ``attempt`` (default: the next one)."""
        n = self.attempt if attempt is None else attempt
        # Cap the exponent so 2**n never becomes a huge int after days of failures.
        return min(self.max_delay, self.min_delay * 2.0 ** min(n, 62))

    def next_delay(self) -> float:
        """Draw the next delay and advance the attempt counter."""
        delay = self._rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Start over after a success."""
        self.attempt = 0
