"""CacheLayout: after any mix of appends and rewinds, each row's unmasked slots hold exactly its fed tokens, in
order and right-aligned, and the width never passes the capacity. No model: the cache is a real DynamicCache whose
keys are the token ids themselves, so a slot shows which token it holds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from perpetual_logits import RowState
from perpetual_logits._compat import cache_layers, gather_slots
from perpetual_logits.backstep.cache import CacheLayout

CPU = torch.device("cpu")


def cache_of(rows: list[list[int]]) -> DynamicCache:
    """A one-layer, one-head cache whose key (and value) at each slot is the token id fed there."""
    keys = torch.tensor(rows, dtype=torch.float32)[:, None, :, None]
    cache = DynamicCache()
    cache.update(keys, keys.clone(), 0)
    return cache


def feed(layout: CacheLayout, tokens: list[int | None]) -> None:
    """What the loop's forward does after ``append_column``: write one new slot per row (``None`` = padding)."""
    real = [t is not None for t in tokens]
    layout.append_column(real)
    column = torch.tensor([-1.0 if t is None else float(t) for t in tokens])[:, None, None, None]
    layout.cache.update(column, column.clone(), 0)


def visible(layout: CacheLayout, row: int) -> list[int]:
    """The tokens in the row's unmasked slots, in slot order."""
    assert layout.mask is not None
    keys = cache_layers(layout.cache)[0].keys[row, 0, : layout.width, 0]
    return [int(k) for k, m in zip(keys.tolist(), layout.mask[row, : layout.width].tolist()) if m]


def check_right_aligned(layout: CacheLayout, row: int, tokens: list[int]) -> None:
    assert layout.mask is not None
    assert visible(layout, row) == tokens
    mask = layout.mask[row, : layout.width].tolist()
    assert mask == [0] * (layout.width - len(tokens)) + [1] * len(tokens)  # padding only before the content
    assert cache_layers(layout.cache)[0].keys.shape[2] == layout.width


def test_is_a_row_state():
    assert isinstance(CacheLayout(cache_of([[5, 6]]), None, 2, 8, CPU), RowState)


def test_rewind_in_a_batch_moves_only_the_cut_row_and_a_batch_of_one_is_cropped():
    layout = CacheLayout(cache_of([[10, 11, 12], [20, 21, 22]]), None, 3, 16, CPU)
    layout.start(2, 3)
    feed(layout, [13, 23])
    feed(layout, [14, 24])
    layout.rewind(0, 4)  # row 0 keeps 10..13
    assert layout.fed(0) == 4 and layout.fed(1) == 5
    layout.realign()
    assert layout.width == 5 and layout.realignments == 1  # the longest row is whole: the width stays, row 0 moves
    check_right_aligned(layout, 0, [10, 11, 12, 13])
    check_right_aligned(layout, 1, [20, 21, 22, 23, 24])

    single = CacheLayout(cache_of([[1, 2, 3]]), None, 3, 16, CPU)
    single.start(1, 3)
    feed(single, [4])
    single.rewind(0, 2)
    single.realign()
    assert single.width == 2 and single.realignments == 0  # cropped, nothing moved
    check_right_aligned(single, 0, [1, 2])


def test_positions_follow_the_prompt_mask():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    layout = CacheLayout(cache_of([[0, 7, 8], [5, 6, 7]]), mask, 3, 16, CPU)
    layout.start(2, 3)
    assert [layout.position(0, i) for i in range(1, 5)] == [0, 1, 2, 3]  # left padding takes no position
    assert [layout.position(1, i) for i in range(5)] == [0, 1, 2, 3, 4]


def test_a_waiting_row_takes_a_padding_slot_that_goes_at_the_next_realignment():
    layout = CacheLayout(cache_of([[10, 11], [20, 21]]), None, 2, 16, CPU)
    layout.start(2, 2)
    feed(layout, [None, 22])
    layout.drop_padding(0)
    layout.realign()
    check_right_aligned(layout, 0, [10, 11])
    check_right_aligned(layout, 1, [20, 21, 22])


