"""Ray Data: a featmap pipeline as a class-based `Dataset.map_batches` UDF.

`FeatureExtractor` runs in each Ray actor: embedded (the server's graph builder, session cache
and checks, with onnxruntime in the actor) or through a FeatureClient to `server`. Images come
as uint8 pixels in the pipeline's layout (`to_pipeline_input` turns `ray.data.read_images`'
(N, H, W, C) pixels into that) and run through the pipeline's pixel variant, as `featmap
extract` runs image files: a quarter of float32's bytes through Ray's object store, the / 255
(and mean/std) inside the graph. Or they come encoded: `ray.data.read_binary_files` reads the
files' bytes and the actor decodes them by `featmap extract`'s rules (`encoded_column=`).
Columns already in the pipeline's own dtype run through the pipeline itself. Ray itself is
imported by the caller, never here: this module runs in the workers with numpy alone.

    pool = actor_pool(ray.nodes())  # the sizing rule
    ds = ray.data.read_images("photos/", mode="RGB", include_paths=True)
    ds = ds.map_batches(to_pipeline_input, fn_kwargs={"pipeline": pipeline}, batch_format="numpy")
    ds = ds.map_batches(
        FeatureExtractor,
        fn_constructor_args=(pipeline,),
        fn_constructor_kwargs={"threads": pool.threads},
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        num_cpus=pool.cpus_per_actor,
        batch_size=32,
        batch_format="numpy",
    )

The README's example (bench_ray.RAY_EXAMPLE) reads the files' bytes instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..client.client import FeatureClient
from ..contract.errors import FeatmapError
from ..contract.images import decode_pixels
from ..contract.pixels import PIXEL_DTYPE
from ..contract.precision import QuantizationReport
from ..contract.spec import (
    InputSpec,
    Pipeline,
    parse_pipeline,
)
from ..contract.tensors import from_hwc
from .images import IMAGE_SUFFIXES, EncodedRule, InputError, encoded_image
from .runners import EmbeddedRunner, calibration_by_dtype, pipelines_by_dtype

PipelineLike = Pipeline | Mapping[str, Any] | str | Path
Batch = dict[str, np.ndarray]
# Rows of a batch and the outputs of running them (in those rows' order).
Run = tuple[list[int], Mapping[str, np.ndarray]]
# The image files `featmap extract` reads, for read_binary_files(file_extensions=...).
IMAGE_EXTENSIONS = sorted(suffix.removeprefix(".") for suffix in IMAGE_SUFFIXES)


@dataclass(frozen=True)
class ActorPool:
    """How many FeatureExtractor actors, their onnxruntime threads, their logical CPUs."""

    actors: int
    threads: int
    cpus_per_actor: float


def actor_pool(nodes: Sequence[Mapping[str, Any]]) -> ActorPool:
    """The sizing rule for the nodes `ray.nodes()` lists: an actor per live node with CPUs,
    each with as many onnxruntime threads as the smallest such node has CPUs.

    Threads x actors on a node <= its CPUs: more threads than cores take turns on them (and
    onnxruntime's default is a thread per core in every actor). One actor a node holds one
    runtime, one copy of the imports and one arena, not one per core; its decode threads and
    onnxruntime's use every core. It reserves all but one of the node's logical CPUs, so that
    each node gets one actor, and Ray's read and write tasks have a CPU to run on.
    """
    cpus = [
        int(node.get("Resources", {}).get("CPU", 0))
        for node in nodes
        if node.get("Alive", True) and node.get("Resources", {}).get("CPU", 0) >= 1
    ]
    if not cpus:
        raise ValueError("no live Ray node with a CPU: start one (ray start, or ray.init())")
    smallest = min(cpus)
    return ActorPool(actors=len(cpus), threads=smallest, cpus_per_actor=float(smallest - 1))


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


def _checked_pixels(pixels: np.ndarray, spec: InputSpec, column: str) -> np.ndarray:
    """(H, W, C) or (H, W) uint8 pixels as (H, W, C) with the pipeline's channel count."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"{column}: dtype {pixels.dtype}; expected uint8 pixels")
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    if pixels.ndim != 3 or pixels.shape[2] != spec.channels:
        raise ValueError(
            f"{column}: image of shape {list(pixels.shape)}; expected (H, W, "
            f"{spec.channels}) for input.channels={spec.channels}"
        )
    return pixels


def to_pipeline_input(
    batch: Mapping[str, np.ndarray], pipeline: PipelineLike, image_column: str = "image"
) -> Batch:
    """The batch with its uint8 (H, W, C) or (H, W) pixels in the pipeline's layout.

    The pixels stay uint8: FeatureExtractor runs them through the pipeline's pixel variant,
    which gives the values `featmap extract`'s rule does (featmap.contract.pixels). Decode
    with the pipeline's channel count (`read_images(mode="RGB")` for 3). Other columns, such
    as "path", are kept as they are.
    """
    spec = as_pipeline(pipeline).input
    images = [
        from_hwc(_checked_pixels(pixels, spec, image_column), spec.layout)
        for pixels in _images_of(batch[image_column])
    ]
    return {**batch, image_column: _stacked(images)}


def decode_encoded(
    data: bytes, path: str, spec: InputSpec, resize: tuple[int, int] | None, draft: bool
) -> np.ndarray:
    """One encoded image file's bytes as uint8 pixels in the pipeline's layout.

    `featmap extract`'s decoder and rules (featmap.contract.images: mode from input.channels,
    bilinear resize, the JPEG draft option); the one call to it here. InputError names `path`,
    as the job's decode_image does.
    """
    try:
        pixels = decode_pixels(data, spec.channels, resize, draft=draft, field=path)
    except FeatmapError as exc:
        raise InputError(path, exc.message) from None
    return from_hwc(pixels, spec.layout)


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
        image_column: the column of images: uint8 pixels in the pipeline's layout (see
            to_pipeline_input), or arrays in the pipeline's own layout and dtype; stacked
            (N, ...) or an object array of varied sizes.
        outputs: the pipeline outputs to add as columns (default: all of them).
        threads: onnxruntime intra-op threads in embedded mode (0: onnxruntime's default).
        client_options: extra keyword arguments for FeatureClient (timeout, tls_ca, token...).
        calibration: for an int8 pipeline, images (N, ...) to calibrate it on: uint8 pixels
            in its layout, or its own dtype (None: the synthetic set); with `server`, the
            pipeline is registered with them and run by id. `report` says what int8 was
            measured to cost.
        encoded_column: a column of encoded image files' bytes (`read_binary_files`'
            "bytes"), decoded by `featmap extract`'s rules; the outputs replace it (no image
            column is added). With `server`, the files it takes as they are (JPEG, PNG, WebP
            within its byte limit) go as they are and it decodes them, as `featmap extract
            --server` sends them; the rest are decoded here. None: the images come decoded,
            in `image_column`.
        resize: (height, width) every decoded image is resized to (bilinear), as --resize.
        draft: let JPEGs decode at a reduced scale before the resize, as --jpeg-draft.
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
        encoded_column: str | None = None,
        resize: tuple[int, int] | None = None,
        draft: bool = False,
    ) -> None:
        if batch_format != "numpy":
            raise ValueError(f"batch_format={batch_format!r}: only 'numpy' is supported")
        if draft and resize is None:
            raise ValueError("draft decodes JPEGs at the size resize asks for: give resize")
        self.pipeline = as_pipeline(pipeline)
        self.image_column = image_column
        self.encoded_column = encoded_column
        self.resize = None if resize is None else (int(resize[0]), int(resize[1]))
        self.draft = draft
        # Pillow releases the GIL while it decodes: a batch decodes on the runtime's threads.
        self.decoders = max(1, threads or os.cpu_count() or 1)
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
        # What the client sends for each batch dtype (pixels: the pixel variant), as a spec
        # or the id it was registered under with calibration.
        self._remote: dict[str, Pipeline | str] = dict(pipelines_by_dtype(self.pipeline))
        # Which encoded files the server takes as they are: its limits, asked for once.
        self._encoded_rule: EncodedRule | None = None
        if server is None:
            self.runner = EmbeddedRunner(self.pipeline, threads, calibration=calibration)
            self.report = self.runner.report
        else:
            self.client = FeatureClient(server, **dict(client_options or {}))
            calibrations = calibration_by_dtype(self.pipeline, calibration)
            registered = {
                dtype: self.client.register(self._remote[dtype], calibration=images)
                for dtype, images in calibrations.items()
            }
            self._remote.update(registered)
            if registered:
                # The first is the variant of the calibration images' own dtype.
                self.report = self.client.get_pipeline(next(iter(registered.values()))).int8

    def _run(self, images: np.ndarray) -> Batch:
        """The pipeline's outputs for one stacked batch of same-sized images."""
        if self.client is not None:
            # Another dtype goes with the pipeline itself: the server names images.dtype.
            remote = self._remote.get(images.dtype.name, self._remote[self.pipeline.input.dtype])
            return self.client.extract(images, remote)
        assert self.runner is not None
        return next(self.runner.run([images]))

    def __call__(self, batch: Batch) -> Batch:
        """The batch with one float32 column per requested output, rows in input order.

        With `encoded_column`, the outputs replace that column: the decoded pixels (six times
        the encoded bytes of a JPEG) stay in the actor instead of going through the object
        store to the next operator.
        """
        if self.encoded_column is None:
            column = batch[self.image_column]
            if column.dtype != object:  # one stacked batch: one run
                outputs = self._run(column)
                return {**batch, **{name: np.asarray(outputs[name]) for name in self.outputs}}
            images = _images_of(column)
            return {**batch, **self._joined(self._pixel_runs(images, range(len(images))))}
        kept = {name: column for name, column in batch.items() if name != self.encoded_column}
        return {**kept, **self._joined(self._encoded_runs(batch))}

    def _pixel_runs(self, images: Sequence[np.ndarray], rows: Sequence[int]) -> list[Run]:
        """Images (of `rows`) run in batches of one size and dtype, like `featmap extract`."""
        by_shape: dict[tuple[tuple[int, ...], str], list[int]] = {}
        for index, image in enumerate(images):
            by_shape.setdefault((image.shape, image.dtype.str), []).append(index)
        return [
            ([rows[index] for index in group], self._run(np.stack([images[i] for i in group])))
            for group in by_shape.values()
        ]

    def _encoded_runs(self, batch: Batch) -> list[Run]:
        """The encoded column's images run: with a server, the files it takes as they are go
        as they are (it decodes them by the same rules, `featmap extract --server`'s
        default); the rest are decoded here."""
        assert self.encoded_column is not None
        encoded = [bytes(data) for data in batch[self.encoded_column]]
        paths = batch.get("path")
        names = [f"row {row}" if paths is None else str(paths[row]) for row in range(len(encoded))]
        spec = self.pipeline.input
        runs: list[Run] = []
        here = list(range(len(encoded)))
        if self.client is not None:
            if self._encoded_rule is None:
                self._encoded_rule = EncodedRule.of_server(self.client.server_info().limits)
            by_size: dict[tuple[int, int], list[int]] = {}
            here = []
            for row, data in enumerate(encoded):
                image = encoded_image(data, names[row], spec, self.resize, self._encoded_rule)
                if image is None:
                    here.append(row)
                else:
                    by_size.setdefault((image.height, image.width), []).append(row)
            for rows in by_size.values():
                outputs = self.client.extract_encoded(
                    [encoded[row] for row in rows],
                    self._remote[PIXEL_DTYPE],
                    size=self.resize,
                    draft=self.draft,
                )
                runs.append((rows, outputs))

        def decode(row: int) -> np.ndarray:
            return decode_encoded(encoded[row], names[row], spec, self.resize, self.draft)

        if self.decoders == 1 or len(here) <= 1:
            images = [decode(row) for row in here]
        else:
            with ThreadPoolExecutor(self.decoders, thread_name_prefix="featmap-decode") as pool:
                images = list(pool.map(decode, here))
        return runs + self._pixel_runs(images, here)

    def _joined(self, runs: list[Run]) -> Batch:
        """One column per requested output from runs over parts of the batch, in row order."""
        if len(runs) == 1 and runs[0][0] == list(range(len(runs[0][0]))):
            outputs = runs[0][1]  # one run over every row, in order: its arrays as they are
            return {name: np.asarray(outputs[name]) for name in self.outputs}
        per_row: dict[int, dict[str, np.ndarray]] = {}
        for rows, outputs in runs:
            for index, row in enumerate(rows):
                per_row[row] = {name: np.array(outputs[name][index]) for name in self.outputs}
        return {
            name: _stacked([per_row[row][name] for row in range(len(per_row))])
            for name in self.outputs
        }

    def close(self) -> None:
        """Close the client's channel (embedded mode has nothing to release)."""
        if self.client is not None:
            self.client.close()
