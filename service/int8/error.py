"""How far an int8 model's results are from float32's: both models run, compared output by output.

The error is measured, never promised: quantize_with_report runs both models on the
calibration images and measure_error compares them output by output (batch by batch:
ErrorMeasure). The report's types and the threshold check are the contract's
(featmap.contract.precision): clients read them too.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from ...contract.limits import CALIBRATION_BATCH
from ...contract.precision import OutputError
from ..sessions import CPU, build_session
from .calibration import input_info


def run_batches(
    model: onnx.ModelProto, images: np.ndarray, threads: int
) -> Iterator[dict[str, np.ndarray]]:
    """Every output of `model`, CALIBRATION_BATCH images at a time."""
    # Spinning threads: onnxruntime's default, and these batches run back to back.
    session = build_session(model.SerializeToString(), [CPU], threads=threads, spinning=True)
    input_name, _, _ = input_info(model)
    names = [output.name for output in model.graph.output]
    for start in range(0, len(images), CALIBRATION_BATCH):
        results = session.run(names, {input_name: images[start : start + CALIBRATION_BATCH]})
        yield dict(zip(names, results, strict=True))


def run_model(
    model: onnx.ModelProto, images: np.ndarray, *, threads: int = 0
) -> dict[str, np.ndarray]:
    """Every output of `model` for `images` on onnxruntime's CPU provider, batch by batch."""
    names = [output.name for output in model.graph.output]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for outputs in run_batches(model, images, threads):
        for name in names:
            parts[name].append(outputs[name])
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def _cosines(reference: np.ndarray, approximate: np.ndarray) -> np.ndarray:
    """Per-image cosine similarity of two (N, ...) arrays, in float64."""
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = approximate.reshape(len(approximate), -1).astype(np.float64)
    dots = (a * b).sum(axis=1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosine = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    # All zero on both sides is agreement; all zero on one side only is no similarity at all.
    both_zero = ~a.any(axis=1) & ~b.any(axis=1)
    return np.where(both_zero, 1.0, np.clip(cosine, -1.0, 1.0))


@dataclass
class _Running:
    """One output's error so far: the largest |difference| and |float32|, the smallest cosine."""

    max_abs_error: float = 0.0
    scale: float = 0.0
    cosine: float = 1.0


class ErrorMeasure:
    """measure_error over batches of images, in the memory of one batch of outputs.

    Maxima and the per-image cosines do not depend on how the images are batched: the errors
    are the same numbers measure_error gives on all the outputs at once.
    """

    def __init__(self) -> None:
        self._outputs: dict[str, _Running] = {}

    def add(
        self, float_outputs: Mapping[str, np.ndarray], int8_outputs: Mapping[str, np.ndarray]
    ) -> None:
        """Compare one batch's outputs (same names, shapes, batch first)."""
        if float_outputs.keys() != int8_outputs.keys():
            raise ValueError(f"outputs differ: {sorted(float_outputs)} vs {sorted(int8_outputs)}")
        for name, reference in float_outputs.items():
            approximate = int8_outputs[name]
            if reference.shape != approximate.shape:
                raise ValueError(f"shapes differ: {reference.shape} vs {approximate.shape}")
            running = self._outputs.setdefault(name, _Running())
            # A few images at a time: the float64 differences of a whole output can be
            # gigabytes (a full-resolution tap over hundreds of images).
            for start in range(0, len(reference), CALIBRATION_BATCH):
                a = reference[start : start + CALIBRATION_BATCH]
                b = approximate[start : start + CALIBRATION_BATCH]
                difference = np.abs(b.astype(np.float64) - a.astype(np.float64))
                largest = float(difference.max(initial=0.0))
                running.max_abs_error = max(running.max_abs_error, largest)
                running.scale = max(running.scale, float(np.abs(a).max(initial=0.0)))
                running.cosine = min(running.cosine, float(_cosines(a, b).min(initial=1.0)))

    def errors(self) -> dict[str, OutputError]:
        """Per output, the OutputError of everything added."""
        return {
            name: OutputError(
                cosine=running.cosine,
                max_error=(
                    running.max_abs_error / running.scale
                    if running.scale > 0
                    else (math.inf if running.max_abs_error else 0.0)
                ),
                max_abs_error=running.max_abs_error,
            )
            for name, running in self._outputs.items()
        }


def output_error(reference: np.ndarray, approximate: np.ndarray) -> OutputError:
    """The OutputError of `approximate` against `reference` (same shape, batch first)."""
    measure = ErrorMeasure()
    measure.add({"output": reference}, {"output": approximate})
    return measure.errors()["output"]


def measure_error(
    float_outputs: Mapping[str, np.ndarray], int8_outputs: Mapping[str, np.ndarray]
) -> dict[str, OutputError]:
    """Per output, how far int8 is from float32 on the same images (see OutputError)."""
    measure = ErrorMeasure()
    measure.add(float_outputs, int8_outputs)
    return measure.errors()
