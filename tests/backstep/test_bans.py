"""Bans: tokens forbidden per row and position, lapsing when the row is cut back before them; never a NaN row."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perpetual_logits import RowState
from perpetual_logits.backstep.bans import Bans

NEG = float("-inf")


def test_is_a_row_state():
    assert isinstance(Bans(), RowState)


def test_a_ban_applies_at_its_position_only_and_to_its_row_only():
    bans = Bans()
    bans.start(batch_size=2, prompt_length=3)
    bans.add(0, 5, [1, 2])
    logits = torch.zeros(2, 4)
    assert bans.apply(logits, rows=[0, 1], lens=[4, 5]) is logits  # row 0 chooses position 4: nothing banned
    out = bans.apply(logits, rows=[0, 1], lens=[5, 5])
    assert out[0].tolist() == [0.0, NEG, NEG, 0.0]
    assert out[1].tolist() == [0.0] * 4
    assert logits.eq(0).all()  # the input is not changed
    assert bans.apply(logits, rows=[1], lens=[5, 5]) is logits  # row 0 not listed: its bans wait


def test_bans_lapse_when_the_row_is_cut_back_before_them():
    bans = Bans()
    bans.start(batch_size=1, prompt_length=0)
    bans.add(0, 3, [1])
    bans.add(0, 6, [2])
    bans.rewind(0, 4)  # the row now ends at 4 tokens: position 6 lies on a discarded path, 3 is kept
    assert bans.at[0] == {3: {1}}
    bans.rewind(0, 3)  # position 3 is chosen again: its ban stays (the rewind was there)
    assert bans.at[0] == {3: {1}}
    bans.rewind(0, 2)
    assert bans.at[0] == {}


def test_always_bans_hold_everywhere_and_survive_rewinds():
    bans = Bans()
    bans.start(batch_size=1, prompt_length=0)
    bans.forbid_always(0, [3])
    bans.rewind(0, 0)
    for length in (1, 7):
        assert bans.apply(torch.zeros(1, 4), rows=[0], lens=[length])[0, 3] == NEG


def test_a_row_whose_every_finite_logit_is_banned_keeps_its_logits():
    bans = Bans()
    bans.start(batch_size=1, prompt_length=0)
    bans.add(0, 2, [0, 1])
    logits = torch.tensor([[0.5, 1.5, NEG, NEG]])
    out = bans.apply(logits, rows=[0], lens=[2])
    assert torch.equal(out, logits)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 8), st.sets(st.integers(0, 5), min_size=1, max_size=3)), max_size=8),
    st.integers(0, 9),
    st.integers(0, 9),
)
def test_after_a_rewind_exactly_the_bans_at_or_before_it_apply(added, cut, position):
    bans = Bans()
    bans.start(batch_size=1, prompt_length=0)
    for pos, tokens in added:
        bans.add(0, pos, tokens)
    bans.rewind(0, cut)
    expected = set().union(*(tokens for pos, tokens in added if pos == position and pos <= cut))
    out = bans.apply(torch.zeros(1, 8), rows=[0], lens=[position])  # ids 6 and 7 are never banned: no fallback
    assert {t for t in range(8) if out[0, t] == NEG} == expected
