"""featmap's contract: the rules that the server and its clients share, written once.

What belongs here is anything both sides must agree on, with no I/O and light imports
(NumPy, pydantic, grpc and the generated stubs of proto/ only). Only the spec's models (spec.py,
fields.py, ops.py and the modules that take a Pipeline: limits.py, pixels.py) need pydantic;
the client library imports the others, and parses a spec only where pydantic is installed:

    spec.py           the pipeline spec (pydantic models), its canonical JSON and id
    fields.py         the spec's building blocks: model base, field types, weight sources
    ops.py            the op table: each layer kind's model, shapes, window, weights, FLOPs;
                      the walk over a pipeline's shapes; the sliding-window arithmetic
    limits.py         the request limits and the two admission checks (pipeline, batch)
    tensors.py        which array dtypes travel and how, layout axes, reply sizes
    pixels.py         what a pipeline gets from image pixels; its uint8 pixel variant
    wire.py           Tensor messages and the copy-free framing of Extract and OIP ModelInfer
    errors.py         the exception tree and its gRPC status table
    metadata.py       gRPC metadata keys
    shared_memory.py  shared-memory naming rules
    precision.py      int8's measured error report, its threshold check and its message
    names.py          what a registered pipeline may be called (names, ids)

Who may import what: featmap.contract imports nothing of featmap but the stubs
(featmap.v1, featmap.oip); featmap.service and featmap.client import the contract; the client
library never imports featmap.service; featmap.jobs (the command line and its jobs) may import both.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

__all__ = ["__version__"]

if TYPE_CHECKING:
    __version__: str


@functools.cache
def _version() -> str:
    # importlib.metadata is read when the version is asked for, not by every import of the
    # contract (it costs the client's import a tenth of its time).
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("featmap")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        return _version()
    raise AttributeError(f"module 'featmap.contract' has no attribute {name!r}")
