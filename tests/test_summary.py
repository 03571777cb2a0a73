"""`featmap summary`: the cost arithmetic by hand, the table, and the command as a process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from featmap.contract.errors import InvalidSpec
from featmap.contract.ops import LayerCost, layer_costs, layer_parameters, parameter_count
from featmap.contract.spec import parse_pipeline
from featmap.jobs.summary import (
    FLOP_CONVENTION,
    NO_SIZE_NOTE,
    format_summary,
    parse_input_size,
)
from tests.conftest import README_SPEC
from tests.test_cli import run_featmap

ZEROS = {"init": "zeros"}
# 4 x 10 x 10 in; every kind of cost: grouped strided conv with bias, elementwise, a pool
# window, a same-padded conv without bias, and a flatten.
COST_SPEC: dict[str, Any] = {
    "input": {"channels": 4},
    "layers": [
        {
            "op": "conv2d",
            "name": "a",
            "filters": 6,
            "kernel_size": 3,
            "stride": 2,
            "groups": 2,
            "weights": ZEROS,
            "bias": ZEROS,
        },
        {"op": "leaky_relu"},
        {"op": "avg_pool2d", "pool_size": 2, "stride": 1},
        {
            "op": "conv2d",
            "name": "b",
            "filters": 2,
            "kernel_size": 3,
            "padding": "same",
            "weights": ZEROS,
        },
        {"op": "flatten", "name": "flat"},
    ],
}


def test_layer_costs_by_hand() -> None:
    costs = layer_costs(parse_pipeline(COST_SPEC), 10, 10)
    assert costs == [
        # floor((10 - 3) / 2) + 1 = 4; weights 6 * (4/2) * 3 * 3 = 108, + 6 bias
        # FLOPs 2 * (6*4*4 outputs) * (2 * 3 * 3) + 96 bias adds = 3456 + 96
        LayerCost("a", "conv2d", (6, 4, 4), 114, 3552),
        LayerCost("leaky_relu_1", "leaky_relu", (6, 4, 4), 0, 96),
        # 4 - 2 + 1 = 3; 6*3*3 windows of 2*2
        LayerCost("avg_pool2d_2", "avg_pool2d", (6, 3, 3), 0, 216),
        # weights 2 * 6 * 3 * 3 = 108, no bias; FLOPs 2 * (2*3*3) * (6*3*3)
        LayerCost("b", "conv2d", (2, 3, 3), 108, 1944),
        LayerCost("flat", "flatten", (18,), 0, 0),
    ]


def test_global_pool_counts_every_input_element() -> None:
    spec = {"input": {"channels": 3}, "layers": [{"op": "global_max_pool2d"}]}
    (cost,) = layer_costs(parse_pipeline(spec), 5, 7)
    assert cost == LayerCost("global_max_pool2d_0", "global_max_pool2d", (3, 1, 1), 0, 3 * 5 * 7)


def test_parameters_agree_with_the_pipeline_total() -> None:
    pipeline = parse_pipeline(COST_SPEC)
    assert layer_parameters(pipeline) == [114, 0, 0, 108, 0]
    assert sum(layer_parameters(pipeline)) == parameter_count(pipeline)


def test_image_too_small_names_the_layer() -> None:
    with pytest.raises(InvalidSpec) as caught:
        layer_costs(parse_pipeline(COST_SPEC), 2, 2)
    assert caught.value.field == "layers[0].kernel_size"


@pytest.mark.parametrize(
    ("text", "size"), [("224x160", (224, 160)), ("64", (64, 64)), ("32X48", (32, 48))]
)
def test_parse_input_size(text: str, size: tuple[int, int]) -> None:
    assert parse_input_size(text) == size


@pytest.mark.parametrize("text", ["", "0x4", "4x", "axb", "1x2x3", "-3x4"])
def test_parse_input_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_input_size(text)


def test_table_with_size_has_totals_and_convention() -> None:
    text = format_summary(parse_pipeline(COST_SPEC), (10, 10))
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line[:1].isalpha()}
    assert rows["a"][-2:] == ["114", "3,552"]
    assert rows["flat"][1:] == ["*", "flatten", "(N,", "18)", "0", "0"]  # the output
    assert "Total params: 222" in text
    assert f"Total FLOPs per image: {3552 + 96 + 216 + 1944:,}" in text
    assert FLOP_CONVENTION in text
    assert NO_SIZE_NOTE not in text


def test_table_without_size_is_symbolic_with_no_flops() -> None:
    text = format_summary(parse_pipeline(README_SPEC))
    assert "(N, 8, floor(H/2), floor(W/2))" in text
    assert "(N, 8, 1, 1)" in text
    assert "Total FLOPs per image: -" in text
    assert NO_SIZE_NOTE in text
    conv_row = next(line for line in text.splitlines() if line.startswith("conv1"))
    assert conv_row.split()[-2:] == ["216", "-"]  # 8 * 3 * 3 * 3 weights, no bias


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_command_reads_yaml_and_json(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"pipeline{suffix}"
    dump = json.dumps if suffix == ".json" else yaml.safe_dump
    path.write_text(dump(COST_SPEC))
    result = run_featmap("summary", "--pipeline", str(path), "--input-size", "10x10")
    assert result.returncode == 0, result.stderr
    assert result.stdout == format_summary(parse_pipeline(COST_SPEC), (10, 10))


def test_command_validation_error_exits_2(tmp_path: Path) -> None:
    bad = {**COST_SPEC, "layers": [{**COST_SPEC["layers"][0], "kernel_size": 0}]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = run_featmap("summary", "--pipeline", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith("featmap summary: error: layers[0].kernel_size: ")
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("content", "args", "expected"),
    [
        ("input: [unclosed", (), "is not valid YAML"),
        (yaml.safe_dump(COST_SPEC), ("--input-size", "big"), "--input-size: expected HxW"),
        (yaml.safe_dump(COST_SPEC), ("--input-size", "2x2"), "layers[0].kernel_size: "),
    ],
)
def test_command_usage_errors_exit_2(
    tmp_path: Path, content: str, args: tuple[str, ...], expected: str
) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(content)
    result = run_featmap("summary", "--pipeline", str(path), *args)
    assert result.returncode == 2
    assert result.stderr.startswith("featmap summary: error: ")
    assert expected in result.stderr


def test_command_missing_file_exits_2(tmp_path: Path) -> None:
    result = run_featmap("summary", "--pipeline", str(tmp_path / "nope.json"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr
