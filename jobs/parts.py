"""A batch job's resumable parts: shards of consecutive inputs, and `<output>.parts/` where
finished shards and their manifests wait to be reused or merged."""

from __future__ import annotations

import json
import math
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .images import InputItem
from .outputs import Results, atomic_path, read_npz, write_npz


@dataclass(frozen=True)
class Shard:
    """Consecutive inputs processed, saved and resumed together."""

    index: int
    items: list[InputItem]

    @property
    def keys(self) -> list[str]:
        """The inputs' keys, as the manifest records them."""
        return [item.key for item in self.items]


class PartsDir:
    """`<output>.parts/`: finished shards and their manifests."""

    def __init__(self, output: Path, identity: dict[str, Any]) -> None:
        self.path = output.with_name(output.name + ".parts")
        self.identity = identity

    def _files(self, shard: Shard) -> tuple[Path, Path]:
        stem = self.path / f"shard-{shard.index:05d}"
        return stem.with_suffix(".npz"), stem.with_suffix(".json")

    def results_file(self, shard: Shard) -> Path:
        """Where a shard's results are saved."""
        return self._files(shard)[0]

    def reusable(self, shard: Shard) -> Results | None:
        """A finished shard's results, if its manifest matches this job exactly."""
        results_file, manifest_file = self._files(shard)
        try:
            manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
            if manifest != {**self.identity, "shard": shard.index, "paths": shard.keys}:
                return None
            return read_npz(results_file)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None  # missing or damaged: compute the shard again

    def save(self, shard: Shard, results: Results) -> None:
        """Results first, manifest last: a manifest vouches for a complete results file."""
        self.path.mkdir(parents=True, exist_ok=True)
        results_file, manifest_file = self._files(shard)
        write_npz(results, results_file)
        manifest = {**self.identity, "shard": shard.index, "paths": shard.keys}
        with atomic_path(manifest_file) as temporary:
            temporary.write_text(json.dumps(manifest), encoding="utf-8")

    def count(self) -> int:
        """Shards whose manifest was written (finished, unless damaged since)."""
        return len(list(self.path.glob("shard-*.json"))) if self.path.is_dir() else 0

    def clear(self) -> None:
        """Remove the parts folder and everything in it."""
        shutil.rmtree(self.path, ignore_errors=True)


# A job this young keeps its finished shards in memory rather than saving them as parts: a
# hard kill (SIGKILL, power) loses at most this much work, while a short job writes nothing but
# its output (for 10,000 small images the parts cost as much as the arithmetic). An error or
# Ctrl-C saves the held shards before the job stops, so --resume finds them.
CHECKPOINT_AFTER_S = 10.0
HELD_BYTES = 128 * 2**20  # ... and at most this many bytes of results are held


class HeldShards:
    """Finished shards kept in memory until the job is `after_s` old or they hold `most_bytes`;
    from then on every shard is handed back to be saved as it finishes."""

    def __init__(self, after_s: float, most_bytes: int) -> None:
        self.deadline = time.monotonic() + after_s
        self.most_bytes = most_bytes
        self.held: dict[int, tuple[Shard, Results]] = {}
        self.bytes = 0

    def add(self, shard: Shard, results: Results) -> list[tuple[Shard, Results]]:
        """Hold a finished shard; the shards to save now (this one and the held ones, once the
        job is old enough or they are too many bytes)."""
        self.held[shard.index] = (shard, results)
        self.bytes += results.nbytes
        if time.monotonic() < self.deadline and self.bytes <= self.most_bytes:
            return []
        self.deadline = -math.inf  # from now on, every shard is saved as it finishes
        return self.release()

    def release(self) -> list[tuple[Shard, Results]]:
        """Every held shard, to be saved; none is held afterwards."""
        released = list(self.held.values())
        self.held.clear()
        self.bytes = 0
        return released

    def get(self, index: int) -> Results | None:
        """A held shard's results (None when saved, or never held)."""
        held = self.held.get(index)
        return None if held is None else held[1]
