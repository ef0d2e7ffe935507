"""What the default LoopDetection() calls a loop (issue 19 item 2): degenerate repetition is rewound, repetitive
structure (JSON, YAML, tables, code, lists, recipes, song choruses) never is. Texts are tokenized with
TinyStories-656K's tokenizer and fed to the loop rule one token at a time, as generation does."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perpetual_logits import LoopDetection
from perpetual_logits.backstep.rules import LoopRule
from perpetual_logits.protocol import RowView
from perpetual_logits.text.repetition import (
    LoopMatch,
    LoopTracker,
    find_token_loop,
    newline_token_ids,
    word_token_ids,
)

LEGITIMATE = {
    "json array (the issue's case)": """[
  {"name": "Alice", "active": true},
  {"name": "Bob", "active": true},
  {"name": "Carol", "active": true},
  {"name": "Dave", "active": true}
]
""",
    "json, one field a line": """[
  {
    "name": "Alice",
    "active": true
  },
  {
    "name": "Bob",
    "active": true
  },
  {
    "name": "Carol",
    "active": true
  }
]
""",
    "json numbers": '{"weights": [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], "ids": [1, 1, 1, 1, 1, 1, 1, 1]}\n',
    "yaml": """users:
  - name: Alice
    active: true
    role: admin
  - name: Bob
    active: true
    role: admin
  - name: Carol
    active: true
    role: admin
""",
    "markdown table": """| Name | Age | City | Team | Role | Level |
|------|-----|------|------|------|-------|
|---|---|---|---|---|---|
| Alice | 30 | Paris | Red | Lead | 3 |
| Bob | 30 | Paris | Red | Lead | 3 |
| Carol | 30 | Paris | Red | Lead | 3 |
""",
    "python": """def main():
    print("Starting the job")
    for item in items:
        print("-" * 20)
        print("Item:", item)
        print("-" * 20)
    if not items:
        raise ValueError("no items given")
    if len(items) > 100:
        raise ValueError("no items given")
    count += 1
    count += 1
    return count
""",
    "c loops": """for (int i = 0; i < n; i++) {
    a[i] = 0;
}
for (int i = 0; i < n; i++) {
    b[i] = 1;
}
for (int i = 0; i < n; i++) {
    c[i] = a[i] + b[i];
}
""",
    "recipe": """1. Put the flour in a big bowl and stir well.
2. Add the milk and stir well.
3. Stir well.
4. Add the eggs and stir well.
5. Stir well.
6. Add the sugar and stir well.
""",
    "song with a chorus": """Verse 1:
The sun comes up over the hill,
The birds all sing, the world is still.

Chorus:
We sing, we dance, we run all day,
We laugh and play the happy way.

Verse 2:
The moon comes out, the stars are bright,
We hold our hands and say good night.

Chorus:
We sing, we dance, we run all day,
We laugh and play the happy way.
""",
    "list": "- apples\n- pears\n- apples\n- milk\n- apples\n- bread\n",
    "numbers and rules": "The prize was 1,000,000,000 coins.\n\nTitle\n=====\n\nMore text follows here.\n----------\n",
    "emphasis": "She was very, very, very happy. It was a big, big, big day.\n",
}

LOOPS = {
    "a word phrase": "They said they would be friends forever and ever and ever and ever and ever and ever.",
    "a sentence over and over": "I'm glad you're sharing your expertise. I'm glad you're sharing your expertise. "
    "I'm glad you're sharing your expertise. I'm glad you're sharing your expertise.",
    "a poem cycling two lines": "A season to cherish, a time to forget,\nA moment to treasure, a love to regret,\n"
    "A season to cherish, a time to forget,\nA moment to treasure, a love to regret,\n",
    "one line three times": "The cat sat on the big red mat.\nThe cat sat on the big red mat.\n"
    "The cat sat on the big red mat.\n",
    "a json object three times": '[\n  {"name": "Alice", "active": true},\n  {"name": "Alice", "active": true},\n'
    '  {"name": "Alice", "active": true},\n',
    "runaway symbols": "[" + ", ".join(["0"] * 60) + "]",
}


@pytest.fixture(scope="module")
def classes(story_tokenizer):
    return newline_token_ids(story_tokenizer), word_token_ids(story_tokenizer)


def loops_in(tokenizer, classes, text: str, settings: LoopDetection | None = None) -> list[str]:
    """The loops the default rule finds while the text is generated token by token (after a short prompt);
    a found loop is kept (not rewound), as when the rule's budget is spent."""
    newlines, words = classes
    rule = LoopRule(settings or LoopDetection(), newlines, words)
    # One encode of prompt and text, so that the text's first line is spelled like the lines after it.
    prompt = len(tokenizer.encode("Here it is:", add_special_tokens=False))
    ids = tokenizer.encode("Here it is:\n" + text, add_special_tokens=False)
    rule.start(1, prompt)
    found = []
    for n in range(prompt + 1, len(ids) + 1):
        request = rule.check(RowView(0, ids[:n], prompt, 0))
        if request is not None:
            found.append(f"{request.detail} at {tokenizer.decode(ids[request.position : n])!r}")
    return found


