"""ONNX's own backend node tests for the ops featmap has, generated from the installed onnx.

Each case of `onnx.backend.test.case.node` for Conv, MaxPool, AveragePool, GlobalAveragePool,
GlobalMaxPool, Relu and LeakyRelu is translated to a featmap spec by `featmap import` (the
node's weight inputs become named tensors), then run through the NumPy reference and a real
server and compared with the case's expected output. A case the spec cannot hold is listed in
UNSUPPORTED with the reason, and a test checks that exactly those fail to translate.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from featmap.client import FeatureClient
from featmap.contract.spec import parse_pipeline
from featmap.jobs.onnx_import import ImportedPipeline, OnnxImportError, import_onnx
from featmap.service.reference import reference_outputs

# The generator modules of the ops featmap has (onnx/backend/test/case/node/<module>.py).
MODULES = ("conv", "maxpool", "averagepool", "globalaveragepool", "globalmaxpool", "relu",
           "leakyrelu")  # fmt: skip
OPS = {"Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Relu", "LeakyRelu"}
ELEMENTWISE = {"Relu", "LeakyRelu"}


def _collect() -> list[Any]:
    """The node test cases of OPS: importing a generator module runs its exports, each adding
    its cases to the package's list (what collect_testcases reads, without every other op)."""
    import onnx.backend.test.case.node as node_cases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in MODULES:
            importlib.import_module(f"onnx.backend.test.case.node.{module}")
    cases = [
        case
        for case in node_cases._NodeTestCases
        if len(case.model.graph.node) == 1 and case.model.graph.node[0].op_type in OPS
    ]
    return sorted(cases, key=lambda case: case.name)


CASES = {case.name: case for case in _collect()}

# What featmap's spec cannot hold, and why.
THREE_D = "3-D pooling: featmap's images are 2-D (NCHW)"
ONE_D = "1-D pooling: featmap's images are 2-D (NCHW)"
INDICES = "the Indices output: featmap returns values"
UNSUPPORTED = {
    "test_averagepool_1d_default": ONE_D,
    "test_maxpool_1d_default": ONE_D,
    "test_averagepool_3d_default": THREE_D,
    "test_averagepool_3d_dilations_small": THREE_D,
    "test_averagepool_3d_dilations_large_count_include_pad_is_0_ceil_mode_is_False": THREE_D,
    "test_averagepool_3d_dilations_large_count_include_pad_is_0_ceil_mode_is_True": THREE_D,
    "test_averagepool_3d_dilations_large_count_include_pad_is_1_ceil_mode_is_False": THREE_D,
    "test_averagepool_3d_dilations_large_count_include_pad_is_1_ceil_mode_is_True": THREE_D,
    "test_maxpool_3d_default": THREE_D,
    "test_maxpool_3d_dilations": THREE_D,
    "test_maxpool_3d_dilations_use_ref_impl": THREE_D,
    "test_maxpool_3d_dilations_use_ref_impl_large": THREE_D,
    "test_maxpool_with_argmax_2d_precomputed_pads": INDICES,
    "test_maxpool_with_argmax_2d_precomputed_strides": INDICES,
}


def assert_close(output: np.ndarray, expected: np.ndarray, case: Any) -> None:
    """Within the case's own tolerance, as ONNX's backend runner compares (rtol 1e-3: some
    expected outputs are written to 4 decimals)."""
    np.testing.assert_allclose(output, expected, rtol=case.rtol, atol=case.atol)


def _as_image(array: np.ndarray) -> np.ndarray:
    """An elementwise op's input as NCHW: trailing axes of 1 (the values and order unchanged)."""
    return array.reshape(array.shape + (1,) * (4 - array.ndim))


def translate(case: Any, folder: Path) -> tuple[ImportedPipeline, np.ndarray, np.ndarray]:
    """(featmap's spec and tensors, the images, the expected output) for one node test case.

    The node's inputs after the first (Conv's W and B) become initializers, so that the import
    takes them as named tensors; an elementwise op's input gets trailing axes of 1 (NCHW).
    OnnxImportError where featmap's spec cannot hold the case.
    """
    (inputs, outputs) = case.data_sets[0]
    node = case.model.graph.node[0]
    x = np.asarray(inputs[0])
    expected = np.asarray(outputs[0])
    if node.op_type in ELEMENTWISE and x.ndim < 4:
        x, expected = _as_image(x), _as_image(expected)
    dtype = "uint8" if x.dtype == np.uint8 else "float32"
    initializers = [
        numpy_helper.from_array(np.asarray(value), name)
        for name, value in zip(node.input[1:], inputs[1:], strict=False)
        if name
    ]
    graph = helper.make_graph(
        [node],
        case.name,
        # uint8 images are imported as float32 (the values are exact) and the spec then says
        # uint8, the dtype featmap casts inside its graph as the case's node reads it.
        [helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in node.output],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=list(case.model.opset_import))
    model.ir_version = case.model.ir_version
    path = folder / f"{case.name}.onnx"
    onnx.save(model, str(path))
    imported = import_onnx(path)
    imported.spec["input"]["dtype"] = dtype
    return imported, x, expected.astype(np.float32)


def supported_names() -> list[str]:
    return [name for name in CASES if name not in UNSUPPORTED]


def test_the_cases_are_generated_for_every_op() -> None:
    assert {case.model.graph.node[0].op_type for case in CASES.values()} == OPS
    assert set(UNSUPPORTED) <= set(CASES), "a listed case is no longer generated"
    # What the suite holds: every 2-D case of these ops, and only the 1-D/3-D/Indices ones not.
    assert len(CASES) == 53 and len(UNSUPPORTED) == 14


# How the import refuses each kind: the input's rank, or the second output.
REFUSALS = {
    ONE_D: r"has 3 dimensions; featmap takes NCHW",
    THREE_D: r"has 5 dimensions; featmap takes NCHW",
    INDICES: r"the model has 2 outputs",
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_what_the_spec_cannot_hold_is_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(OnnxImportError, match=REFUSALS[UNSUPPORTED[name]]):
        translate(CASES[name], tmp_path)


@pytest.mark.parametrize("name", supported_names())
def test_the_reference_passes(name: str, tmp_path: Path) -> None:
    imported, x, expected = translate(CASES[name], tmp_path)
    pipeline = parse_pipeline(imported.spec)
    (output,) = reference_outputs(pipeline, x, imported.tensors).values()
    assert output.shape == expected.shape
    assert_close(output, expected, CASES[name])


@pytest.mark.parametrize("name", supported_names())
def test_the_server_passes(name: str, tmp_path: Path, client: FeatureClient) -> None:
    imported, x, expected = translate(CASES[name], tmp_path)
    pid = client.register(imported.spec, weights=imported.tensors)
    (output,) = client.extract(x, pid).values()
    assert output.shape == expected.shape and output.dtype == np.float32
    assert_close(output, expected, CASES[name])
