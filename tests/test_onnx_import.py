"""`featmap import`: ONNX models built with onnx.helper, imported, run by featmap (embedded, the
NumPy reference and a real server) and compared with onnxruntime running the original model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from featmap.client import FeatureClient
from featmap.contract.spec import parse_pipeline
from featmap.jobs.cli import main
from featmap.jobs.onnx_import import ImportedPipeline, OnnxImportError, import_onnx
from featmap.service.graph import INPUT_NAME, compile_pipeline
from featmap.service.reference import reference_outputs
from featmap.service.specfiles import load_pipeline_file, load_weight_tensors

OPSET = 21
RTOL, ATOL = 1e-4, 1e-5


class Graph:
    """An ONNX graph grown node by node from the input `x` (N, C, H, W) float32."""

    def __init__(self, channels: int, seed: int = 0) -> None:
        self.channels = channels
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.head = "x"
        self.count = 0

    def const(self, value: np.ndarray) -> str:
        self.count += 1
        name = f"c{self.count}"
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, *inputs: str, name: str | None = None, **attributes: Any) -> str:
        self.count += 1
        name = name or f"{op.lower()}{self.count}"
        out = f"{name}_out"
        self.nodes.append(
            helper.make_node(op, [self.head, *inputs], [out], name=name, **attributes)
        )
        self.head = out
        return out

    def conv(
        self,
        filters: int,
        kernel: int,
        in_channels: int,
        groups: int = 1,
        bias: bool = True,
        **attributes: Any,
    ) -> str:
        w = self.rng.normal(size=(filters, in_channels // groups, kernel, kernel)) * 0.3
        inputs = [self.const(w.astype(np.float32))]
        if bias:
            inputs.append(self.const(self.rng.normal(size=filters).astype(np.float32)))
        return self.node("Conv", *inputs, group=groups, **attributes)

    def batch_norm(self, channels: int, **attributes: Any) -> str:
        scale, shift, mean = (self.rng.normal(size=channels) for _ in range(3))
        var = self.rng.uniform(0.2, 2.0, size=channels)
        inputs = [self.const(v.astype(np.float32)) for v in (scale, shift, mean, var)]
        return self.node("BatchNormalization", *inputs, **attributes)

    def torch_pad(self, left: int, right: int, top: int, bottom: int, value: float) -> str:
        """F.pad(x, (left, right, top, bottom), value=value) as torch.onnx exports it."""
        nodes = self.nodes

        def constant(name: str, value: np.ndarray) -> str:
            nodes.append(
                helper.make_node(
                    "Constant", [], [name], name=name, value=numpy_helper.from_array(value)
                )
            )
            return name

        self.count += 1
        p = f"pad{self.count}"
        amounts = constant(f"{p}_amounts", np.array([left, right, top, bottom], np.int64))
        zeros_shape = constant(f"{p}_zeros_shape", np.array([4], np.int64))
        nodes.append(
            helper.make_node(
                "ConstantOfShape",
                [zeros_shape],
                [f"{p}_zeros"],
                value=numpy_helper.from_array(np.zeros(1, np.int64)),
            )
        )
        nodes.append(helper.make_node("Concat", [amounts, f"{p}_zeros"], [f"{p}_all"], axis=0))
        shape = constant(f"{p}_shape", np.array([-1, 2], np.int64))
        nodes.append(helper.make_node("Reshape", [f"{p}_all", shape], [f"{p}_pairs"]))
        starts = constant(f"{p}_starts", np.array([-1], np.int64))
        ends = constant(f"{p}_ends", np.array([-(2**63) + 1], np.int64))
        axes = constant(f"{p}_axes", np.array([0], np.int64))
        steps = constant(f"{p}_steps", np.array([-1], np.int64))
        nodes.append(
            helper.make_node("Slice", [f"{p}_pairs", starts, ends, axes, steps], [f"{p}_reversed"])
        )
        nodes.append(helper.make_node("Transpose", [f"{p}_reversed"], [f"{p}_t"], perm=[1, 0]))
        flat = constant(f"{p}_flat", np.array([-1], np.int64))
        nodes.append(helper.make_node("Reshape", [f"{p}_t", flat], [f"{p}_onnx"]))
        nodes.append(helper.make_node("Cast", [f"{p}_onnx"], [f"{p}_pads"], to=TensorProto.INT64))
        fill = constant(f"{p}_value", np.array(value, np.float32))
        return self.node("Pad", f"{p}_pads", fill, name=p, mode="constant")

    def model(self, outputs: list[str] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "test",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", self.channels, "H", "W"])],
            [
                helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", None, None, None])
                for o in (outputs or [self.head])
            ],
            initializer=self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 10
        onnx.checker.check_model(model)
        return model


def save(model: onnx.ModelProto, tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path


def original(
    model: onnx.ModelProto, images: np.ndarray, output: str | None = None, reference: bool = False
) -> np.ndarray:
    """onnxruntime running the model as it is (onnx.reference where onnxruntime cannot)."""
    names = [output] if output else None
    if reference:
        return np.asarray(ReferenceEvaluator(model).run(names, {"x": images})[0])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, {"x": images})[0]


def images_for(channels: int, height: int = 13, width: int = 11, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, channels, height, width)).astype(np.float32)


def embedded(imported: ImportedPipeline, images: np.ndarray) -> np.ndarray:
    """featmap's compiled graph on onnxruntime, in this process; checked against the reference."""
    pipeline = parse_pipeline(imported.spec)
    session = ort.InferenceSession(
        compile_pipeline(pipeline, imported.tensors).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    (name,) = pipeline.output_names
    (ours,) = session.run([name], {INPUT_NAME: images})
    reference = reference_outputs(pipeline, images, imported.tensors)[name]
    np.testing.assert_allclose(ours, reference, rtol=RTOL, atol=ATOL * 10, err_msg="reference")
    return ours


def assert_imports(
    model: onnx.ModelProto,
    tmp_path: Path,
    until: str | None = None,
    output: str | None = None,
    channels: int = 3,
    size: tuple[int, int] = (13, 11),
    reference: bool = False,
) -> ImportedPipeline:
    """Import the model and check featmap's result against onnxruntime's on the original."""
    imported = import_onnx(save(model, tmp_path), until=until)
    images = images_for(channels, *size)
    want = original(model, images, output, reference)
    got = embedded(imported, images)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    return imported


def ops(imported: ImportedPipeline) -> list[str]:
    return [layer["op"] for layer in imported.spec["layers"]]


# --------------------------------------------------------------------------- every op and padding

CONV_FORMS: dict[str, dict[str, Any]] = {
    "notset_default": {},
    "pads": {"pads": [1, 0, 2, 1]},
    "same_upper": {"auto_pad": "SAME_UPPER"},
    "same_upper_stride2": {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    "same_lower": {"auto_pad": "SAME_LOWER"},
    "same_lower_stride2": {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
    # onnxruntime runs no Conv with auto_pad SAME and dilation: onnx.reference runs these
    "same_lower_dilated": {"auto_pad": "SAME_LOWER", "dilations": [2, 2], "strides": [2, 1]},
    "same_upper_dilated": {"auto_pad": "SAME_UPPER", "dilations": [2, 3]},
    "valid": {"auto_pad": "VALID"},
    "notset_explicit": {"auto_pad": "NOTSET", "pads": [1, 1, 1, 1], "strides": [2, 1]},
    "dilated": {"dilations": [2, 1], "pads": [2, 1, 2, 1]},
    "kernel_shape": {"kernel_shape": [2, 2], "strides": [1, 2]},
}


@pytest.mark.parametrize("form", CONV_FORMS)
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_conv_padding_forms(form: str, groups: int, bias: bool, tmp_path: Path) -> None:
    g = Graph(3)
    kernel = 2 if "kernel_shape" in CONV_FORMS[form] else 3
    g.conv(6, kernel, 3, groups=groups, bias=bias, **CONV_FORMS[form])
    imported = assert_imports(g.model(), tmp_path, reference=form.endswith("_dilated"))
    (layer,) = imported.spec["layers"]
    assert layer["groups"] == groups and ("bias" in layer) == bias


POOL_FORMS: dict[str, dict[str, Any]] = {
    "default_stride_1": {"kernel_shape": [2, 2]},
    "strided": {"kernel_shape": [3, 3], "strides": [2, 2]},
    "pads": {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 0, 1]},
    "ceil": {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
    "ceil_pads": {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
    "same_upper": {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
    "same_lower": {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER"},
    "valid": {"kernel_shape": [2, 3], "strides": [2, 1], "auto_pad": "VALID"},
    "dilated": {"kernel_shape": [2, 2], "dilations": [2, 2], "pads": [1, 1, 1, 1]},
}


@pytest.mark.parametrize("form", POOL_FORMS)
@pytest.mark.parametrize(
    ("op", "extra"),
    [("MaxPool", {}), ("AveragePool", {}), ("AveragePool", {"count_include_pad": 1})],
    ids=["max", "avg", "avg_count_pad"],
)
def test_pool_forms(op: str, extra: dict[str, Any], form: str, tmp_path: Path) -> None:
    g = Graph(3)
    g.node(op, **POOL_FORMS[form], **extra)
    assert_imports(g.model(), tmp_path)


def test_a_conv_stack_with_every_op(tmp_path: Path, client: FeatureClient) -> None:
    g = Graph(3, seed=1)
    g.node("Identity")
    g.conv(8, 3, 3, pads=[1, 1, 1, 1], strides=[2, 2])
    g.batch_norm(8, epsilon=1e-3)  # folded into the conv
    g.node("Relu")
    g.node("MaxPool", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
    g.conv(8, 3, 8, groups=2, auto_pad="SAME_LOWER")
    g.node("LeakyRelu", alpha=0.2)
    g.batch_norm(8)  # standalone: after an activation
    g.node("AveragePool", kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)
    g.node("GlobalMaxPool")
    g.node("Flatten", axis=1)
    imported = assert_imports(g.model(), tmp_path, size=(17, 15))
    assert ops(imported) == [
        "conv2d",
        "batch_norm",
        "relu",
        "max_pool2d",
        "conv2d",
        "leaky_relu",
        "batch_norm",
        "avg_pool2d",
        "global_max_pool2d",
        "flatten",
    ]
    model = compile_pipeline(parse_pipeline(imported.spec), imported.tensors)
    # the first batch norm folds into the conv; the second stays a node
    assert [n.op_type for n in model.graph.node].count("BatchNormalization") == 1
    images = images_for(3, 21, 19, seed=6)
    pid = client.register(imported.spec, weights=imported.tensors)
    (got,) = client.extract(images, pid).values()
    np.testing.assert_allclose(got, original(g.model(), images), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("pool", ["GlobalAveragePool", "GlobalMaxPool"])
def test_global_pools(pool: str, tmp_path: Path) -> None:
    g = Graph(3)
    g.conv(4, 3, 3)
    g.node(pool)
    assert ops(assert_imports(g.model(), tmp_path)) == [
        "conv2d",
        {"GlobalAveragePool": "global_avg_pool2d", "GlobalMaxPool": "global_max_pool2d"}[pool],
    ]


def test_batch_norm_standalone_first(tmp_path: Path) -> None:
    g = Graph(3)
    g.batch_norm(3)
    g.node("Relu")
    assert ops(assert_imports(g.model(), tmp_path)) == ["batch_norm", "relu"]


# --------------------------------------------------------------------------- Pad subgraphs


@pytest.mark.parametrize(
    ("before", "value", "after"),
    [
        ("none", 0.0, "Conv"),
        ("Relu", 0.0, "MaxPool"),  # zeros after a ReLU never win a max
        ("none", -np.inf, "MaxPool"),
        ("none", 0.0, "AveragePool"),
        ("none", 0.0, "AveragePool_pads_counted"),
    ],
)
def test_a_torch_pad_merges_into_the_layer_after_it(
    before: str, value: float, after: str, tmp_path: Path
) -> None:
    g = Graph(3, seed=2)
    if before == "Relu":
        g.node("Relu")
    g.torch_pad(1, 2, 0, 1, value)
    if after == "Conv":
        g.conv(4, 3, 3, pads=[1, 0, 0, 1])
    elif after == "MaxPool":
        g.node("MaxPool", kernel_shape=[3, 3], strides=[2, 2])
    else:
        pads = [1, 0, 1, 0] if after.endswith("counted") else [0, 0, 0, 0]
        g.node("AveragePool", kernel_shape=[3, 3], pads=pads, count_include_pad=1)
    imported = assert_imports(g.model(), tmp_path)
    assert "Pad" not in str(imported.spec)
    last = imported.spec["layers"][-1]
    own = [1, 0, 0, 1] if after == "Conv" else [1, 0, 1, 0] if after.endswith("ed") else [0] * 4
    # F.pad (left 1, right 2, top 0, bottom 1) -> [top 0, left 1, bottom 1, right 2] added
    assert last["padding"] == [a + b for a, b in zip(own, [0, 1, 1, 2], strict=True)]


@pytest.mark.parametrize(
    ("value", "after", "message"),
    [
        (0.0, "MaxPool", r"a max pool takes a Pad of -inf, or of 0 after a relu"),
        (1.0, "Conv", r"only a Pad of 0 is a conv's"),
        (0.0, "Relu", r"merges a Pad only into the conv or pool right after it"),
        (-np.inf, "MaxPool_small", r"padding \[1, 3, 1, 3\] is as large as the window \[3, 3\]"),
    ],
)
def test_a_pad_that_cannot_merge_is_an_error(
    value: float, after: str, message: str, tmp_path: Path
) -> None:
    g = Graph(3)
    side = 3 if after.endswith("small") else 1
    g.torch_pad(side, side, 1, 1, value)
    if after == "Conv":
        g.conv(4, 3, 3)
    elif after.startswith("MaxPool"):
        g.node("MaxPool", kernel_shape=[3, 3])
    else:
        g.node("Relu")
    with pytest.raises(OnnxImportError, match=message) as caught:
        import_onnx(save(g.model(), tmp_path))
    assert "(Pad)" in str(caught.value)


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([("Sub", "mean"), ("Div", "std")], {"mean", "std"}),
        ([("Div", 255.0), ("Sub", "mean"), ("Div", "std")], {"mean", "std"}),
        ([("Mul", 1 / 255)], {"scale"}),
        ([("Add", "mean"), ("Mul", "std")], {"mean", "std"}),
        ([("Mul", 2.0), ("Add", 0.5)], {"mean", "std"}),
    ],
    ids=["sub_div", "div255_sub_div", "mul", "add_mul", "mul_add_scalar"],
)
def test_input_normalisation(
    steps: list[tuple[str, Any]], expected: set[str], tmp_path: Path
) -> None:
    g = Graph(3)
    per_channel = {"mean": np.array([0.485, 0.456, 0.406]), "std": np.array([0.229, 0.224, 0.225])}
    for op, value in steps:
        constant = per_channel[value].reshape(1, 3, 1, 1) if isinstance(value, str) else value
        g.node(op, g.const(np.array(constant, np.float32)))
    g.conv(4, 3, 3)
    imported = assert_imports(g.model(), tmp_path)
    assert set(imported.spec["input"]) - {"channels"} == expected
    assert ops(imported) == ["conv2d"]


# --------------------------------------------------------------------------- --until


def test_until_a_node_or_an_output(tmp_path: Path) -> None:
    g = Graph(3)
    conv_out = g.conv(4, 3, 3, name="conv_a")
    relu_out = g.node("Relu", name="act")
    g.node("Sigmoid", name="gate")  # featmap has no sigmoid: the cut leaves it out
    model = g.model(outputs=[conv_out, relu_out, g.head])
    with pytest.raises(OnnxImportError, match=r"the model has 3 outputs .*pick one with --until"):
        import_onnx(save(model, tmp_path))
    by_node = assert_imports(model, tmp_path, until="act", output=relu_out)
    by_output = assert_imports(model, tmp_path, until=relu_out, output=relu_out)
    assert by_node.spec == by_output.spec
    assert ops(by_node) == ["conv2d", "relu"]
    conv_only = assert_imports(model, tmp_path, until="conv_a", output="conv_a_out")
    assert ops(conv_only) == ["conv2d"]
    with pytest.raises(OnnxImportError, match=r"no node or output of the model is named 'nope'"):
        import_onnx(save(model, tmp_path), until="nope")


# --------------------------------------------------------------------------- errors


def test_a_constant_first_is_the_same_for_mul_and_add_only(tmp_path: Path) -> None:
    g = Graph(3)
    g.nodes.append(helper.make_node("Mul", [g.const(np.float32(0.5)), "x"], ["m"], name="m"))
    g.head = "m"
    g.conv(4, 3, 3)
    imported = assert_imports(g.model(), tmp_path)
    assert imported.spec["input"] == {"channels": 3, "scale": 0.5}
    g = Graph(3)
    g.nodes.append(helper.make_node("Sub", [g.const(np.float32(1)), "x"], ["s"], name="flip"))
    g.head = "s"
    g.conv(4, 3, 3)
    with pytest.raises(OnnxImportError, match=r"node 'flip' \(Sub\): only x - c"):
        import_onnx(save(g.model(), tmp_path))


def test_an_unsupported_node_is_named_with_what_to_do(tmp_path: Path) -> None:
    g = Graph(3)
    g.conv(4, 3, 3, name="c")
    g.node("Sigmoid", name="my_sigmoid")
    with pytest.raises(OnnxImportError) as caught:
        import_onnx(save(g.model(), tmp_path))
    message = str(caught.value)
    assert "node 'my_sigmoid' (Sigmoid)" in message
    assert "relu and leaky_relu" in message


def test_a_branch_is_an_error(tmp_path: Path) -> None:
    g = Graph(3)
    first = g.conv(3, 3, 3, pads=[1, 1, 1, 1], name="a")
    g.node("Relu", name="r")
    g.nodes.append(helper.make_node("Add", [first, g.head], ["sum"], name="residual"))
    g.head = "sum"
    with pytest.raises(OnnxImportError, match=r"node 'residual' \(Add\).*no residual"):
        import_onnx(save(g.model(), tmp_path))


def test_a_file_that_is_no_model_is_an_error(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "model.onnx").write_bytes(b"\xff" * 16)
    with pytest.raises(OnnxImportError, match=r"is not an ONNX model"):
        import_onnx(tmp_path / "model.onnx")
    with pytest.raises(SystemExit) as exited:
        main(["import", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "p.yaml")])
    assert exited.value.code == 2
    assert "cannot read" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_the_command_writes_nothing_on_an_error(tmp_path: Path, capsys: Any) -> None:
    g = Graph(3)
    g.conv(4, 3, 3)
    g.node("Tanh", name="t")
    with pytest.raises(SystemExit) as exited:
        main(["import", str(save(g.model(), tmp_path)), "-o", str(tmp_path / "p.yaml")])
    assert exited.value.code == 2
    assert "node 't' (Tanh)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


# --------------------------------------------------------------------------- the command, a server


def stack(tmp_path: Path) -> tuple[onnx.ModelProto, Path]:
    g = Graph(3, seed=5)
    g.node("Sub", g.const(np.array([0.5, 0.4, 0.3], np.float32).reshape(1, 3, 1, 1)))
    g.torch_pad(1, 1, 1, 1, 0.0)
    g.conv(8, 3, 3, bias=False)
    g.batch_norm(8)
    g.node("Relu")
    g.node("MaxPool", kernel_shape=[2, 2], strides=[2, 2])
    g.conv(6, 3, 8, auto_pad="SAME_UPPER", strides=[2, 2])
    g.node("GlobalAveragePool")
    model = g.model()
    return model, save(model, tmp_path)


def test_the_command_writes_the_spec_and_npz(tmp_path: Path, capsys: Any) -> None:
    model, path = stack(tmp_path)
    spec_path = tmp_path / "pipeline.yaml"
    assert main(["import", str(path), "-o", str(spec_path)]) == 0
    npz = tmp_path / "pipeline.npz"
    assert capsys.readouterr().out.strip() == str(npz)
    pipeline, tensors = load_pipeline_file(spec_path), load_weight_tensors(npz)
    images = images_for(3, 16, 12, seed=3)
    np.save(tmp_path / "images.npy", images)
    out = tmp_path / "features.npz"
    assert (
        main(
            [
                "extract",
                "--pipeline",
                str(spec_path),
                "--weights",
                str(npz),
                "--input",
                str(tmp_path / "images.npy"),
                "--output",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    with np.load(out) as archive:
        (name,) = pipeline.output_names
        got = archive[name] if name in archive.files else archive["features"]
    np.testing.assert_allclose(got, original(model, images), rtol=RTOL, atol=ATOL)
    assert set(tensors) == set(pipeline.tensor_names)


def test_a_server_runs_the_import(tmp_path: Path, client: FeatureClient) -> None:
    model, path = stack(tmp_path)
    imported = import_onnx(path)
    images = images_for(3, 20, 18, seed=4)
    pid = client.register(imported.spec, weights=imported.tensors)
    (got,) = client.extract(images, pid).values()
    np.testing.assert_allclose(got, original(model, images), rtol=RTOL, atol=ATOL)
