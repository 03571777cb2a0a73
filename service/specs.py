"""Spec texts -> admitted pipelines, within a memory budget: sized before parsing, cached by bytes.

Parsing is the one thing a request can make the server do before any limit has seen the spec,
and it costs ~64 bytes a byte of text (contract.limits.spec_memory). So the text's size is
checked first (max_spec_bytes), the parse's estimated memory is reserved in the
`spec_cache_bytes` budget while it runs, and only admitted specs are kept, charged the same
estimate, least recently used evicted first. A refused spec leaves nothing behind.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from ..contract.limits import RequestLimits, check_spec_bytes, spec_memory
from ..contract.spec import Pipeline, parse_pipeline
from .budget import MemoryBudget


class SpecCache:
    """Admitted pipelines by spec text; thread-safe.

    Args:
        admit: the pipeline admission (Extractor.admit and any check of the caller's).
        limits: max_spec_bytes is checked before anything else.
        budget_bytes: the spec_cache_bytes budget: parses in flight and specs kept.
    """

    def __init__(
        self,
        admit: Callable[[Pipeline], Pipeline],
        limits: RequestLimits,
        budget_bytes: int,
    ) -> None:
        self.admit = admit
        self.limits = limits
        self.budget = MemoryBudget("spec_cache_bytes", budget_bytes)
        self._kept: OrderedDict[str, tuple[Pipeline, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, text: str, field: str = "spec_json") -> Pipeline:
        """The admitted pipeline of `text`, parsed once and then kept while there is room."""
        size = check_spec_bytes(text, self.limits, field)
        with self._lock:
            hit = self._kept.get(text)
            if hit is not None:
                self._kept.move_to_end(text)
                return hit[0]
        cost = spec_memory(size)
        pipeline = self._parse(text, cost, field)
        with self._lock:
            if text not in self._kept:
                self._kept[text] = (pipeline, cost)
                self.budget.keep(cost, cost)
            else:  # another call parsed it meanwhile
                self.budget.cancel(cost)
        return pipeline

    def parse(self, text: str, field: str = "spec_json") -> Pipeline:
        """The admitted pipeline of `text`, parsed within the budget but not kept."""
        cost = spec_memory(check_spec_bytes(text, self.limits, field))
        pipeline = self._parse(text, cost, field)
        with self._lock:
            self.budget.cancel(cost)
        return pipeline

    def _parse(self, text: str, cost: int, field: str) -> Pipeline:
        """Parse and admit with `cost` reserved; the reservation stays for the caller to settle."""
        with self._lock:
            self.budget.reserve(cost, field, "parsing this spec", self._evict_locked)
        try:
            return self.admit(parse_pipeline(text))
        except BaseException:
            with self._lock:
                self.budget.cancel(cost)
            raise

    def _evict_locked(self) -> int:
        """Drop the least recently used spec; the bytes freed (0 when none is left)."""
        if not self._kept:
            return 0
        _, (_, cost) = self._kept.popitem(last=False)
        self.budget.free(cost)
        return cost

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept)
