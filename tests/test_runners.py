"""The embedded runner's output blocks: rows of its own for each batch, the reference's numbers."""

from __future__ import annotations

import numpy as np

from featmap.contract.spec import parse_pipeline
from featmap.jobs.runners import EmbeddedRunner, OutputBlocks
from tests.conftest import README_SPEC, assert_matches_reference


def test_blocks_give_each_batch_rows_no_other_batch_shares() -> None:
    blocks = OutputBlocks(block_bytes=10 * 16)  # ten rows of 4 float32 a block
    key = ("float32", (1, 2, 2))
    assert blocks.rows(key, 3) is None  # nothing learned yet
    blocks.learn(key, {"f": np.zeros((3, 4), np.float32)})
    given = [blocks.rows(key, count) for count in (3, 3, 3, 3, 12)]
    arrays = [rows["f"] for rows in given if rows is not None]
    assert [a.shape for a in arrays] == [(3, 4)] * 4 + [(12, 4)]
    for i, a in enumerate(arrays):
        assert a.flags.writeable and a.flags.c_contiguous
        for b in arrays[i + 1 :]:
            assert not np.shares_memory(a, b)
    assert arrays[0].base is arrays[2].base  # the first three in one block
    assert arrays[3].base is not arrays[0].base  # the fourth did not fit: a new block
    assert blocks.rows(("float32", (1, 3, 3)), 2) is None  # another image shape: learn again
    blocks.learn(key, {"f": np.zeros((2, 4), np.float64)})
    assert blocks.rows(key, 2) is None  # not float32: arrays of their own


def test_the_embedded_runner_keeps_every_batchs_outputs_as_computed() -> None:
    pipeline = parse_pipeline(README_SPEC)
    runner = EmbeddedRunner(pipeline)
    runner.blocks = OutputBlocks(block_bytes=5 * 4 * (8 * 8 * 8 + 8))  # five images a block
    rng = np.random.default_rng(11)
    batches = [
        rng.standard_normal((n, 3, size, size)).astype(np.float32)
        for n, size in ((2, 8), (2, 8), (3, 8), (1, 8), (2, 6), (2, 8), (4, 8))
    ]
    outputs = list(runner.run(batches))  # all kept: none may be written over by a later one
    for batch, result in zip(batches, outputs, strict=True):
        assert_matches_reference(result, pipeline, batch)
    # The first batch of a shape shows the shapes; then 2 + 3 rows fill a block, 1 starts one.
    bases = [result["features"].base for result in outputs]
    assert bases[0] is None or bases[0] is not bases[1]
    assert bases[1] is bases[2] and bases[3] is not bases[2]