@pytest.mark.parametrize("name", sorted(LEGITIMATE))
def test_legitimate_repetitive_text_is_never_rewound(story_tokenizer, classes, name):
    assert loops_in(story_tokenizer, classes, LEGITIMATE[name]) == []


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_degenerate_repetition_is_rewound(story_tokenizer, classes, name):
    assert loops_in(story_tokenizer, classes, LOOPS[name]) != []


def test_a_loop_is_cut_where_the_repeat_begins(story_tokenizer, classes):
    newlines, words = classes
    text = LOOPS["a poem cycling two lines"]
    ids = story_tokenizer.encode("Here:\n" + text, add_special_tokens=False)
    rule = LoopRule(LoopDetection(), newlines, words)
    rule.start(1, 2)
    requests = [rule.check(RowView(0, ids[:n], 2, 0)) for n in range(3, len(ids) + 1)]
    request = next(r for r in requests if r is not None)
    kept = story_tokenizer.decode(ids[: request.position])
    assert kept.endswith("a love to regret,\n") and kept.count("A season") == 1  # the first copy stays
    assert request.detail.startswith("line loop")


@settings(max_examples=150, deadline=None)
@given(
    ids=st.lists(st.integers(0, 11), min_size=1, max_size=60),
    begin=st.integers(0, 5),
    min_repeats=st.integers(2, 4),
    min_loop_tokens=st.integers(1, 10),
    cuts=st.lists(st.integers(1, 60), max_size=4),
    seed=st.integers(0, 1000),
    vocab=st.sampled_from([4, 12]),
)
def test_tracker_finds_the_token_loops_find_token_loop_finds(
    ids, begin, min_repeats, min_loop_tokens, cuts, seed, vocab
):
    """Without token classes the incremental tracker reports exactly what find_token_loop reports after every
    token, through random rewinds (with 12 token ids, many tokens were last written more than max_span back)."""
    ids = [i % vocab for i in ids]
    begin = min(begin, len(ids) - 1)
    tracker = LoopTracker(max_span=8, min_repeats=min_repeats, min_loop_tokens=min_loop_tokens, line_repeats=0)
    tracker.start(ids[:begin], begin)
    rng = random.Random(seed)
    row = ids[:begin]
    cut_at = {rng.randrange(begin, len(ids) + 1): c for c in cuts}
    for n in range(begin, len(ids)):
        cut = n in cut_at and len(row) > begin
        if cut:
            row = row[: max(begin, len(row) - cut_at[n])]
            tracker.rewind(len(row))
        row.append(ids[n])
        got = tracker.push(ids[n])
        want = find_token_loop(row, begin, 1, 8, min_repeats, min_loop_tokens)
        if tracker.looping and got is None and want is not None:
            continue  # a loop kept across a rewind: the tracker reported it before the cut
        if cut and got is not None and want is None:
            # A loop still in the kept text: the tracker starts afresh at a cut and reports it again, while
            # find_token_loop reports a loop only at the token that first completes it. It is a real repeat.
            assert row[got.first : got.start] == row[got.start : got.start + got.span], (row, begin)
            continue
        assert got == want, (row, begin)


