"""The op table: every layer kind has every part, and everything that asks about ops asks it.

A new op is its table entry (contract/ops.py), its graph function (service/graph.py), its
reference function (service/reference.py) and its golden and onnxruntime-vs-reference cases;
each test below fails for an op that lacks one of them.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path
from typing import Any, get_args

import pytest

from featmap.contract import ops
from featmap.contract.fields import LayerBase
from featmap.contract.ops import OPS, LayerShape, symbolic_walk, walk
from featmap.contract.spec import LAYER_TYPES, SPATIAL_OPS, Pipeline, parse_pipeline
from featmap.service.graph import GRAPH_BUILDERS
from featmap.service.reference import REFERENCE_OPS

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def _layer_models(base: type[LayerBase]) -> set[type[LayerBase]]:
    """Every subclass of `base` that names an op (not the shared bases like PoolBase)."""
    found: set[type[LayerBase]] = set()
    for model in base.__subclasses__():
        if "op" in model.model_fields and get_args(model.model_fields["op"].annotation):
            found.add(model)
        found |= _layer_models(model)
    return found


def test_every_layer_model_has_a_table_entry() -> None:
    in_table = {entry.model for entry in OPS.values()}
    assert _layer_models(LayerBase) - in_table == set(), "layer models without a table entry"
    assert _layer_models(LayerBase) == in_table
    assert set(LAYER_TYPES) == {entry.model for entry in OPS.values()}
    for op, entry in OPS.items():
        assert entry.op == op


def test_every_op_has_a_graph_function_and_a_reference_function() -> None:
    assert set(OPS) - set(GRAPH_BUILDERS) == set(), "ops without a @graph_builder function"
    assert set(OPS) - set(REFERENCE_OPS) == set(), "ops without a @reference_op function"
    assert set(GRAPH_BUILDERS) == set(OPS)
    assert set(REFERENCE_OPS) == set(OPS)
    # One function per op: no function registered for two ops.
    assert len({id(f) for f in GRAPH_BUILDERS.values()}) == len(OPS)
    assert len({id(f) for f in REFERENCE_OPS.values()}) == len(OPS)


def _string_constants(node: ast.AST) -> set[str]:
    return {
        n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def _golden_ops() -> set[str]:
    """Ops that a hand-worked golden test (one calling assert_golden) in test_reference.py runs."""
    tree = ast.parse((TESTS / "test_reference.py").read_text())
    helpers = {
        node.name: _string_constants(node)
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("test_")
    }
    constants: dict[str, Any] = {
        target.id: _string_constants(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    covered: set[str] = set()
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
            continue
        names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        if "assert_golden" not in names:
            continue
        texts = _string_constants(node)
        for name in names:
            texts |= helpers.get(name, set()) | constants.get(name, set())
        covered |= texts & set(OPS)
    return covered


def test_every_op_has_a_golden_case() -> None:
    missing = set(OPS) - _golden_ops()
    assert missing == set(), "ops without a hand-worked assert_golden test in test_reference.py"


def test_every_op_has_an_onnx_vs_reference_case() -> None:
    tree = ast.parse((TESTS / "test_onnx_vs_reference.py").read_text())
    missing = set(OPS) - _string_constants(tree)
    assert missing == set(), "ops without a case in test_onnx_vs_reference.py"


def test_window_ops_take_images() -> None:
    for op, entry in OPS.items():
        assert entry.window is None or entry.takes_image, op
    assert {op for op, entry in OPS.items() if entry.takes_image} == SPATIAL_OPS


PIPELINE = {
    "input": {"channels": 3},
    "layers": [
        {"op": "conv2d", "filters": 4, "kernel_size": 3, "padding": "same", "stride": 2,
         "weights": {"init": "he_normal"}, "bias": {"init": "zeros"}},
        {"op": "leaky_relu"},
        {"op": "max_pool2d", "pool_size": 2, "ceil_mode": True},
        {"op": "conv2d", "filters": 6, "kernel_size": 3, "groups": 2, "dilation": 2,
         "weights": {"tensor": "k"}},
        {"op": "avg_pool2d", "pool_size": 3, "padding": 1, "stride": 2},
        {"op": "relu"},
        {"op": "global_max_pool2d"},
        {"op": "flatten"},
    ],
}  # fmt: skip


def test_the_walk_tracks_channels_and_shapes() -> None:
    pipeline = parse_pipeline(PIPELINE)
    steps = walk(pipeline, (40, 40))
    assert all(isinstance(step, LayerShape) for step in steps)
    # (3, 40, 40) -> conv same/2 (4, 20, 20) -> (4, 20, 20) -> pool 2 ceil (4, 10, 10)
    # -> conv 3 dilation 2 (6, 6, 6) -> avg 3/2 pad 1 (6, 3, 3) -> (6, 3, 3) -> (6, 1, 1) -> (6,)
    assert [step.out_shape for step in steps] == [
        (4, 20, 20), (4, 20, 20), (4, 10, 10), (6, 6, 6), (6, 3, 3), (6, 3, 3), (6, 1, 1), (6,)
    ]  # fmt: skip
    assert [step.in_shape[0] for step in steps] == [3, 4, 4, 4, 6, 6, 6, 6]
    assert [step.parameters for step in steps] == [3 * 4 * 9 + 4, 0, 0, 6 * 2 * 9, 0, 0, 0, 0]
    # Without a size the walk knows channels only; with symbols, the sizes are expressions.
    assert [step.out_shape[0] for step in walk(pipeline)][:-1] == [4, 4, 4, 6, 6, 6, 6]
    assert [len(step.out_shape) for step in symbolic_walk(pipeline)] == [3] * 7 + [1]


def test_parameters_are_the_sizes_of_the_weights() -> None:
    pipeline = parse_pipeline(PIPELINE)
    for step in walk(pipeline):
        expected = sum(math.prod(w.shape) for w in step.weights if w.source is not None)
        assert step.parameters == expected
    assert pipeline.tensor_names == {"k": (3, 0)}


def test_the_reference_does_not_import_the_graph_builder() -> None:
    # They share the spec and the op table only (service/__init__.py loads the server, graph
    # included, so this reads the module's own imports rather than sys.modules).
    tree = ast.parse((ROOT / "service" / "reference.py").read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    } | {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert not {name for name in imported if name.endswith((".graph", "featmap.service"))}
    assert "graph" not in {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }


@pytest.mark.parametrize("module", ["graph", "reference"])
def test_same_padding_has_one_rule(module: str) -> None:
    # The dilated extent and SAME's arithmetic live in contract/ops.py only.
    source = (ROOT / "service" / f"{module}.py").read_text()
    assert "* d + 1" not in source and "* dilation[0] + 1" not in source
    assert "resolve_pads" not in source
    assert hasattr(ops, "SamePadding")


def test_pipeline_model_takes_the_table_union() -> None:
    schema = Pipeline.model_json_schema()
    assert set(schema["$defs"]) >= {entry.model.__name__ for entry in OPS.values()}
