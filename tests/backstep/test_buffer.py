"""LogitsRing: the raw logits of each row's last ``capacity`` positions, forgotten past a rewind point."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perpetual_logits import RowState
from perpetual_logits.backstep.buffer import LogitsRing

CPU = torch.device("cpu")


def logits_for(row: int, position: int, vocab: int = 4) -> torch.Tensor:
    return torch.full((vocab,), float(1000 * row + position))


def test_is_a_row_state():
    assert isinstance(LogitsRing(4, 8, CPU), RowState)


def test_stores_per_row_and_keeps_the_rewind_position_itself():
    ring = LogitsRing(capacity=4, vocab_size=4, device=CPU)
    ring.start(batch_size=2, prompt_length=3)
    for position in (3, 4, 5):
        raw = torch.stack([logits_for(0, position), logits_for(1, position)])
        ring.store(raw, rows=[0, 1], positions=[position, position])
    assert torch.equal(ring.get(1, 4), logits_for(1, 4))
    ring.rewind(0, 4)  # row 0 keeps 4 tokens: position 4 was predicted from kept tokens, position 5 was not
    assert ring.has(0, 4) and not ring.has(0, 5)
    assert ring.has(1, 5)  # other rows untouched
    assert not ring.has(0, 2)  # never stored


def test_only_the_listed_rows_are_written():
    ring = LogitsRing(capacity=2, vocab_size=4, device=CPU)
    ring.start(batch_size=3, prompt_length=0)
    raw = torch.stack([logits_for(b, 7) for b in range(3)])
    ring.store(raw, rows=[2], positions=[7, 7, 7])
    assert [ring.has(b, 7) for b in range(3)] == [False, False, True]
    ring.store(raw, rows=[], positions=[7, 7, 7])  # nothing to store is fine


@settings(max_examples=80, deadline=None)
@given(
    st.integers(1, 5),
    st.lists(
        st.one_of(
            st.tuples(st.just("store"), st.integers(0, 1)),
            st.tuples(st.just("rewind"), st.integers(0, 1), st.integers(0, 6)),
        ),
        max_size=40,
    ),
)
def test_matches_a_model_of_the_last_positions(capacity, plan):
    """Against a plain model: a position is served iff it was stored, is among the row's newest ``capacity``
    slots, and no rewind to before it happened since."""
    ring = LogitsRing(capacity=capacity, vocab_size=4, device=CPU)
    ring.start(batch_size=2, prompt_length=0)
    next_position = [0, 0]
    stored: list[dict[int, int]] = [{}, {}]  # slot -> position
    for action in plan:
        if action[0] == "store":
            row = action[1]
            position = next_position[row]
            raw = torch.stack([logits_for(b, position) for b in range(2)])
            ring.store(raw, rows=[row], positions=[position, position])
            stored[row][position % capacity] = position
            next_position[row] += 1
        else:
            _, row, back = action
            length = max(0, next_position[row] - back)
            ring.rewind(row, length)
            stored[row] = {slot: p for slot, p in stored[row].items() if p <= length}
            next_position[row] = length
        for row in range(2):
            for position in range(next_position[row] + 2):
                expected = stored[row].get(position % capacity) == position
                assert ring.has(row, position) == expected
                if expected:
                    assert torch.equal(ring.get(row, position), logits_for(row, position))
