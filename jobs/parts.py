"""A batch job's resumable parts: shards of consecutive inputs, and `<output>.parts/` where
finished shards and their manifests wait to be reused or merged."""

from __future__ import annotations

import json
import shutil
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
