"""Memory budgets in bytes: what the caches and the registry may hold, estimated before allocating.

Each budget counts bytes *kept* (parsed specs, compiled sessions, registered pipelines) and bytes
*in flight* (a spec being parsed, a session being built, at its peak estimate). A reservation
is made before the work allocates anything; a cache evicts what it keeps to make room. A cost
over the whole budget is refused for good (LimitExceeded); one that would fit once the work in
flight is done is refused as Busy, which clients retry.

Not thread-safe: each owner calls it under its own lock.
"""

from __future__ import annotations

from collections.abc import Callable

from ..contract.errors import Busy, LimitExceeded

# A budget that never refuses (the embedded runner's, and caches built without one).
UNBOUNDED = 1 << 62


class MemoryBudget:
    """Bytes charged against the limit of one setting (named in every refusal)."""

    def __init__(self, setting: str, limit: int) -> None:
        self.setting = setting
        self.limit = limit
        self.kept = 0
        self.in_flight = 0

    @property
    def used(self) -> int:
        """Bytes charged now, kept and in flight."""
        return self.kept + self.in_flight

    def reserve(
        self, cost: int, field: str, what: str, evict: Callable[[], int] | None = None
    ) -> None:
        """Charge `cost` bytes of work in flight, calling `evict` (bytes it freed, 0 when it
        has nothing left to free) until they fit; LimitExceeded or Busy when they cannot."""
        if cost > self.limit:
            raise LimitExceeded(
                field,
                f"{what} needs an estimated {cost} bytes, over {self.setting}={self.limit}",
            )
        while self.used + cost > self.limit:
            if evict is not None and evict() > 0:
                continue
            if self.kept + cost > self.limit:
                raise LimitExceeded(
                    field,
                    f"{what} needs an estimated {cost} bytes; {self.setting}={self.limit} "
                    f"holds {self.kept} bytes already (delete some first)",
                )
            raise Busy(
                field,
                f"{what} needs an estimated {cost} bytes; {self.setting}={self.limit} is held "
                f"by work in flight ({self.in_flight} bytes): retry shortly",
            )
        self.in_flight += cost

    def keep(self, reserved: int, kept: int) -> None:
        """The work reserved for is done and keeps `kept` bytes (at most what it reserved)."""
        self.in_flight -= reserved
        self.kept += kept

    def cancel(self, reserved: int) -> None:
        """The work reserved for failed: nothing is kept."""
        self.in_flight -= reserved

    def free(self, kept: int) -> None:
        """Something kept is gone (evicted, deleted)."""
        self.kept -= kept
