"""Rows: each row's tokens as lists and as one tensor; rewinds shorten one row; the result is padded after the end."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perpetual_logits import RowState, RowView
from perpetual_logits.backstep.rows import Rows

PAD = 0


def started(prompt: list[list[int]], max_length: int, mask: list[list[int]] | None = None) -> Rows:
    rows = Rows(torch.tensor(prompt), None if mask is None else torch.tensor(mask), max_length, PAD)
    rows.start(len(prompt), len(prompt[0]))
    return rows


def test_is_a_row_state():
    assert isinstance(started([[5, 6]], 8), RowState)


def test_append_rewind_and_the_two_layouts():
    rows = started([[5, 6], [7, 8]], max_length=8)
    for token in (10, 11, 12):
        rows.append(0, token)
        rows.append(1, token + 10)
    rows.rewind(1, 3)  # row 1 keeps its prompt and one token
    assert rows.ids == [[5, 6, 10, 11, 12], [7, 8, 20]] and rows.lens == [5, 3]
    # what processors see: rows padded on the left to the longest, as generate() lays them out
    assert rows.right_aligned().tolist() == [[5, 6, 10, 11, 12], [PAD, PAD, 7, 8, 20]]
    # the result: rows left-aligned, padded after their end
    assert rows.sequences().tolist() == [[5, 6, 10, 11, 12], [7, 8, 20, PAD, PAD]]


def test_text_start_skips_left_padding_and_views_say_when_a_row_is_full():
    rows = started([[PAD, 6], [7, 8]], max_length=3, mask=[[0, 1], [1, 1]])
    assert rows.text_start == [1, 0]
    rows.append(0, 9)
    assert rows.view_of(0) == RowView(0, [PAD, 6, 9], 2, 1, final=True)
    assert rows.full(0) and not rows.full(1)
    assert rows.view_of(1).final is False


def test_finish_and_rewind_decide_which_rows_are_active():
    rows = started([[1], [2], [3]], max_length=5)
    rows.finish(1)
    assert rows.active() == [0, 2]
    rows.rewind(1, 1)  # a rewound row writes again
    assert rows.active() == [0, 1, 2]
    assert started([[1, 2]], max_length=2).active() == []  # no room for a new token: finished at the start


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(-3, 40)), max_size=30))
def test_tensor_layouts_always_match_the_lists(plan):
    """Appends are written lazily (one copy per step); whatever the order, both layouts equal the lists."""
    prompt = [[1, 2], [3, 4], [5, 6]]
    rows = started(prompt, max_length=40)
    for row, value in plan:
        if value < 0:
            rows.rewind(row, max(2, rows.lens[row] + value))
        elif rows.lens[row] < 40:
            rows.append(row, value + 1)
    longest = max(rows.lens)
    assert rows.right_aligned().tolist() == [[PAD] * (longest - len(ids)) + ids for ids in rows.ids]
    assert rows.sequences().tolist() == [ids + [PAD] * (longest - len(ids)) for ids in rows.ids]
    assert rows.lens == [len(ids) for ids in rows.ids]
