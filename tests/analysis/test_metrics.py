"""perpetual_logits.analysis.metrics: hand-made cases, argument checks and hypothesis properties."""

from __future__ import annotations

import math
import random
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perpetual_logits.analysis.metrics import (
    END_MARKERS,
    bits_per_character,
    compression_ratio,
    count_end_markers,
    distinct_n,
    diversity,
    ngrams,
    per_thousand,
    rep_n,
)
from perpetual_logits.text.endings import ENDING_PHRASES, KNOWN_END_MARKERS

token_lists = st.lists(st.integers(min_value=0, max_value=20), max_size=60)
orders = st.integers(min_value=1, max_value=6)


# -- hand-made cases ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tokens", "n", "expected"),
    [
        ([], 1, 0.0),
        ([1, 2, 3], 4, 0.0),
        ([1, 2, 3], 3, 0.0),
        ([1, 1, 1, 1], 1, 0.75),
        ([1, 1, 1, 1], 2, 2 / 3),
        ([1, 2, 1, 2, 1, 2], 2, 0.6),
        ([1, 2, 1, 2, 1, 2], 3, 0.5),
        ([1, 2, 3, 1, 2, 4], 2, 0.2),
    ],
)
def test_rep_n_hand_cases(tokens, n, expected):
    assert rep_n(tokens, n) == pytest.approx(expected)
    assert distinct_n(tokens, n) == pytest.approx(1.0 - expected)


def test_rep_n_accepts_tensors_tuples_and_strings():
    assert rep_n(torch.tensor([1, 2, 1, 2, 1, 2]), 2) == pytest.approx(0.6)
    assert rep_n((1, 2, 1, 2, 1, 2), 2) == pytest.approx(0.6)
    assert rep_n("abab", 2) == pytest.approx(1 / 3)  # character bigrams ab ba ab


def test_ngrams():
    assert ngrams([1, 2, 3], 1) == [(1,), (2,), (3,)]
    assert ngrams([1, 2, 3], 3) == [(1, 2, 3)]
    assert ngrams([], 2) == []


@pytest.mark.parametrize("n", [0, -1, 1.0, True, "2", None])
def test_bad_n_names_the_argument(n):
    for fn in (rep_n, distinct_n, ngrams):
        with pytest.raises(ValueError, match="`n`"):
            fn([1, 2, 3], n)


@pytest.mark.parametrize("tokens", [iter([1, 2]), 5, None, torch.zeros(2, 3)])
def test_bad_tokens_names_the_argument(tokens):
    with pytest.raises(ValueError, match="`tokens`"):
        rep_n(tokens, 2)


def test_diversity():
    assert diversity([1, 2, 3, 4, 5, 6]) == 1.0
    tokens = [1, 2] * 5
    expected = (1 - rep_n(tokens, 2)) * (1 - rep_n(tokens, 3)) * (1 - rep_n(tokens, 4))
    assert diversity(tokens) == pytest.approx(expected)
    for ns in ([], "23", [0], [2, True], 2):
        with pytest.raises(ValueError, match="`ns`"):
            diversity(tokens, ns)  # type: ignore[arg-type]


def test_compression_ratio():
    assert compression_ratio("") == 0.0
    assert compression_ratio(b"") == 0.0
    text = "Once upon a time there was a cat. " * 40
    assert compression_ratio(text) == pytest.approx(len(text) / len(zlib.compress(text.encode(), 9)))
    assert compression_ratio(text) == compression_ratio(text.encode())
    # Repetitive text compresses better than varied text of the same length.
    rng = random.Random(0)
    varied = "".join(chr(rng.randrange(33, 123)) for _ in range(len(text)))
    assert compression_ratio(text) > 5 * compression_ratio(varied)
    with pytest.raises(ValueError, match="`text`"):
        compression_ratio(["a"])  # type: ignore[arg-type]


def test_compression_ratio_counts_utf8_bytes():
    text = "é" * 100
    assert compression_ratio(text) == pytest.approx(200 / len(zlib.compress(text.encode(), 9)))


