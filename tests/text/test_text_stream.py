"""TextStream: tokens whose text is added later (defer_plain) read exactly as tokens pushed one by one."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perpetual_logits.text.text_stream import TextStream, TokenTexts


def _state(stream: TextStream) -> tuple:
    stream.catch_up()
    return (
        stream.base,
        stream.tokens,
        stream.ends,
        stream.own,
        stream.char_base,
        stream.text,
        stream.pending,
        stream.head_end,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), forget=st.booleans())
def test_deferred_tokens_read_as_pushed_ones(story_tokenizer, seed, forget):
    """Random rows of TinyStories-656K's vocabulary (mostly the pieces of a story, some random ids: byte-fallback
    pieces, special tokens) with cuts now and then: a stream that defers every plain token it may (a plain token
    after a plain last token) holds, once caught up, what a stream that pushes every token holds -- also when the
    shared texts were forgotten in between."""
    rng = random.Random(seed)
    texts = TokenTexts.of(story_tokenizer)
    story = story_tokenizer.encode("Once upon a time, a happy dog played. The End!\n", add_special_tokens=False)
    for token in story:  # the story's pieces are known: most of its tokens are deferred
        texts.lead(token)
    deferring, pushing = TextStream(story_tokenizer, keep_chars=24), TextStream(story_tokenizer, keep_chars=24)
    ids = story[:2]
    deferring.reset(ids, 0)
    pushing.reset(ids, 0)
    deferred = 0
    for _ in range(200):
        roll = rng.random()
        if roll < 0.08:
            cut = max(1, len(ids) - rng.randint(1, 6))
            ids = ids[:cut]
            for stream in (deferring, pushing):
                if not stream.truncate(cut):
                    stream.reset(ids, 0)
        elif roll < 0.1 and forget:
            texts.forget()
        else:
            token = rng.choice(story) if roll < 0.9 else rng.randrange(len(story_tokenizer))
            ids.append(token)
            pushing.push(token)
            if deferring.plain_tail and texts.reads_alone(token) and texts.local:
                deferring.defer_plain(token)
                deferred += 1
            else:
                deferring.push(token)
        assert deferring.length == pushing.length
        if rng.random() < 0.3:  # read now and then: every reader catches up first
            assert _state(deferring) == _state(pushing), story_tokenizer.decode(ids)
    assert _state(deferring) == _state(pushing)
    assert deferred > 50  # the deferring stream did defer


def test_every_reader_catches_up(story_tokenizer):
    """end, cut, chars, push, push_plain, truncate and finish each see the deferred tokens' text."""
    ids = story_tokenizer.encode("Once upon a time there was a dog", add_special_tokens=False)
    texts = TokenTexts.of(story_tokenizer)
    for token in ids:
        texts.lead(token)
    pushed = TextStream(story_tokenizer, keep_chars=64)
    pushed.reset(ids, 0)
    whole = pushed.text

    def deferring() -> TextStream:
        stream = TextStream(story_tokenizer, keep_chars=64)
        stream.reset(ids[:3], 0)  # "▁", "On" (after a space-only piece: not plain), "ce▁"
        for token in ids[3:]:
            assert stream.plain_tail and texts.reads_alone(token)
            stream.defer_plain(token)
        assert stream.deferred == len(ids) - 3 and len(stream.text) < len(whole)
        return stream

    assert deferring().end == pushed.end
    assert deferring().cut(len(whole) - 1) == pushed.cut(len(whole) - 1)
    assert deferring().chars(len(ids) - 1) == pushed.chars(len(ids) - 1)
    for read in (
        lambda s: s.push(ids[-1]),
        lambda s: s.push_plain(ids[-1]),
        lambda s: s.truncate(len(ids) - 1),
        lambda s: s.finish(),
    ):
        stream = deferring()
        read(stream)
        assert stream.deferred == 0 and stream.text.startswith(whole[: pushed.chars(len(ids) - 1)])


@pytest.mark.parametrize("token_text", ["<0x41>"])
def test_a_byte_piece_is_never_a_plain_tail(story_tokenizer, token_text):
    """A byte-fallback piece reads differently after different neighbours: after one, nothing may be deferred."""
    byte = story_tokenizer.convert_tokens_to_ids(token_text)
    ids = story_tokenizer.encode("Once upon", add_special_tokens=False)
    stream = TextStream(story_tokenizer, keep_chars=64)
    stream.reset(ids, 0)
    stream.push(byte)
    assert not stream.plain_tail
