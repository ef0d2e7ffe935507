"""Loop detection (perpetual_logits.text.repetition): constructed loops are found where they begin, text without a
repeat is never flagged, and every index returned lies inside the row."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import DATA

from perpetual_logits.text.repetition import LoopMatch, find_line_loop, find_token_loop, newline_token_ids


def is_token_loop(ids: list[int], start: int, min_span: int, max_span: int, min_repeats: int, min_tokens: int) -> int:
    """Reference: the shortest span p whose required copies end the row exactly (brute force), or 0."""
    for p in range(min_span, max_span + 1):
        copies = max(min_repeats, -(-min_tokens // p))
        need = p * copies
        if need > len(ids) - start:
            continue
        tail = ids[len(ids) - need :]
        if all(tail[k] == tail[k % p] for k in range(need)):
            return p
    return 0


# -- token loops -------------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(
    prefix=st.lists(st.integers(0, 50), max_size=20),
    span=st.lists(st.integers(100, 130), min_size=1, max_size=8, unique=True),
    copies=st.integers(3, 6),
)
def test_constructed_loop_is_found_where_the_repeat_begins(prefix, span, copies):
    # Prefix tokens (< 100) never occur in the span (>= 100) and the span has distinct tokens, so the
    # repetition begins exactly at the first copy and its period is exactly len(span).
    ids = prefix + span * copies
    need = max(3, -(-8 // len(span)))
    # Feed the row token by token, as the generation loop does: the loop is reported once, when it forms.
    found = [(n, m) for n in range(1, len(ids) + 1) if (m := find_token_loop(ids[:n])) is not None]
    if len(span) * copies < len(span) * need:
        assert found == []
        return
    assert len(found) == 1
    n, match = found[0]
    assert n == len(prefix) + len(span) * need  # as soon as the required copies are complete
    assert match == LoopMatch(
        start=len(prefix) + len(span), first=len(prefix), span=len(span), repeats=need, kind="token"
    )
    assert 0 <= match.start < n


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, 3), max_size=60), data=st.data())
def test_agrees_with_brute_force_and_stays_inside_the_row(ids, data):
    start = data.draw(st.integers(0, len(ids)))
    min_span = data.draw(st.integers(1, 4))
    max_span = data.draw(st.integers(min_span, 8))
    min_repeats = data.draw(st.integers(2, 4))
    min_tokens = data.draw(st.integers(1, 10))
    match = find_token_loop(ids, start, min_span, max_span, min_repeats, min_tokens)
    p = is_token_loop(ids, start, min_span, max_span, min_repeats, min_tokens)
    if match is None:
        # Either no loop ends the row, or the row already looped one token earlier (reported then).
        assert p == 0 or is_token_loop(ids[:-1], start, min_span, max_span, min_repeats, min_tokens)
        return
    assert match.span == p
    assert start <= match.first < match.start < len(ids)
    assert match.start == match.first + match.span
    assert ids[match.first : match.start] == ids[match.start : match.start + match.span]
    assert match.repeats >= min_repeats


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 10_000), max_size=200, unique=True))
def test_text_without_a_repeat_is_never_flagged(ids):
    # All tokens distinct: no span can repeat, whatever the settings.
    for n in range(len(ids) + 1):
        assert find_token_loop(ids[:n], min_span=1, min_repeats=2, min_loop_tokens=1) is None


def test_short_stutters_and_numbers_are_not_loops_by_default():
    forever = 9816
    assert find_token_loop([49, 1029, 3590] + [forever] * 3) is None  # "A life lost forever forever forever"
    match = find_token_loop([49, 1029, 3590] + [forever] * 8)
    assert match is not None and (match.start, match.first, match.span) == (4, 3, 1)
    assert find_token_loop([33, 28, 32, 32, 32, 28, 32, 32, 32]) is None  # "1,000,000"
    very = [284, 1070, 28, 1070, 28, 1070]  # " and very, very, very"
    assert find_token_loop(very) is None


def test_prompt_is_never_part_of_a_loop():
    ids = [5, 6] * 10
    assert find_token_loop(ids, start=len(ids)) is None
    assert find_token_loop(ids, start=14, min_loop_tokens=6) == LoopMatch(16, 14, 2, 3, "token")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"min_span": 0}, "min_span"),
        ({"min_span": 3, "max_span": 2}, "max_span"),
        ({"min_repeats": 1}, "min_repeats"),
        ({"min_loop_tokens": 0}, "min_loop_tokens"),
        ({"start": 5}, "start"),
    ],
)
def test_token_loop_validation(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        find_token_loop([1, 2, 3], **kwargs)
    with pytest.raises(ValueError, match="`ids`"):
        find_token_loop("abc")  # type: ignore[arg-type]


# -- line loops --------------------------------------------------------------------------------------------
NL, NL2 = 0, 1

line_strategy = st.lists(st.integers(10, 60), min_size=4, max_size=9)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(line_strategy, min_size=1, max_size=12, unique_by=tuple), data=st.data())
def test_a_repeated_line_is_found_at_its_first_token(lines, data):
    repeat = data.draw(st.integers(0, len(lines) - 1))
    ids = [2, 3, NL]  # a prompt ending with a newline, as chat templates do
    starts = []
    for line in lines:
        starts.append(len(ids))
        ids += [*line, data.draw(st.sampled_from([NL, NL2]))]
    # Every line so far is distinct: nothing is flagged, after any token.
    for n in range(3, len(ids) + 1):
        assert find_line_loop(ids[:n], {NL, NL2}, start=3) is None
    copy_start = len(ids)
    ids += [*lines[repeat], NL]
    match = find_line_loop(ids, {NL, NL2}, start=3)
    if len(lines) - repeat >= 16:  # the earlier copy is outside the window
        assert match is None
        return
    assert match == LoopMatch(copy_start, starts[repeat], copy_start - starts[repeat], 2, "line")
    assert 3 <= match.first < match.start < len(ids)
    assert ids[match.start] == lines[repeat][0]


def test_line_loop_rules():
    line = [5, 6, 7, 8]
    ids = [*line, NL, NL, *line, NL]  # a blank line between the copies is skipped
    assert find_line_loop(ids, {NL}) == LoopMatch(6, 0, 6, 2, "line")
    assert find_line_loop(ids, {NL}, min_line_tokens=5) is None  # too short to count
    assert find_line_loop([*line, NL, *line, NL2], {NL}) is None  # the row does not end a line
    assert find_line_loop([*line, NL, NL], {NL}) is None  # the newest line is blank
    # The earlier copy lies in the prompt: not compared.
    assert find_line_loop(ids, {NL}, start=5) is None
    # Three copies with min_repeats=3; the match points at the most recent earlier copy.
    three = [*line, NL, 9, 9, 9, 9, NL, *line, NL, *line, NL]
    assert find_line_loop(three, {NL}, min_repeats=3) == LoopMatch(15, 10, 5, 3, "line")
    # A line cut by max_lookback is not a copy of anything.
    assert find_line_loop([*line, NL, *line, NL], {NL}, max_lookback=7) is None
    with pytest.raises(ValueError, match="`window_lines`"):
        find_line_loop(ids, {NL}, window_lines=1)
    with pytest.raises(ValueError, match="`start`"):
        find_line_loop(ids, {NL}, start=-1)


def test_newline_token_ids_rejects_non_tokenizers():
    with pytest.raises(ValueError, match="`tokenizer`"):
        newline_token_ids(object())


# -- recorded SmolLM2-135M-Instruct answers (tests/data): the defaults catch its loops, nothing else -------------
def test_defaults_on_recorded_smollm2_answers():
    import json

    data = json.loads((DATA / "smollm2_natural_answers.json").read_text())
    newlines = frozenset(data["newline_ids"])
    found: dict[str, list[tuple[str, int]]] = {}
    for prompt, ids in data["token_ids"].items():
        hits = []
        for n in range(1, len(ids) + 1):
            if (m := find_token_loop(ids[:n])) is not None:
                hits.append(("token", m.start))
            if (m := find_line_loop(ids[:n], newlines)) is not None:
                hits.append(("line", m.start))
        found[prompt] = hits
    looping = {"Write a short poem about autumn.", "What are the benefits of regular exercise?"}
    # No loop is reported in the six answers that do not loop.
    assert {p for p, hits in found.items() if hits} == looping
    # The poem alternates between a few lines ("A season to cherish, a time to forget,"): the line detector
    # reports it at its first repeated line, long before the token detector sees a verbatim 22-token cycle.
    poem = found["Write a short poem about autumn."]
    assert poem[0] == ("line", 186) and min(s for kind, s in poem if kind == "token") == 250
    # "I'm glad you're sharing your expertise." written over and over: a 9-token span, found by tokens.
    assert ("token", 267) in found["What are the benefits of regular exercise?"]
