"""Ray Data: a featmap pipeline as a class-based `Dataset.map_batches` UDF.

`FeatureExtractor` runs in each Ray actor: embedded (the server's graph builder, session cache
and checks, with onnxruntime in the actor) or through a FeatureClient to `server`. Images come
in the pipeline's layout and dtype; `to_pipeline_input` turns the uint8 (N, H, W, C) pixels of
`ray.data.read_images` into that by `featmap extract`'s rules. Ray itself is imported by the
caller, never here: this module runs in the workers with numpy alone.

    ds = ray.data.read_images("photos/", mode="RGB", include_paths=True)
    ds = ds.map_batches(
        FeatureExtractor,
        fn_constructor_args=(pipeline,),
        compute=ray.data.ActorPoolStrategy(size=2),
        batch_size=64,
        batch_format="numpy",
    )
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..client.client import FeatureClient
from ..contract.pixels import image_values
from ..contract.precision import QuantizationReport
from ..contract.spec import (
    Pipeline,
    parse_pipeline,
)
from .runners import EmbeddedRunner

PipelineLike = Pipeline | Mapping[str, Any] | str | Path
Batch = dict[str, np.ndarray]


def as_pipeline(pipeline: PipelineLike) -> Pipeline:
    """A validated Pipeline from a model, a spec mapping, or a .yaml/.yml/.json file path."""
    if isinstance(pipeline, Pipeline):
        return pipeline
    if isinstance(pipeline, str | Path):
        from ..service.specfiles import load_pipeline_file  # no onnx: see specfiles

        return load_pipeline_file(pipeline)
    return parse_pipeline(dict(pipeline))


def _images_of(column: np.ndarray) -> list[np.ndarray]:
    """The images of a batch column: a stacked (N, ...) array, or an object array of them."""
    if column.dtype == object:
        return [np.asarray(image) for image in column]
    return list(column)


def to_pipeline_input(
    batch: Mapping[str, np.ndarray], pipeline: PipelineLike, image_column: str = "image"
) -> Batch:
    """The batch with its uint8 (H, W, C) or (H, W) pixels as the pipeline's input.

    The rules of `featmap extract` for image files: uint8 pipelines get the raw pixels, float
    pipelines pixel / 255 in their dtype (the raw values when `input.scale` is set), NCHW
    pipelines (C, H, W). Decode with the pipeline's channel count (`read_images(mode="RGB")`
    for 3). Other columns, such as "path", are kept as they are.
    """
    spec = as_pipeline(pipeline).input
    images = []
    for pixels in _images_of(batch[image_column]):
        if pixels.dtype != np.uint8:
            raise ValueError(f"{image_column}: dtype {pixels.dtype}; expected uint8 pixels")
        pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
        if pixels.ndim != 3 or pixels.shape[2] != spec.channels:
            raise ValueError(
                f"{image_column}: image of shape {list(pixels.shape)}; expected (H, W, "
                f"{spec.channels}) for input.channels={spec.channels}"
            )
        images.append(image_values(pixels, spec))
    column = _stacked(images)
    return {**batch, image_column: column}


def _stacked(images: list[np.ndarray]) -> np.ndarray:
    """One (N, ...) array when all images have one shape, else an object array of them."""
    if len({image.shape for image in images}) <= 1 and images:
        return np.stack(images)
    column = np.empty(len(images), dtype=object)
    column[:] = images
    return column


class FeatureExtractor:
    """A callable class for `Dataset.map_batches`: the batch plus one column per output.

    Args:
        pipeline: a Pipeline, a spec mapping, or a spec file path.
        server: a featmap server's gRPC target; None runs onnxruntime in each actor.
        batch_format: only "numpy" (dicts of arrays) is supported; pass it to map_batches too.
        image_column: the column of images, in the pipeline's layout and dtype
            (see to_pipeline_input), stacked (N, ...) or an object array of varied sizes.
        outputs: the pipeline outputs to add as columns (default: all of them).
        threads: onnxruntime intra-op threads in embedded mode (0: onnxruntime's default).
        client_options: extra keyword arguments for FeatureClient (timeout, tls_ca, token...).
        calibration: for an int8 pipeline, images (N, ...) in its layout and dtype to
            calibrate it on (None: the synthetic set); with `server`, the pipeline is
            registered with them and run by id. `report` says what int8 was measured to cost.
    """

    def __init__(
        self,
        pipeline: PipelineLike,
        *,
        server: str | None = None,
        batch_format: str = "numpy",
        image_column: str = "image",
        outputs: Sequence[str] | None = None,
        threads: int = 0,
        client_options: Mapping[str, Any] | None = None,
        calibration: np.ndarray | None = None,
    ) -> None:
        if batch_format != "numpy":
            raise ValueError(f"batch_format={batch_format!r}: only 'numpy' is supported")
        self.pipeline = as_pipeline(pipeline)
        self.image_column = image_column
        if outputs is not None:
            # A pipeline asking for just these outputs: nothing else is computed or sent.
            spec = {**self.pipeline.model_dump(mode="json"), "outputs": list(outputs)}
            self.pipeline = parse_pipeline(spec)
        self.outputs = self.pipeline.output_names
        if image_column in self.outputs:
            raise ValueError(f"output {image_column!r} would overwrite the image column")
        self.runner: EmbeddedRunner | None = None
        self.client: FeatureClient | None = None
        self.report: QuantizationReport | None = None
        # What the client sends: the spec, or the id it was registered under with calibration.
        self._remote: Pipeline | str = self.pipeline
        if server is None:
            self.runner = EmbeddedRunner(self.pipeline, threads, calibration=calibration)
            self.report = self.runner.report
        else:
            self.client = FeatureClient(server, **dict(client_options or {}))
            if calibration is not None:
                self._remote = self.client.register(self.pipeline, calibration=calibration)
                self.report = self.client.get_pipeline(self._remote).int8

    def _run(self, images: np.ndarray) -> Batch:
        """The pipeline's outputs for one stacked batch of same-sized images."""
        if self.client is not None:
            return self.client.extract(images, self._remote)
        assert self.runner is not None
        return next(self.runner.run([images]))

    def __call__(self, batch: Batch) -> Batch:
        """The batch with one float32 column per requested output, rows in input order."""
        column = batch[self.image_column]
        if column.dtype != object:
            outputs = self._run(column)
            added = {name: np.asarray(outputs[name]) for name in self.outputs}
            return {**batch, **added}
        # Images of several sizes: run each size as its own batch, like `featmap extract`.
        images = _images_of(column)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for row, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(row)
        per_row: list[dict[str, np.ndarray]] = [{} for _ in images]
        for rows in by_shape.values():
            outputs = self._run(np.stack([images[row] for row in rows]))
            for index, row in enumerate(rows):
                per_row[row] = {name: np.array(outputs[name][index]) for name in self.outputs}
        added = {
            name: _stacked([per_row[row][name] for row in range(len(images))])
            for name in self.outputs
        }
        return {**batch, **added}

    def close(self) -> None:
        """Close the client's channel (embedded mode has nothing to release)."""
        if self.client is not None:
            self.client.close()