# -- end markers --------------------------------------------------------------------------------------------
def test_end_markers_tuple():
    assert isinstance(END_MARKERS, tuple)
    for marker in ("<|end_story|>", "The End", "THE END", "The end."):
        assert marker in END_MARKERS
    # exactly what ending control bans by default: one list, no drift
    assert set(END_MARKERS) == set(KNOWN_END_MARKERS) | set(ENDING_PHRASES)
    assert all(isinstance(m, str) and m for m in END_MARKERS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("Once upon a time.", 0),
        ("The End", 1),
        ("THE END. THE END.", 2),
        ("They lived happily ever after. The end.", 1),  # a closing formula is not an end marker
        ("The end.<|end_story|>", 2),
        ("the end of the road", 0),  # no period: not an ending
        ("<|end_story|><|end_story|>", 2),
        ("the end.", 0),  # lower case: the end of an ordinary sentence, not a marker
        ("THE end.", 0),  # case-sensitive by default
        ("To be continued", 1),
    ],
)
def test_count_end_markers_defaults(text, expected):
    assert count_end_markers(text) == expected


def test_count_end_markers_case_and_overlap():
    assert count_end_markers("THE end.", ignore_case=True) == 1
    assert count_end_markers("aaaa", markers=["aa"]) == 2  # non-overlapping
    assert count_end_markers("aaa", markers=["aa"]) == 1
    # Longest marker wins where two start at the same place, and its text is not counted again.
    assert count_end_markers("The end.", markers=["The end", "The end."]) == 1
    assert count_end_markers("a.b", markers=["."]) == 1  # markers are literal, not regexes


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"text": 5}, "`text`"),
        ({"text": "x", "markers": []}, "`markers`"),
        ({"text": "x", "markers": "The End"}, "`markers`"),
        ({"text": "x", "markers": ["ok", ""]}, "`markers`"),
        ({"text": "x", "markers": ["ok", 3]}, "`markers`"),
        ({"text": "x", "ignore_case": 1}, "`ignore_case`"),
    ],
)
def test_count_end_markers_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        count_end_markers(**kwargs)


# -- bits per character, per thousand ----------------------------------------------------------------------
def test_bits_per_character():
    assert bits_per_character(0.0, 5) == 0.0
    assert bits_per_character(math.log(2) * 8, 4) == pytest.approx(2.0)
    assert bits_per_character(10, 10) == pytest.approx(1 / math.log(2))
    for bad in (-1.0, math.nan, math.inf, True, "1"):
        with pytest.raises(ValueError, match="`total_nll_nats`"):
            bits_per_character(bad, 3)  # type: ignore[arg-type]
    for bad_n in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="`n_chars`"):
            bits_per_character(1.0, bad_n)  # type: ignore[arg-type]


def test_per_thousand():
    assert per_thousand(0, 0) == 0.0
    assert per_thousand(5, 500) == 10.0
    with pytest.raises(ValueError, match="`count`"):
        per_thousand(1, 0)
    with pytest.raises(ValueError, match="`count`"):
        per_thousand(-1, 10)
    with pytest.raises(ValueError, match="`n_tokens`"):
        per_thousand(1, -1)


# -- properties ---------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(token_lists, orders)
def test_rep_n_in_unit_interval_and_distinct_complement(tokens, n):
    r = rep_n(tokens, n)
    assert 0.0 <= r < 1.0
    assert distinct_n(tokens, n) == pytest.approx(1.0 - r)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10**6), max_size=40, unique=True), orders)
def test_rep_n_zero_for_distinct_tokens(tokens, n):
    assert rep_n(tokens, n) == 0.0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=10), st.integers(2, 8), orders)
def test_repeating_a_block_raises_rep_n(block, times, n):
    # Repeating a block many times can only add copies of n-grams already present (plus at most len(block)
    # seam n-grams), so rep_n of the repeated text is at least that of the block.
    repeated = block * times
    assert rep_n(repeated, n) >= rep_n(block, n) - 1e-12


@settings(max_examples=100, deadline=None)
@given(token_lists)
def test_diversity_in_unit_interval(tokens):
    d = diversity(tokens)
    assert 0.0 < d <= 1.0


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=300))
def test_compression_ratio_non_negative(text):
    r = compression_ratio(text)
    assert r >= 0.0
    assert (r == 0.0) == (text == "")


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="ab .THEnd", max_size=80), st.sampled_from(END_MARKERS))
def test_inserting_a_marker_adds_one(text, marker):
    # A marker placed between two sentinels that no marker contains is counted on its own.
    sep = "\x00"
    assert count_end_markers(text + sep + marker + sep) == count_end_markers(text + sep) + 1
    assert count_end_markers(text) <= len(text)
