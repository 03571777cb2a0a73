"""Calibration images for int8 pipelines, taken from a job's own inputs by the job's rules."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..contract.limits import SYNTHETIC_CALIBRATION
from ..contract.pixels import pixel_values
from ..contract.spec import InputSpec, Pipeline
from .images import ArrayFiles, InputError, expand, find_files, load_item

# `featmap extract --precision int8` calibrates on this many of the job's first inputs unless
# --calibrate says otherwise: as many as the synthetic set, enough to measure the error on.
DEFAULT_CALIBRATE = SYNTHETIC_CALIBRATION


@dataclass(frozen=True)
class Calibration:
    """Calibration images (N, ...) in the pipeline's layout, and where they came from; images
    None: the synthetic set alone. As the job decodes them: uint8 pixels from image files (the
    job runs those through the pipeline's pixel variant), the pipeline's dtype from arrays."""

    images: np.ndarray | None
    keys: list[str]
    left_out: int  # of the inputs looked at: unreadable, or of another size than the first

    def values(self, spec: InputSpec) -> np.ndarray | None:
        """The images as the pipeline's own input (pixels by the pixel rule), for quantizing
        the pipeline itself rather than its pixel variant."""
        if self.images is None or self.images.dtype.name == spec.dtype:
            return self.images
        return pixel_values(self.images, spec)

    def describe(self) -> str:
        """Which images calibrate, in words."""
        if self.images is None:
            return f"{SYNTHETIC_CALIBRATION} synthetic images"
        _, *shape = self.images.shape
        looked = len(self.images) + self.left_out
        others = " (the others: unreadable or of another size)" if self.left_out else ""
        return f"{len(self.images)} of the first {looked} inputs, {tuple(shape)} each{others}"


def job_calibration(
    pipeline: Pipeline,
    inputs: Sequence[str | Path],
    count: int | None,
    resize: tuple[int, int] | None,
) -> Calibration | None:
    """What `featmap extract --calibrate COUNT` calibrates an int8 pipeline on (None for
    float32); ValueError for --calibrate without int8, or a negative count."""
    if pipeline.precision != "int8":
        if count is not None:
            raise ValueError(
                "--calibrate calibrates int8 pipelines: add --precision int8 (or set "
                "precision: int8 in the spec)"
            )
        return None
    count = DEFAULT_CALIBRATE if count is None else count
    if count < 0:
        raise ValueError(f"--calibrate must be >= 0; got {count}")
    return load_calibration([Path(p) for p in inputs], pipeline.input, count, resize)


def load_calibration(
    inputs: Sequence[Path], spec: InputSpec, count: int, resize: tuple[int, int] | None
) -> Calibration:
    """The first `count` inputs (sorted, as the job orders them), decoded as the job decodes
    them; those that cannot be read or differ in size or kind (pixels, arrays) from the first
    are left out, since calibration images are one batch. No images (the synthetic set) when
    none are left."""
    if count < 1:
        return Calibration(None, [], 0)
    items, _ = expand(find_files(inputs), spec)
    images: list[np.ndarray] = []
    keys: list[str] = []
    arrays = ArrayFiles()
    for item in items[:count]:
        try:
            image = load_item(item, spec, resize, arrays=arrays)
        except InputError:
            continue  # the job itself reports it
        if images and (image.shape, image.dtype) != (images[0].shape, images[0].dtype):
            continue
        images.append(image)
        keys.append(item.key)
    looked = min(count, len(items))
    return Calibration(np.stack(images) if images else None, keys, looked - len(images))
