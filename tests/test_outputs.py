"""Results kept as blocks of rows (jobs/outputs.py: Rows, row_blocks)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from featmap.jobs.outputs import Results, Rows, row_blocks, stacked_rows


def test_rows_index_and_iterate_as_the_rows_they_hold() -> None:
    block = np.arange(12, dtype=np.float32).reshape(3, 4)
    rows = Rows()
    rows.append(np.full(4, -1, np.float32))
    rows.add_block(block)
    rows.add_block(block[:0])  # an empty block adds nothing
    rows.append(np.full(4, -2, np.float32))
    assert len(rows) == 5 and len(rows.blocks) == 3
    expected = [np.full(4, -1), *block, np.full(4, -2)]
    for got, want in zip(rows, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    for index in range(-5, 5):
        np.testing.assert_array_equal(rows[index], expected[index])
    assert [list(row) for row in rows[1:3]] == [list(row) for row in block[:2]]
    with pytest.raises(IndexError):
        rows[5]
    with pytest.raises(IndexError):
        rows[-6]
    assert rows[1].base is block.base or rows[1].base is block  # a view, not a copy
    assert rows.nbytes == 5 * 4 * 4 and rows.shapes() == {(4,)}


@given(st.lists(st.integers(min_value=0, max_value=4), max_size=8), st.data())
def test_rows_in_blocks_equal_the_same_rows_one_by_one(
    sizes: list[int], data: st.DataObject
) -> None:
    owner = np.arange(sum(sizes) * 3, dtype=np.float32).reshape(-1, 3)
    blocks, start = [], 0
    for size in sizes:
        blocks.append(owner[start : start + size])
        start += size
    rows = Rows()
    for block in blocks:
        rows.add_block(block)
    one_by_one = Rows(list(owner))
    assert len(rows) == len(one_by_one) == len(owner)
    index = data.draw(st.integers(min_value=0, max_value=max(0, len(owner) - 1)))
    if len(owner):
        np.testing.assert_array_equal(rows[index], owner[index])
    both = Rows()
    both.extend(rows)
    both.extend(one_by_one)
    np.testing.assert_array_equal(
        np.array(list(both)).reshape(-1, 3), np.concatenate([owner, owner])
    )


def test_blocks_of_one_array_are_written_as_one_view_of_it() -> None:
    owner = np.arange(40, dtype=np.float32).reshape(10, 4)
    rows = Rows()
    for start in range(0, 10, 3):  # batches of 3, 3, 3, 1 lying one after another
        rows.add_block(owner[start : start + 3])
    (joined,) = row_blocks(rows)
    assert joined.shape == (10, 4) and np.shares_memory(joined, owner)
    np.testing.assert_array_equal(joined, owner)
    assert stacked_rows(rows) is not owner and np.shares_memory(stacked_rows(rows), owner)
    # Rows one by one, as image files give them: joined the same way.
    (one_by_one,) = row_blocks(list(owner))
    assert np.shares_memory(one_by_one, owner)
    # A gap, another array or another dtype ends a block; nothing is dropped or reordered.
    other = np.full((2, 4), 7, np.float32)
    gapped = Rows()
    for block in (owner[:3], owner[4:6], other, owner[6:8]):
        gapped.add_block(block)
    blocks = row_blocks(gapped)
    assert [len(block) for block in blocks] == [3, 2, 2, 2]
    np.testing.assert_array_equal(
        np.concatenate(blocks), np.concatenate([owner[:3], owner[4:6], other, owner[6:8]])
    )


def test_results_add_rows_and_add_give_the_same_results() -> None:
    features = np.random.default_rng(0).standard_normal((4, 2, 2)).astype(np.float32)
    blocks, single = Results(["f"]), Results(["f"])
    blocks.add_rows(["a", "b"], {"f": features[:2]})
    blocks.add_rows(["c", "d"], {"f": features[2:]})
    for path, row in zip("abcd", features, strict=True):
        single.add(path, {"f": row})
    assert blocks.paths == single.paths == list("abcd")
    for results in (blocks, single):
        stacked = results.stacked("f")
        assert stacked is not None
        np.testing.assert_array_equal(stacked, features)
        assert results.nbytes == features.nbytes
    mixed = Results(["f"])
    mixed.add("small", {"f": np.zeros((1, 1), np.float32)})
    mixed.extend(blocks)
    assert mixed.stacked("f") is None and mixed.outputs["f"].shapes() == {(1, 1), (2, 2)}
