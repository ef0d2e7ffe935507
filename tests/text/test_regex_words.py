"""Regular expressions that are lists of whole words, matched by the phrase stream as string phrases."""

from __future__ import annotations

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_matcher import BYTE_LEVEL, SENTENCEPIECE, ids_of
from test_phrase_stream import replay

from perpetual_logits.text.endings import CHAT_CLOSING_PHRASES, default_end_phrases
from perpetual_logits.text.matcher import PhraseMatcher
from perpetual_logits.text.phrase_stream import PhraseIndex
from perpetual_logits.text.regex_words import regex_words


@pytest.mark.parametrize(
    ("pattern", "words", "ignore_case"),
    [
        (r"(?<!\w)best\s+regards(?!\w)", ["best regards"], False),
        (r"(?i)(?<!\w)(?:best|kind)\s+regards(?!\w)", ["best regards", "kind regards"], True),
        (r"(?<!\w)(?:i\s+)?hope(?!\w)", ["i hope", "hope"], False),
        (r"(?<!\w)don't\s+(go|stay)\!(?!\w)", ["don't go!", "don't stay!"], False),
        (r"(?<!\w)colou?r(?!\w)", ["colour", "color"], False),
        (r"(?<!\w)a(?:b|c(?:d|e))(?!\w)", ["ab", "acd", "ace"], False),
        (r"(?<!\w)(?:a|a)\s+b(?!\w)", ["a b"], False),
    ],
)
def test_a_word_list_pattern_gives_its_words(pattern, words, ignore_case):
    assert regex_words(regex.compile(pattern)) == (words, ignore_case)
    assert regex_words(regex.compile(pattern[4:] if ignore_case else pattern, regex.I if ignore_case else 0)) == (
        words,
        ignore_case,
    )


@pytest.mark.parametrize(
    "pattern",
    [
        r"best\s+regards",  # no word boundaries: it matches inside words
        r"(?<!\w)best\s+regards",
        r"best\s+regards(?!\w)",
        r"(?<!\w)best regards(?!\w)",  # a literal space is one space, not a run
        r"(?<!\w)best\sregards(?!\w)",  # \s: exactly one whitespace character
        r"(?<!\w)best\s*regards(?!\w)",
        r"(?<!\w)best\s+\s+regards(?!\w)",  # two runs in a row need two whitespace characters
        r"(?<!\w)(?:best\s+)?\s+regards(?!\w)",
        r"(?<!\w)(?:\s+best)(?!\w)",  # a run at an edge
        r"(?<!\w)chapter\s+\d+(?!\w)",
        r"(?<!\w)[bc]at(?!\w)",
        r"(?<!\w)b.t(?!\w)",
        r"(?<!\w)ba+(?!\w)",
        r"(?<!\w)ba{2}(?!\w)",
        r"(?<!\w)ba??(?!\w)",
        r"(?<!\w)a|b(?!\w)",  # the lookbehind would belong to the first alternative only
        r"(?<!\w)(?=a)a(?!\w)",
        r"(?<!\w)(a)\1(?!\w)",
        r"(?<!\w)!a(?!\w)",  # a non-word first character: the boundary before it is not a word boundary
        r"(?<!\w)(?:a|)(?!\w)",  # the empty word
        r"(?<!\w)a\nb(?!\w)",
        r"(?<!\w)(?:a|b|c|d)(?:a|b|c|d)(?:a|b|c|d)(?:a|b|c|d)(?:a|b|c|d)(?!\w)",  # 1,024 words: too many
    ],
)
def test_anything_wider_stays_a_regular_expression(pattern):
    assert regex_words(regex.compile(pattern)) is None


def test_flags_other_than_case_keep_a_regular_expression():
    assert regex_words(regex.compile(r"(?<!\w)a(?!\w)", regex.ASCII)) is None
    assert regex_words(regex.compile(r"(?<!\w)a(?!\w)", regex.V1)) is None


