"""Encoded images in requests (ExtractRequest.encoded, OIP's "images_encoded"): bounded before
decoding, decoded on the server's own threads once admitted, by the job's decoder.

What a request of encoded images runs, and how:
- the images' count and bytes, then each header (format, width x height), are checked before
  a pixel is decoded (contract.limits.admit_encoded, contract.images.read_header);
- the batch is a DeferredBatch: admit_batch sizes it from the headers (or the resize), and the
  extractor charges it, with what decoding needs beside it, to the run budget before decoding;
- pixels run through the target's pixel variant (contract.pixels): an inline spec's variant is
  compiled and cached like any inline spec, so the features equal the job's. A registered
  float pipeline keeps its own session (its weights are not kept to build another): the
  pixels become its input values by the pixel rule, equal to the variant's to float32
  rounding (contract.pixels says how near).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..contract.errors import InvalidRequest, InvalidTensor
from ..contract.images import DECODE_BYTES_PER_PIXEL, decode_pixels, image_mode, read_image_header
from ..contract.limits import (
    ENCODED_FORMATS,
    DeferredBatch,
    RequestLimits,
    admit_encoded,
    spec_memory,
)
from ..contract.pixels import PIXEL_DTYPE, pixel_pipeline, pixel_values
from ..contract.spec import InputSpec, Pipeline
from ..contract.tensors import batch_shape, from_hwc
from .extractor import Target

# The pixel variants of inline specs kept, by their estimated bytes (contract.limits.spec_memory
# of their text): a spec with big `values` weights costs as much as its parse.
VARIANT_BYTES = 64 << 20


class ImageDecoder:
    """Decodes encoded images for every call, on `threads` threads (0: one a core), and keeps
    the pixel variants of the inline specs they run through."""

    def __init__(self, threads: int = 0) -> None:
        self.threads = threads or os.cpu_count() or 1
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._variants: OrderedDict[str, tuple[Pipeline, int]] = OrderedDict()
        self._variant_bytes = 0
        self.decoded = 0  # images decoded so far

    def _executor(self) -> ThreadPoolExecutor:
        # Started on the first encoded request: a server that never gets one starts no threads.
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="featmap-decode")
            return self._pool

    def pixel_target(self, target: Target) -> Target:
        """What decoded pixels run as (see the module docstring)."""
        pipeline = target.pipeline
        if pipeline.input.dtype == PIXEL_DTYPE or target.compiled is not None:
            return target
        return Target(self._variant(pipeline), None, target.batching)

    def _variant(self, pipeline: Pipeline) -> Pipeline:
        """An inline spec's pixel variant, kept (LRU, VARIANT_BYTES) for its next request."""
        key = pipeline.pipeline_id
        with self._lock:
            kept = self._variants.get(key)
            if kept is not None:
                self._variants.move_to_end(key)
                return kept[0]
        variant = pixel_pipeline(pipeline)
        size = spec_memory(len(variant.canonical_json()))
        if size > VARIANT_BYTES:
            return variant  # used for this request only
        with self._lock:
            if key not in self._variants:
                self._variants[key] = (variant, size)
                self._variant_bytes += size
            while self._variant_bytes > VARIANT_BYTES:
                _, (_, freed) = self._variants.popitem(last=False)
                self._variant_bytes -= freed
        return variant

    def batch(
        self,
        images: Sequence[bytes],
        resize: tuple[int, int] | None,
        draft: bool,
        spec: InputSpec,
        limits: RequestLimits,
        field: str = "encoded",
    ) -> DeferredBatch:
        """The images as a batch of `spec`'s input, read (decoded) only once admitted.

        Every check that needs no decoding runs here: count, bytes, size asked for, each
        header's format and pixels, one size for all without a resize.
        """
        admit_encoded([len(image) for image in images], resize, limits, field)
        image_mode(spec.channels)
        if draft and resize is None:
            raise InvalidRequest(f"{field}.draft", "needs a resize: set height and width")
        headers = [
            read_image_header(
                image,
                f"{field}.images[{index}]",
                formats=ENCODED_FORMATS,
                max_pixels=limits.max_pixels_per_image,
            )
            for index, image in enumerate(images)
        ]
        size = resize
        if size is None:
            first = headers[0]
            for index, header in enumerate(headers):
                if (header.height, header.width) != (first.height, first.width):
                    raise InvalidRequest(
                        f"{field}.images[{index}]",
                        f"is {header.height}x{header.width}, {field}.images[0] is "
                        f"{first.height}x{first.width}: a batch has one size; set height and "
                        "width to resize them",
                    )
            size = (first.height, first.width)
        height, width = size
        shape = batch_shape(spec.layout, len(images), spec.channels, height, width)
        largest = max(header.height * header.width for header in headers)
        # At most `threads` images decode at once; a float input is converted from a uint8 copy.
        scratch = DECODE_BYTES_PER_PIXEL * largest * min(len(images), self.threads)
        if spec.dtype != PIXEL_DTYPE:
            scratch += len(images) * spec.channels * height * width

        def read() -> np.ndarray:
            pixels = self.decode(images, spec, resize, size, draft, field)
            return pixels if spec.dtype == PIXEL_DTYPE else pixel_values(pixels, spec)

        return DeferredBatch(tuple(shape), np.dtype(spec.dtype), read, scratch)

    def decode(
        self,
        images: Sequence[bytes],
        spec: InputSpec,
        resize: tuple[int, int] | None,
        size: tuple[int, int],
        draft: bool,
        field: str,
    ) -> np.ndarray:
        """The images decoded into one uint8 batch of `size` images in `spec`'s layout, on
        the decode threads; `resize` as the request asked (None: each is `size` already).

        The first image that fails (in index order) is the error; the rest are not waited for
        beyond what is running already.
        """
        height, width = size
        out = np.empty(batch_shape(spec.layout, len(images), spec.channels, height, width), "u1")

        def decode_one(index: int) -> None:
            pixels = decode_pixels(
                images[index],
                spec.channels,
                resize,
                draft=draft,
                formats=ENCODED_FORMATS,
                field=f"{field}.images[{index}]",
            )
            if pixels.shape[:2] != size:  # a header that lied about the size
                raise InvalidTensor(
                    f"{field}.images[{index}]",
                    f"decoded to {pixels.shape[0]}x{pixels.shape[1]}; its header said "
                    f"{size[0]}x{size[1]}",
                )
            out[index] = from_hwc(pixels, spec.layout)

        pool = self._executor()
        futures: list[Future[None]] = [pool.submit(decode_one, i) for i in range(len(images))]
        try:
            for future in futures:
                future.result()
        finally:
            for future in futures:
                future.cancel()
        with self._lock:
            self.decoded += len(images)
        return out

    def close(self) -> None:
        """Stop the decode threads (running decodes finish)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