def test_drop_last_forgets_the_newest_slot_for_a_refeed():
    layout = CacheLayout(cache_of([[10, 11, 12]]), None, 3, 16, CPU)
    layout.start(1, 3)
    layout.drop_last(0)
    assert layout.fed(0) == 2
    layout.realign()
    feed(layout, [12])  # the token is fed again
    check_right_aligned(layout, 0, [10, 11, 12])


def test_overflow_is_an_error_not_a_silent_wrap():
    layout = CacheLayout(cache_of([[1, 2]]), None, 2, 3, CPU)
    layout.start(1, 2)
    feed(layout, [3])
    with pytest.raises(RuntimeError, match="overflow"):
        layout.append_column([True])


# One step: which rows append a new token (the others feed their last token again), or a rewind of one row.
steps = st.lists(
    st.one_of(
        st.tuples(st.just("step"), st.lists(st.booleans(), min_size=3, max_size=3)),
        st.tuples(st.just("rewind"), st.integers(0, 2), st.integers(0, 20)),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(steps, st.booleans())
def test_any_mix_of_appends_and_rewinds_keeps_every_row_exact(plan, tight):
    prompt, batch, capacity = 2, 3, 40
    tokens = [[100 * b + i for i in range(prompt)] for b in range(batch)]
    layout = CacheLayout(cache_of(tokens), None, prompt, capacity, CPU)
    layout.start(batch, prompt)
    counter = 1000
    for action in plan:
        if action[0] == "rewind":
            _, row, back = action
            length = max(prompt, len(tokens[row]) - back)
            del tokens[row][length:]
            layout.rewind(row, length)
            continue
        if max(len(t) for t in tokens) >= capacity - 1:
            break
        for b, grows in enumerate(action[1]):
            if grows:
                counter += 1
                tokens[b].append(counter)
            if layout.fed(b) == len(tokens[b]):  # nothing new: feed the last kept token again, as the loop does
                layout.drop_last(b)
            assert layout.fed(b) == len(tokens[b]) - 1
        layout.realign(tight=tight)
        feed(layout, [t[-1] for t in tokens])
        for b in range(batch):
            check_right_aligned(layout, b, tokens[b])
            assert [layout.position(b, i) for i in range(len(tokens[b]))] == list(range(len(tokens[b])))
        assert layout.width <= capacity
    layout.realign(tight=True)
    assert layout.width == max(layout.fed(b) for b in range(batch))
    for b in range(batch):
        assert visible(layout, b) == tokens[b][: layout.fed(b)]


@settings(max_examples=150, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 9), st.integers(1, 6)),
    sliced=st.booleans(),
    transposed=st.booleans(),
    data=st.data(),
)
def test_gathered_slots_are_those_of_an_element_by_element_gather(shape, sliced, transposed, data) -> None:
    """gather_slots reads whole vectors from the storage (a slice of a larger cache, as a dynamic layer keeps,
    included); a layout it cannot read so falls back to gather. Both give gather's answer."""
    batch, heads, slots, dim = shape
    if transposed:  # the last dimension not contiguous
        tensor = torch.randn(batch, heads, dim, slots).transpose(2, 3)
    elif sliced:  # rows 1.. and slots 2.. of a larger tensor
        tensor = torch.randn(batch + 1, heads, slots + 4, dim)[1:, :, 2 : 2 + slots]
    else:
        tensor = torch.randn(batch, heads, slots, dim)
    rows = torch.tensor(data.draw(st.lists(st.integers(0, batch - 1), min_size=1, max_size=batch, unique=True)))
    width = data.draw(st.integers(1, slots))
    index = torch.tensor(
        data.draw(
            st.lists(
                st.lists(st.integers(0, slots - 1), min_size=width, max_size=width),
                min_size=len(rows),
                max_size=len(rows),
            )
        )
    )
    expected = tensor[rows].gather(2, index[:, None, :, None].expand(-1, heads, -1, dim))
    assert torch.equal(gather_slots(tensor, rows, index), expected)