@pytest.mark.parametrize("kept_by", ["start", "rewind"])
def test_copies_written_before_a_start_or_a_rewind_still_count(kept_by):
    """The tracker's shortcut for a token whose pair with the token before was not written lately must know the
    pairs of the text it was started on and of what a rewind kept: there the third "1" completes the loop."""
    tracker = LoopTracker(max_span=8, min_repeats=3, min_loop_tokens=3, line_repeats=0)
    if kept_by == "start":
        tracker.start([5, 1, 1], 1)
    else:
        tracker.start([5], 1)
        assert [tracker.push(t) for t in [1, 1, 7]] == [None, None, None]
        tracker.rewind(3)
    assert tracker.push(1) == LoopMatch(start=2, first=1, span=1, repeats=3, kind="token")


def _loop_by_definition(tracker: LoopTracker, row: list[int], begin: int) -> tuple[int, int]:
    """(span, run) of the token loop the newest token of ``row`` ends, by LoopTracker's definition, counted from
    scratch: for each span p (shortest first), the newest tokens equal to the token p before them; (0, 0) if
    none."""
    n = len(row)
    for p in range(tracker.min_span, min(tracker.max_span, n - 1 - begin) + 1):
        run = 0
        while n - 1 - run - p >= begin and row[n - 1 - run] == row[n - 1 - run - p]:
            run += 1
        need = p * max(tracker.min_repeats, -(-tracker.min_loop_tokens // p))
        if run < need - p:
            continue
        span = row[n - p :]
        plain = any(t in {0, 1} for t in span) and 2 not in span  # a word, and no line end
        if plain or p + run >= max(need, tracker.symbol_loop_tokens):
            return p, run
    return 0, 0


@settings(max_examples=150, deadline=None)
@given(
    ids=st.lists(st.integers(0, 4), min_size=1, max_size=80),
    begin=st.integers(0, 5),
    min_span=st.integers(1, 3),
    min_repeats=st.integers(2, 4),
    min_loop_tokens=st.integers(1, 10),
    symbol_loop_tokens=st.integers(1, 20),
    cuts=st.lists(st.integers(1, 60), max_size=4),
    seed=st.integers(0, 1000),
)
def test_tracker_with_token_classes_follows_its_definition(
    ids, begin, min_span, min_repeats, min_loop_tokens, symbol_loop_tokens, cuts, seed
):
    """With word and line-end tokens (0-1 words, 2 a line end, 3-4 symbols), through random rewinds, the tracker
    reports a token loop exactly when counting the row from scratch finds one and the previous token did not."""
    begin = min(begin, len(ids) - 1)
    tracker = LoopTracker(
        min_span=min_span,
        max_span=6,
        min_repeats=min_repeats,
        min_loop_tokens=min_loop_tokens,
        symbol_loop_tokens=symbol_loop_tokens,
        line_repeats=0,
        newline_ids={2},
        word_ids={0, 1},
    )
    tracker.start(ids[:begin], begin)
    rng = random.Random(seed)
    row = ids[:begin]
    cut_at = {rng.randrange(begin, len(ids) + 1): c for c in cuts}
    looping = False
    for n in range(begin, len(ids)):
        if n in cut_at and len(row) > begin:
            row = row[: max(begin, len(row) - cut_at[n])]
            tracker.rewind(len(row))
            looping = False
        row.append(ids[n])
        got = tracker.push(ids[n])
        span, run = _loop_by_definition(tracker, row, begin)
        want = None
        if span and not looping:
            first = len(row) - span - run
            want = (first + span, first, span, (len(row) - first) // span)
        assert (None if got is None else (got.start, got.first, got.span, got.repeats)) == want, (row, begin)
        looping = bool(span)
