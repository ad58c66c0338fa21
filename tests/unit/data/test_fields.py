"""Receptive-field slicing: coverage, edges, order, dedupe; positions over MELD's turn gaps."""

from __future__ import annotations

import itertools

import pyarrow as pa
import pytest

from mer_ray.data.fields import Field, dialogue_rows, fields_covering, positions, receptive_fields, with_positions


def _covered_per_size(fields, n, sizes):
    for size in sizes:
        own = [f for f in fields if f.size == size]
        assert all(fields_covering(own, p) for p in range(n)), (size, own)


def test_every_position_covered_every_size():
    for n, size, stride in itertools.product(range(1, 14), [1, 2, 3, 5, 8, 20], [1, 2, 3, 4, 7]):
        fields = receptive_fields(n, [size], stride=stride)
        _covered_per_size(fields, n, [size])
        assert all(0 <= f.start < f.end <= n for f in fields)
        assert all(len(f) == min(size, n) for f in fields)  # full-size windows, one clipped window if n < size
        assert len(set(fields)) == len(fields)
        starts = [f.start for f in fields]
        assert starts == sorted(starts) and starts[0] == 0 and fields[-1].end == n
        steps = {b - a for a, b in zip(starts, starts[1:-1])}
        assert steps <= {min(stride, size)}, (n, size, stride, fields)


def test_stride_windows_and_end_aligned_last_window():
    assert receptive_fields(10, [4], stride=3) == [Field(4, 0, 4), Field(4, 3, 7), Field(4, 6, 10)]
    # strides leave positions 9-10 uncovered: a last window aligned to the end covers them
    assert receptive_fields(11, [4], stride=3) == [Field(4, 0, 4), Field(4, 3, 7), Field(4, 6, 10), Field(4, 7, 11)]
    # a stride larger than the size is clamped to it: no position falls between windows
    assert receptive_fields(7, [2], stride=5) == [Field(2, 0, 2), Field(2, 2, 4), Field(2, 4, 6), Field(2, 5, 7)]


def test_dialogue_shorter_than_window_and_whole_dialogue():
    assert receptive_fields(3, [8]) == [Field(8, 0, 3)]
    assert receptive_fields(3, [8, None]) == [Field(8, 0, 3, merged=(None,))]
    assert receptive_fields(5, [None]) == [Field(None, 0, 5)]
    assert receptive_fields(5, [5], stride=2) == [Field(5, 0, 5)]


def test_single_utterance_and_size_one():
    assert receptive_fields(1, [1, 4, None]) == [Field(1, 0, 1, merged=(4, None))]  # one span: folded
    assert receptive_fields(1, [1, 4, None], dedupe=False) == [Field(1, 0, 1), Field(4, 0, 1), Field(None, 0, 1)]
    assert receptive_fields(4, [1]) == [Field(1, i, i + 1) for i in range(4)]
    assert receptive_fields(4, [1], stride=3) == [Field(1, i, i + 1) for i in range(4)]  # stride clamped to 1


def test_multi_size_order_and_dedupe():
    sizes = [2, 4, None]
    fields = receptive_fields(4, sizes, stride=[1, 2, 1])
    assert fields == [Field(2, 0, 2), Field(2, 1, 3), Field(2, 2, 4), Field(4, 0, 4, merged=(None,))]
    full = receptive_fields(4, sizes, stride=[1, 2, 1], dedupe=False)
    assert full[-1] == Field(None, 0, 4) and len(full) == 5
    _covered_per_size(full, 4, sizes)
    for size in sizes:  # deduped, every size still covers every position through has_size
        assert all(fields_covering([f for f in fields if f.has_size(size)], p) for p in range(4))
    assert receptive_fields(5, [3, 3], stride=2) == receptive_fields(5, [3], stride=2)  # repeated size
    assert receptive_fields(4, sizes, stride=[1, 2, 1]) == fields  # deterministic
    assert [f.size for f in fields_covering(fields, 3)] == [2, 4]
    assert fields_covering(fields, 0) == [Field(2, 0, 2), Field(4, 0, 4, merged=(None,))]


def test_size_one_with_stride_covers_every_position():
    fields = receptive_fields(6, [1], stride=4)
    assert all(fields_covering(fields, p) for p in range(6))


@pytest.mark.parametrize(("args", "kwargs"), [
    ((3, [0]), {}), ((3, [-2]), {}), ((3, [2.5]), {}), ((3, []), {}), ((3, [2]), {"stride": 0}),
    ((3, [2, 3]), {"stride": [1]}), ((-1, [2]), {}), ((True, [2]), {}),
])
def test_rejects_bad_arguments(args, kwargs):
    with pytest.raises(ValueError):
        receptive_fields(*args, **kwargs)


def test_empty_dialogue_gives_no_fields():
    assert receptive_fields(0, [2, None]) == []


def test_positions_follow_turn_order_across_gaps():
    table = pa.table({"dialogue_id": ["d2", "d1", "d2", "d1", "d2"], "turn": pa.array([7, 3, 0, 0, 2], pa.int64()),
                      "speaker": list("ABABA"), "text": list("vwxyz")})
    assert positions(table) == {("d2", 0): 0, ("d2", 2): 1, ("d2", 7): 2, ("d1", 0): 0, ("d1", 3): 1}
    assert dialogue_rows(table) == {"d2": [2, 4, 0], "d1": [3, 1]}
    out = with_positions(table)
    assert out["position"].to_pylist() == [2, 1, 0, 0, 1]
    assert out["dialogue_len"].to_pylist() == [3, 2, 3, 2, 3]


def test_positions_on_meld_gapped_dialogue(meld_dir):
    from mer_ray.data.loaders import load_meld

    table = load_meld(meld_dir, "dev")
    pos = positions(table)
    assert len(pos) == table.num_rows
    for d, rows in dialogue_rows(table).items():
        turns = [table["turn"][i].as_py() for i in rows]
        assert [pos[(d, t)] for t in turns] == list(range(len(rows)))
        fields = receptive_fields(len(rows), [3, None], stride=2)
        assert all(fields_covering(fields, p) for p in range(len(rows)))
