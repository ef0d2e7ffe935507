"""The length mode (a minimum, then the model's own end) and the landing before ``max_new_tokens``.

Scripted runs use a tiny random Llama with TinyStories-656K's tokenizer and a processor that forces a token
script per row, so the boundary, the minimum and the cut are known exactly; TinyStories-656K itself checks the
landing on real text.
"""

from __future__ import annotations

import re
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LogitsProcessor
from transformers.generation.streamers import BaseStreamer

from perpetual_logits import BackstepConfig, Landing, make_perpetual
from perpetual_logits.backstep import landing
from perpetual_logits.backstep.landing import RowText
from perpetual_logits.protocol import RowView
from perpetual_logits.text import boundaries
from perpetual_logits.text.boundaries import _CLOSERS, _ENDERS, count_words, cut_point, ends_sentence, last_boundary
from perpetual_logits.text.text_stream import TokenTexts

EOS = 2


class Scripts(LogitsProcessor):
    """Forces ``scripts[row]`` while the row follows it and the token is allowed (then the row samples freely)."""

    def __init__(self, scripts: list[list[int]], prompt_length: int) -> None:
        self.scripts, self.prompt_length = scripts, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores.clone()
        for row, script in enumerate(self.scripts):
            generated = input_ids[row, self.prompt_length :].tolist()
            j = len(generated)
            if j < len(script) and generated == script[:j] and torch.isfinite(scores[row, script[j]]):
                out[row] = float("-inf")
                out[row, script[j]] = 0.0
        return out  # type: ignore[return-value]


class Collect(BaseStreamer):
    def __init__(self) -> None:
        self.puts: list[list[int]] = []

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def run(model, tokenizer, scripts, max_new_tokens, streamer=None, **config):
    prompt = tokenizer(["Once upon a time"] * len(scripts), return_tensors="pt").input_ids
    torch.manual_seed(0)
    out = model.generate(
        prompt,
        do_sample=True,
        top_k=0,
        max_new_tokens=max_new_tokens,
        logits_processor=[Scripts(scripts, prompt.shape[1])],
        backstep=BackstepConfig(**{"n_remove": 4, **config}),
        tokenizer=tokenizer,
        streamer=streamer,
        return_dict_in_generate=True,
    )
    return out, [row[prompt.shape[1] :].tolist() for row in out.sequences]


# -- words and boundaries ---------------------------------------------------------------------------------------
def test_words_are_counted_like_longbench_write() -> None:
    assert count_words("Hello, world! It's 3 o'clock.") == 6
    assert count_words("我爱你 and you") == 5
    with pytest.raises(TypeError, match="text"):
        count_words(None)  # type: ignore[arg-type]


def test_cut_point_finds_the_sentence_end_inside_a_sentencepiece_token(story_tokenizer) -> None:
    ids = ids_of(story_tokenizer, "They were happy. The big dog ran to the park and played with the ball")
    length, extra = cut_point(story_tokenizer, ids, 0)
    assert story_tokenizer.decode(ids[:length] + extra) == "They were happy."
    with pytest.raises(ValueError, match="floor"):
        cut_point(story_tokenizer, ids, len(ids) + 1)


# -- the landing at max_new_tokens ------------------------------------------------------------------------------
def test_a_row_at_the_limit_is_cut_back_to_its_last_sentence(scripted_model, story_tokenizer) -> None:
    script = ids_of(story_tokenizer, "They were happy. The big dog ran to the park and played with the ball")
    out, (generated,) = run(scripted_model, story_tokenizer, [script], len(script), landing=Landing(margin=8))
    assert story_tokenizer.decode(generated, skip_special_tokens=True) == "They were happy."
    assert out.backstep_stats.landing_cuts == 1
    # without the landing the row is returned as the budget left it
    _, (plain,) = run(scripted_model, story_tokenizer, [script], len(script))
    assert plain == script


def test_an_unfinished_end_marker_is_dropped_at_the_limit_in_every_mode(scripted_model, story_tokenizer) -> None:
    script = [*ids_of(story_tokenizer, "They were happy."), 208, 183, 209]  # "<|", "end", "_story"
    _, (generated,) = run(scripted_model, story_tokenizer, [script], len(script), end_phrases="default")
    assert story_tokenizer.decode(generated, skip_special_tokens=True) == "They were happy."


def test_eos_at_a_sentence_end_near_the_limit_is_accepted_elsewhere_rewound(scripted_model, story_tokenizer) -> None:
    happy = ids_of(story_tokenizer, "The dog ran to the park. They were happy.")
    ran = ids_of(story_tokenizer, "The dog ran to the park. The dog ran")
    # EOS right after a sentence end inside the landing margin: the row ends there, with the EOS
    budget = len(happy) + 2
    out, (generated,) = run(scripted_model, story_tokenizer, [[*happy, EOS]], budget, landing=Landing(margin=8))
    assert generated[: len(happy) + 1] == [*happy, EOS] and not out.backstep_events[0]
    # mid-sentence inside the margin: rewound as usual
    out, _ = run(scripted_model, story_tokenizer, [[*ran, EOS]], len(ran) + 2, landing=Landing(margin=8))
    assert [e.reason for e in out.backstep_events[0]][:1] == ["eos"]
    # the same EOS well before the last quarter of a larger budget: rewound (the margin is capped by the budget)
    out, _ = run(scripted_model, story_tokenizer, [[*happy, EOS]], 4 * budget, landing=Landing(margin=64))
    assert [e.reason for e in out.backstep_events[0]][:1] == ["eos"]


def test_streaming_never_shows_text_that_is_cut_back(scripted_model, story_tokenizer) -> None:
    script = ids_of(
        story_tokenizer,
        "They were happy. The big dog ran to the park and played with the ball and the cat and the bird and the "
        "boy and the girl and the tree and the sun and the moon and the",
    )
    streamer = Collect()
    _, (generated,) = run(scripted_model, story_tokenizer, [script], len(script), streamer=streamer, landing=True)
    streamed = [t for put in streamer.puts[1:] for t in put]  # the first put is the prompt
    assert streamed == generated
    assert story_tokenizer.decode(generated) == "They were happy."


# -- the length mode ------------------------------------------------------------------------------------------
def test_the_minimum_is_per_row_in_a_batch(scripted_model, story_tokenizer) -> None:
    long = ids_of(story_tokenizer, "They were happy and the big dog ran to the park.")
    short = ids_of(story_tokenizer, "They were happy")
    assert len(short) < 8 <= len(long)
    out, (first, second) = run(
        scripted_model, story_tokenizer, [[*long, EOS], [*short, EOS]], 40, min_tokens=8, ban_rewound_token=True
    )
    assert first[: len(long) + 1] == [*long, EOS]  # past its minimum: its own EOS is accepted, no rewind
    assert not out.backstep_events[0]
    assert out.backstep_events[1][0].reason == "eos"  # before its minimum: rewound
    kept = second[: second.index(EOS)] if EOS in second else second
    assert len(kept) >= 8


def test_min_words_counts_words_of_the_text(scripted_model, story_tokenizer) -> None:
    text = ids_of(story_tokenizer, "They were happy and the big dog ran.")  # 8 words
    out, (generated,) = run(scripted_model, story_tokenizer, [[*text, EOS]], 30, min_words=8)
    assert generated == [*text, EOS]
    # past the minimum, an EOS mid-sentence is a fragment: rewound
    out, _ = run(scripted_model, story_tokenizer, [[*text[:-1], EOS]], 30, min_words=7)
    assert out.backstep_events[0][0].reason == "eos"
    out, _ = run(scripted_model, story_tokenizer, [[*text, EOS]], 30, min_words=9)
    assert out.backstep_events[0][0].reason == "eos"


def test_length_mode_settings_are_validated() -> None:
    assert isinstance(BackstepConfig(min_words=100).landing, Landing)  # on in the length mode
    assert BackstepConfig().landing is False and BackstepConfig(min_words=100, landing=False).landing is False
    assert isinstance(BackstepConfig.chat().landing, Landing)
    with pytest.raises(ValueError, match="min_tokens"):
        BackstepConfig(min_tokens=-1)
    with pytest.raises(ValueError, match="accept_end_phrases"):
        BackstepConfig(accept_end_phrases=True)
    with pytest.raises(ValueError, match="landing"):
        BackstepConfig(landing="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="strength"):
        Landing(strength=-1.0)


# -- TinyStories-656K -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tinystories_rows_at_the_limit_end_at_a_sentence_with_no_partial_marker(tinystories) -> None:
    model, tokenizer = tinystories
    make_perpetual(model)
    enc = tokenizer(["Once upon a time"] * 12, return_tensors="pt")
    torch.manual_seed(0)
    config = BackstepConfig.method4(10, end_phrases="default", landing=True)
    out = model.generate(
        **enc, do_sample=True, max_new_tokens=200, backstep=config, tokenizer=tokenizer, return_dict_in_generate=True
    )
    texts = tokenizer.batch_decode(out.sequences[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    assert out.backstep_stats.landing_cuts >= 1, "some rows reached the limit"
    for text in texts:
        assert ends_sentence(text), text  # neither mid-word nor mid-sentence
        assert not any(text.rstrip().endswith(p) for p in ("<|", "<|end", "<|end_story", "<|end_story|")), text


# -- the row's text, token by token ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_pieces(story_tokenizer) -> list[int]:
    """Token ids of the TinyStories vocabulary that are not byte-fallback pieces (``<0x..>``)."""
    return [
        i
        for i in range(3, len(story_tokenizer))
        if not re.fullmatch(r"<0x..>", story_tokenizer.convert_ids_to_tokens(i))
    ]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_words_and_the_minimum_follow_the_decoded_text_through_rewinds(data, story_tokenizer, text_pieces) -> None:
    """RowText counts words one token at a time (a cached piece per token pair); the count and the point where
    the minimum is reached equal counting the whole decoded text, through rewinds."""
    prompt = ids_of(story_tokenizer, "Once upon a time")
    minimum = data.draw(st.integers(1, 12), label="min_words")
    text = RowText(story_tokenizer, 0, minimum, None)
    text.start_rows([len(prompt)])
    ids = list(prompt)
    reached_at = None
    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        if len(ids) > len(prompt) and data.draw(st.booleans(), label="rewind"):
            length = data.draw(st.integers(len(prompt), len(ids) - 1), label="to")
            del ids[length:]
            text.rewind(0, length)
            reached_at = reached_at if reached_at is not None and reached_at <= length else None
        ids.append(data.draw(st.sampled_from(text_pieces), label="token"))
        just = text.observe(RowView(0, ids, len(prompt), 0))
        words = count_words(story_tokenizer.decode(ids[len(prompt) :], skip_special_tokens=True))
        assert text.words(0) == words
        if reached_at is None and words >= minimum and 2 * (len(ids) - len(prompt)) >= minimum:
            reached_at = len(ids)
            assert just
        assert text.minimum_reached(0) == (reached_at is not None)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_a_cut_never_makes_a_row_longer_than_it_was(data, story_tokenizer, text_pieces) -> None:
    """A sentence end inside the last tokens is spelled anew only with as many tokens as were cut: a row cut at
    ``max_new_tokens`` never comes back longer (a bug seen in a batch of 32: 97 kept + 3 spelled tokens)."""
    # found by a search: "...advente. He " was cut before ".▁He▁" and "." spelled with two tokens (7 > 6)
    found = [978, 144, 186, 1393, 1554, 619]
    length, extra = cut_point(story_tokenizer, found, 0)
    assert length + len(extra) <= len(found) and ends_sentence(story_tokenizer.decode(found[:length] + extra))
    ids = data.draw(st.lists(st.sampled_from(text_pieces), min_size=1, max_size=12), label="ids")
    floor = data.draw(st.integers(0, len(ids)), label="floor")
    length, extra = cut_point(story_tokenizer, ids, floor)
    assert floor <= length <= len(ids) and length + len(extra) <= len(ids)


@pytest.mark.parametrize("eos_ids", [[EOS], [EOS, 5]])
def test_the_landing_bias_raises_eos_for_rows_at_a_sentence_end_past_their_due_point(story_tokenizer, eos_ids) -> None:
    """Three rows, 20 new tokens after a 1-token prompt, margin 8 (capped to a quarter of the budget: 5): the
    bonus starts 5 tokens before the limit and rises to its strength over them, only where the text ends a
    sentence, on every EOS id (one id is one column, several an index); the input is untouched."""
    from perpetual_logits.backstep.landing import LandingBias

    text = RowText(story_tokenizer, 0, 0, Landing(margin=8, strength=2.0))
    text.start_rows([1, 1, 1], limits=[21, 21, 21])
    words = ids_of(story_tokenizer, " the dog ran to the big park and the cat sat on the red mat all day")
    rows = [
        [*words[:14], *ids_of(story_tokenizer, ".")],  # ends a sentence, past the due point (13)
        words[:15],  # past the due point, mid-sentence
        [*words[:5], *ids_of(story_tokenizer, ".")],  # a sentence end before the due point
    ]
    for row, generated in enumerate(rows):
        ids = [1]
        for token in generated:
            ids.append(token)
            text.observe(RowView(row, list(ids), 1, 0))
    scores = torch.zeros(3, len(story_tokenizer))
    longest = max(text.length(row) for row in range(3))  # the rows as processors see them: right-aligned
    bias = LandingBias(text, eos_ids)
    out = bias(torch.zeros(3, longest, dtype=torch.long), scores)
    assert out is not scores and not scores.any()
    # Before any row can be due, the bias returns the scores as they are, without looking at the rows.
    assert bias(torch.zeros(3, text.due(0) - 1, dtype=torch.long), scores) is scores
    length, due = text.length(0), text.due(0)
    assert due == 21 - 5 and length >= due
    expected = 2.0 * min(1.0, (length - due + 1) / 5)
    assert out[0, eos_ids].tolist() == pytest.approx([expected] * len(eos_ids))
    assert out[0].count_nonzero() == len(eos_ids) and not out[1:].any()


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_the_cut_from_the_tracked_sentence_ends_equals_the_search_back(data, story_tokenizer, text_pieces) -> None:
    """The landing's cut starts from the sentence ends its RowText kept (two decodes each instead of one per
    token back): the same cut as the search back token by token, for any text and floor."""
    ends = st.sampled_from(ids_of(story_tokenizer, '. ! ? .\n The "Yes!" he said.'))  # sentence ends, often
    prompt = ids_of(story_tokenizer, "Once upon a time")
    generated = st.lists(st.one_of(st.sampled_from(text_pieces), ends), min_size=1, max_size=24)
    ids = [*prompt, *data.draw(generated, label="generated")]
    text = RowText(story_tokenizer, 0, 0, Landing())
    text.start_rows([len(prompt)], limits=[len(ids)])
    for n in range(len(prompt) + 1, len(ids) + 1):
        text.observe(RowView(0, ids[:n], len(prompt), 0))
    floor = data.draw(st.integers(len(prompt), len(ids)), label="floor")
    searched = cut_point(story_tokenizer, ids, floor, len(prompt))
    assert cut_point(story_tokenizer, ids, floor, len(prompt), ends=text.boundaries[0]) == searched


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_a_cut_judged_on_the_last_few_tokens_equals_one_judged_on_all_of_them(
    data, story_tokenizer, text_pieces
) -> None:
    """cut_point judges each point on the few tokens before it (``boundaries._CONTEXT``), not on every token from
    the floor back: the same cut as with the whole window, for any text, floor and kept ends -- byte-fallback
    pieces (a window could begin inside a character), ``<unk>``/``<s>``/``</s>`` and "…" included."""
    ends = st.sampled_from(ids_of(story_tokenizer, '. ! ? .\n The "Yes!" he said. Wait… '))
    anything = st.one_of(st.integers(0, len(story_tokenizer) - 1), st.sampled_from([0, 1, 2]))
    prompt = ids_of(story_tokenizer, "Once upon a time")
    generated = st.lists(st.one_of(st.sampled_from(text_pieces), ends, anything), min_size=12, max_size=60)
    ids = [*prompt, *data.draw(generated, label="generated")]
    text = RowText(story_tokenizer, 0, 0, Landing())
    text.start_rows([len(prompt)], limits=[len(ids)])
    for n in range(len(prompt) + 1, len(ids) + 1):
        text.observe(RowView(0, ids[:n], len(prompt), 0))
    # often from the prompt on: the windows are then shorter than the text before them
    floor = data.draw(st.one_of(st.just(len(prompt)), st.integers(len(prompt), len(ids))), label="floor")
    for kept in (text.boundaries[0], None):
        judged = cut_point(story_tokenizer, ids, floor, len(prompt), ends=kept)
        with mock.patch.object(boundaries, "_CONTEXT", len(ids) + 1):
            assert cut_point(story_tokenizer, ids, floor, len(prompt), ends=kept) == judged


def test_the_cut_decodes_only_the_last_few_tokens_before_each_point_it_judges(story_tokenizer) -> None:
    """A row at its limit 30 tokens after its last sentence end, with everything since the prompt held: the cut
    there decodes at most ``_CONTEXT + 1`` tokens at a time (it used to decode from the floor on, every time)."""
    prompt = ids_of(story_tokenizer, "Once upon a time")
    words = ids_of(story_tokenizer, " the dog ran to the big park and the cat sat on the red mat all day long")
    ids = [*prompt, *words, *ids_of(story_tokenizer, " It was fun."), *words, *words]
    text = RowText(story_tokenizer, 0, 0, Landing())
    text.start_rows([len(prompt)], limits=[len(ids)])
    for n in range(len(prompt) + 1, len(ids) + 1):
        text.observe(RowView(0, ids[:n], len(prompt), 0))
    decoded: list[int] = []
    real = boundaries._decode

    def counting(tokenizer, tokens):
        decoded.append(len(tokens))
        return real(tokenizer, tokens)

    with mock.patch.object(boundaries, "_decode", counting):
        length, extra = cut_point(story_tokenizer, ids, len(prompt), len(prompt), ends=text.boundaries[0])
    assert story_tokenizer.decode(ids[len(prompt) : length] + extra).endswith("It was fun.")
    assert decoded and max(decoded) <= boundaries._CONTEXT + 1


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_rowtext_reads_a_pair_as_its_own_decode_would(data, story_tokenizer) -> None:
    """RowText takes a pair's text from the tokenizer's shared pair texts (decoded once for the phrase rules'
    streams too) unless a special token is involved: the piece is what decoding the pair with special tokens
    skipped adds after the neighbour -- for any pair, byte-fallback pieces and special tokens included."""
    token = st.integers(0, len(story_tokenizer) - 1)
    neighbour, last = data.draw(token, label="neighbour"), data.draw(token, label="token")
    text = RowText(story_tokenizer, 0, 0, Landing())
    piece = text._learn(neighbour << 32 | last)[0]
    before = story_tokenizer.decode([neighbour], skip_special_tokens=True)
    after = story_tokenizer.decode([neighbour, last], skip_special_tokens=True)
    assert piece == (after[len(before) :] if after.startswith(before) else after[-1:])
    special = set(story_tokenizer.all_special_ids)
    texts = TokenTexts.of(story_tokenizer)
    if neighbour not in special and last not in special and texts.relative(neighbour, [last]) is not None:
        assert texts.known(neighbour, last) == piece  # shared: the streams read it without a decode


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_rowtext_follows_the_decoded_text_token_by_token(data, story_tokenizer, text_pieces) -> None:
    """Whichever way RowText got a token's text -- per pair, or per token after any neighbour that reads alone,
    learned from other rows -- its text's end is always the decoded text's end."""
    prompt = ids_of(story_tokenizer, "Once upon a time")
    special = st.sampled_from(sorted(story_tokenizer.all_special_ids))
    for _ in range(2):  # the second row reads what the first taught
        ids = [*prompt, *data.draw(st.lists(st.one_of(st.sampled_from(text_pieces), special), max_size=30))]
        text = RowText(story_tokenizer, 0, 0, Landing())
        text.start_rows([len(prompt)], limits=[len(ids) + 1])
        for n in range(len(prompt) + 1, len(ids) + 1):
            text.observe(RowView(0, ids[:n], len(prompt), 0))
            decoded = story_tokenizer.decode(ids[len(prompt) : n], skip_special_tokens=True)
            assert "".join(text.pieces(ids[:n], len(prompt))) == decoded, (decoded, ids[:n])
            assert _end_of(text) == _end_by_definition(decoded), (decoded, ids[:n])


def test_a_token_after_a_skipped_special_token_follows_the_text_before_it(story_tokenizer) -> None:
    """Found by the property test above: "\\n", <unk>, "▁again" reads "\\n again" (the <unk> is skipped); RowText
    read "again" after the <unk> as if it began the text and dropped its space."""
    prompt = ids_of(story_tokenizer, "Once upon a time")
    ids = [*prompt, 3, story_tokenizer.unk_token_id, *ids_of(story_tokenizer, " again")]
    text = RowText(story_tokenizer, 0, 0, Landing())
    text.start_rows([len(prompt)], limits=[len(ids) + 1])
    for n in range(len(prompt) + 1, len(ids) + 1):
        text.observe(RowView(0, ids[:n], len(prompt), 0))
    decoded = story_tokenizer.decode(ids[len(prompt) :], skip_special_tokens=True)
    assert "".join(text.pieces(ids, len(prompt))) == decoded
    assert text.words(0) == count_words(decoded) and _end_of(text) == _end_by_definition(decoded)


def _end_of(text: RowText, row: int = 0) -> tuple[bool, bool, bool]:
    """Row ``row``'s end as RowText keeps it: (ends a sentence, punctuation not yet confirmed, last character an
    ASCII letter)."""
    state = text.states[row][-1] if text.states[row] else 0
    return text.at_sentence_end(row), state & 3 == landing._PENDING, bool(state & landing._LAST_LETTER)


def _end_by_definition(decoded: str) -> tuple[bool, bool, bool]:
    """The same, from the whole decoded text: punctuation is pending when nothing but closers follows it."""
    pending = decoded.rstrip(_CLOSERS)[-1:] in _ENDERS
    return ends_sentence(decoded), pending, decoded[-1:].isascii() and decoded[-1:].isalpha()


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_the_end_of_the_text_is_read_exactly_through_spaces_closers_and_rewinds(data, story_tokenizer) -> None:
    """RowText keeps how the text ends as one of three states per token, not the text: after every token, through
    rewinds, that state, the words and the sentence ends it marked are those of the whole decoded text -- also
    after runs of spaces, closing quotes and line ends longer than any fixed window of characters."""
    prompt = ids_of(story_tokenizer, "Once upon a time")
    pieces = ['"', "'", ")", " ", "  ", ".", "!", "?", "\n", ' "', '." ', "!)", " he", "said", " Tom", "3.5", "x"]
    token = st.sampled_from(sorted({t for p in pieces for t in ids_of(story_tokenizer, p)}))
    text = RowText(story_tokenizer, 0, 0, Landing())
    text.start_rows([len(prompt)], limits=[len(prompt) + 200])
    ids = list(prompt)
    for _ in range(data.draw(st.integers(1, 60), label="steps")):
        if len(ids) > len(prompt) and data.draw(st.integers(0, 9), label="rewind?") == 0:
            length = data.draw(st.integers(len(prompt), len(ids) - 1), label="to")
            del ids[length:]
            text.rewind(0, length)
        ids.append(data.draw(token, label="token"))
        text.observe(RowView(0, ids, len(prompt), 0))
        decoded = story_tokenizer.decode(ids[len(prompt) :], skip_special_tokens=True)
        assert _end_of(text) == _end_by_definition(decoded), (decoded, ids)
        assert text.words(0) == count_words(decoded), (decoded, ids)
        # Every sentence end marked lies where the text up to it ends a sentence followed by whitespace or ends a
        # line, or inside the token after it (the cut spells that token's head anew).
        for end in text.boundaries[0]:
            before = story_tokenizer.decode(ids[len(prompt) : end], skip_special_tokens=True)
            through = story_tokenizer.decode(ids[len(prompt) : end + 1], skip_special_tokens=True)
            confirmed = ends_sentence(before) and (
                before.rstrip(" \t").endswith("\n") or decoded[len(before.rstrip(" \t")) :][:1].isspace()
            )
            assert confirmed or last_boundary(through) > len(before), (decoded, end)


def test_a_sentence_end_confirmed_by_a_rewound_token_is_forgotten(story_tokenizer) -> None:
    """Found by the property test above: '."▁' after "He said" marks a sentence end before it (the end is inside
    its text). Rewound, that token took the end with it, but RowText kept it, so the hold-back let "He said" go
    to the streamer as a finished sentence, and a cut at the limit could no longer reach the real last one."""
    prompt = ids_of(story_tokenizer, "Once upon a time")
    said = [*prompt, *ids_of(story_tokenizer, " He said")]
    end = story_tokenizer.convert_tokens_to_ids('."▁')
    text = RowText(story_tokenizer, 0, 0, Landing())
    text.start_rows([len(prompt)], limits=[len(prompt) + 200])
    for n in range(len(prompt) + 1, len(said) + 1):
        text.observe(RowView(0, said[:n], len(prompt), 0))
    text.observe(RowView(0, [*said, end], len(prompt), 0))
    assert text.boundaries[0] and text.held(0) == 0  # ends with a confirmed sentence end
    text.rewind(0, len(said))
    ids = [*said, *ids_of(story_tokenizer, " and")]
    for n in range(len(said) + 1, len(ids) + 1):
        text.observe(RowView(0, ids[:n], len(prompt), 0))
    assert text.boundaries[0] == [] and text.held(0) == len(ids) - len(prompt)
