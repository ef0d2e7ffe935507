"""EarlyTrigger as a RowState: ``rewind(row, length)`` means what it means for every unit (the row holds ``length``
tokens again), against a plain-Python model that keeps each row's steps by the position they observed."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perpetual_logits import EarlyTrigger, RowState


def test_is_a_row_state():
    assert isinstance(EarlyTrigger(), RowState)


def test_rewind_drops_the_steps_of_removed_positions():
    trigger = EarlyTrigger(window=3, eos_threshold=0.5)
    trigger.start(2, 4)  # rows of 4 tokens: the first update observes position 4
    for _ in range(2):  # positions 4 and 5: both rows now hold 6 tokens
        assert not trigger.update(torch.tensor([0.9, 0.9])).any()
    trigger.rewind(0, 4)  # row 0 holds 4 tokens again: positions 4 and 5 are gone, three more steps to fire
    assert trigger.update(torch.tensor([0.9, 0.9])).tolist() == [False, True]
    assert trigger.update(torch.tensor([0.9, 0.9])).tolist() == [False, False]
    assert trigger.update(torch.tensor([0.9, 0.9])).tolist() == [True, False]


def test_rewind_to_the_current_length_or_beyond_changes_nothing():
    trigger = EarlyTrigger(window=2, eos_threshold=0.5)
    trigger.start(1, 3)
    trigger.update(torch.tensor([0.9]))  # the row holds 4 tokens
    trigger.rewind(0, 4)
    trigger.rewind(0, 10)  # a rewind never lengthens a row
    assert trigger.update(torch.tensor([0.9])).tolist() == [True]  # both steps kept: the window is full


def test_rewind_needs_known_lengths():
    trigger = EarlyTrigger(window=2, eos_threshold=0.5)
    with pytest.raises(RuntimeError, match="start"):
        trigger.rewind(0, 3)
    trigger.update(torch.tensor([0.1]))  # started by the update: the lengths are unknown
    with pytest.raises(RuntimeError, match="drop_steps"):
        trigger.rewind(0, 3)
    trigger.start(1, 0)
    with pytest.raises(ValueError, match="row"):
        trigger.rewind(1, 0)
    with pytest.raises(ValueError, match="length"):
        trigger.rewind(0, -1)


def test_start_forgets_history_and_a_new_batch_size_restarts():
    trigger = EarlyTrigger(window=2, eos_threshold=0.5)
    trigger.start(1, 0)
    trigger.update(torch.tensor([0.9]))
    trigger.start(1, 0)
    assert trigger.update(torch.tensor([0.9])).tolist() == [False]  # one step of history, not two
    assert trigger.started
    trigger.reset()
    assert not trigger.started


def test_state_follows_the_device_of_the_updates_without_a_host_sync():
    """Started on the CPU (before any scores were seen), updated on the meta device: nothing reads a value."""
    trigger = EarlyTrigger(window=3, eos_threshold=0.2, entropy_slope=0.1)
    trigger.start(4, 2)
    for _ in range(4):
        fired = trigger.update(torch.rand(4, device="meta"), torch.rand(4, device="meta"))
    assert fired.device.type == "meta"
    trigger.rewind(1, 3)


def reference(window: int, threshold: float, prompt: int, ops: list[tuple]) -> list[list[bool]]:
    """Each row keeps (position, value) of its observed steps since its last firing; a rewind to ``length`` drops
    the steps of positions >= length."""
    rows: list[list[tuple[int, float]]] = []
    lengths: list[int] = []
    out: list[list[bool]] = []
    for op in ops:
        if op[0] == "update":
            if not rows:
                rows, lengths = [[] for _ in op[1]], [prompt] * len(op[1])
            fired = []
            for row, p in enumerate(op[1]):
                rows[row] = [*rows[row], (lengths[row], p)][-window:]
                lengths[row] += 1
                fire = len(rows[row]) == window and sum(v for _, v in rows[row]) / window >= threshold
                if fire:
                    rows[row] = []
                fired.append(fire)
            out.append(fired)
        else:
            _, row, length = op
            if rows:
                rows[row] = [(pos, v) for pos, v in rows[row] if pos < length]
                lengths[row] = min(lengths[row], length)
    return out


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 4),
    window=st.integers(1, 5),
    prompt=st.integers(0, 6),
    threshold=st.sampled_from([0.25, 0.5, 0.75]),
    data=st.data(),
)
def test_rewind_matches_a_model_keyed_by_position(batch, window, prompt, threshold, data):
    ops: list[tuple] = []
    lengths = [prompt] * batch
    for _ in range(data.draw(st.integers(1, 25))):
        probs = data.draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=batch, max_size=batch))
        ops.append(("update", probs))
        lengths = [n + 1 for n in lengths]
        if data.draw(st.integers(0, 3)) == 0:
            row = data.draw(st.integers(0, batch - 1))
            length = data.draw(st.integers(0, lengths[row] + 2))
            ops.append(("rewind", row, length))
            lengths[row] = min(lengths[row], length)
    trigger = EarlyTrigger(window=window, eos_threshold=threshold)
    trigger.start(batch, prompt)
    got = []
    for op in ops:
        if op[0] == "update":
            got.append(trigger.update(torch.tensor(op[1])).tolist())
        else:
            trigger.rewind(op[1], op[2])
    assert got == reference(window, threshold, prompt, ops)
