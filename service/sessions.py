"""onnxruntime sessions built one way, for serving and for quantizing: threads, spinning, logs."""

from __future__ import annotations

from collections.abc import Sequence

import onnxruntime as ort

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def build_session(
    model: bytes, providers: Sequence[str], *, threads: int, spinning: bool
) -> ort.InferenceSession:
    """A session of an ONNX model's bytes on `providers`, in priority order.

    `threads` intra-op threads (0: onnxruntime's choice, one per core) and one inter-op thread;
    with `spinning`, idle intra-op threads spin for the next run (onnxruntime's default)
    instead of sleeping. onnxruntime's own log is quiet below errors: its failures reach the
    caller as exceptions.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=list(providers))