def test_the_chat_closings_are_matched_by_the_automaton(story_tokenizer):
    """Of the chat set's regular expressions only the two that read back over a sentence end stay regular
    expressions; the closings join the string phrases (folded: they ignore case)."""
    index = PhraseIndex(PhraseMatcher(default_end_phrases(story_tokenizer, chat=True), story_tokenizer))
    kept = [pattern.pattern for _, pattern in index.regexes]
    assert len(kept) == 2 and all("(?<=" in source for source in kept)
    assert sorted(group.fold for group in index.groups) == [False, True]
    words = sum(len(regex_words(p)[0]) for p in CHAT_CLOSING_PHRASES if not isinstance(p, str) and regex_words(p))
    assert words == len(next(group for group in index.groups if group.fold).automaton)


# -- the stream with such patterns against scan(), which runs the regular expressions themselves --------------
WORDS = ["a", "is", "si", "hi", "ab"]
word = st.sampled_from(WORDS)
group = st.lists(word, min_size=1, max_size=3, unique=True).map(lambda ws: "(?:" + "|".join(ws) + ")")
item = st.tuples(st.one_of(word, group), st.booleans()).map(lambda x: f"(?:{x[0]}\\s+)?" if x[1] else x[0])
# Items joined by runs of whitespace; an optional item carries its own run, so it is never last.
patterns = st.tuples(st.lists(item, min_size=1, max_size=3), word, st.booleans()).map(
    lambda x: (
        ("(?i)" if x[2] else "")
        + r"(?<!\w)"
        + "".join(i if i.endswith(")?") else i + r"\s+" for i in x[0])
        + x[1]
        + r"(?!\w)"
    )
)
# Text: those words' letters in both cases, whitespace, a full stop, and the two characters that the regex
# module's case-insensitive matching equates with an ASCII letter ("İ" = C4 B0 with "i", "ſ" = C5 BF with "s").
TEXT = [*b"aAbBhHiIsS .\n", *"İſ".encode()]
steps = st.lists(
    st.one_of(st.sampled_from(TEXT).map(lambda b: ("token", b)), st.integers(1, 4).map(lambda k: ("cut", k))),
    min_size=1,
    max_size=30,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pattern=patterns,
    tokenizer=st.sampled_from(["byte_level", "sentencepiece"]),
    prompt=st.lists(st.sampled_from(TEXT), max_size=3),
    steps=steps,
    final=st.booleans(),
)
def test_word_list_patterns_are_found_as_scan_finds_them(pattern, tokenizer, prompt, steps, final):
    r"""A whole-word pattern is matched as its words: every match and hold is scan()'s for those words as string
    phrases. (scan() of the pattern itself holds less where a shorter word is complete: "a " holds nothing for
    ``(?:a\s+)?a``, whose partial search reports the match "a" and not the "a a" that one more token may finish,
    which a rule must then rewind into the held text.)"""
    compiled = regex.compile(pattern)
    found = regex_words(compiled)
    assert found is not None
    tok = BYTE_LEVEL if tokenizer == "byte_level" else SENTENCEPIECE
    matcher = PhraseMatcher([compiled], tok)
    assert not PhraseIndex(matcher).regexes  # matched as strings
    words, ignore_case = found
    ids = ids_of(tok, prompt)
    replay(matcher, ids, len(ids), 0, steps, tok, final, scanned=PhraseMatcher(words, tok, not ignore_case))


@pytest.mark.parametrize("tokenizer", [BYTE_LEVEL, SENTENCEPIECE])
@pytest.mark.parametrize("text", ["thanks for a\u017fking.", "\u0130 hope it helps."])
def test_case_folding_equates_the_letters_the_regex_module_does(tokenizer, text):
    """A case-insensitive phrase matches "ſ" as "s" and "İ" as "i", as the regex module (and so scan()) does, both
    as a string phrase and as a regular expression of whole words."""
    phrases = ["thanks for asking", "i hope it helps"]
    as_regexes = [regex.compile(r"(?i)(?<!\w)" + p.replace(" ", r"\s+") + r"(?!\w)") for p in phrases]
    for matcher in (PhraseMatcher(phrases, tokenizer, case_sensitive=False), PhraseMatcher(as_regexes, tokenizer)):
        steps = [("token", byte) for byte in text.encode()]
        assert matcher.scan(ids_of(tokenizer, list(text.encode()))).match is not None
        replay(matcher, [], 0, 0, steps, tokenizer)
