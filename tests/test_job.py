"""The batch job's flow (jobs/job.py): a shard's results in input order."""

from __future__ import annotations

import numpy as np

from featmap.jobs.images import InputError, InputItem
from featmap.jobs.job import _ShardRun
from featmap.jobs.outputs import row_blocks
from featmap.jobs.parts import Shard


def test_a_shards_results_are_in_input_order_whatever_order_its_batches_came_in() -> None:
    items = [InputItem(f"image-{i}.png") for i in range(7)]
    run = _ShardRun(Shard(0, items))
    # Images grouped by size: one batch holds positions 1, 3, 4; another 0, 5 and 6; 2 failed.
    run.outputs.append(([1, 3, 4], {"f": np.array([[1.0], [3.0], [4.0]], np.float32)}))
    run.outputs.append(([5, 6, 0], {"f": np.array([[5.0], [6.0], [0.0]], np.float32)}))
    run.rejected[2] = InputError("image-2.png", "too small")
    results = run.results(["f"])
    assert results.paths == [f"image-{i}.png" for i in (0, 1, 3, 4, 5, 6)]
    stacked = results.stacked("f")
    assert stacked is not None
    assert stacked.reshape(-1).tolist() == [0.0, 1.0, 3.0, 4.0, 5.0, 6.0]
    assert results.skipped == [("image-2.png", "too small")]
    # A batch file's rows come as one run: one block, a view of the batch's outputs.
    rows = np.arange(12, dtype=np.float32).reshape(6, 2)
    batch_run = _ShardRun(Shard(1, [InputItem("b.npy", row) for row in range(6)]))
    batch_run.outputs.append(([0, 1, 2], {"f": rows[:3]}))
    batch_run.outputs.append(([3, 4, 5], {"f": rows[3:]}))
    results = batch_run.results(["f"])
    assert results.paths == [f"b.npy[{row}]" for row in range(6)]
    (joined,) = row_blocks(results.outputs["f"])
    assert np.shares_memory(joined, rows)
    np.testing.assert_array_equal(joined, rows)
