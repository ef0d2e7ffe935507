"""PhraseStream (incremental matching) against PhraseMatcher.scan (the reference), and TextStream's rewinds."""

from __future__ import annotations

import importlib
import random

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import source_module
from test_matcher import BYTE_LEVEL, PIECES, SENTENCEPIECE, ids_of

from perpetual_logits.text.endings import CHAT_CLOSING_PHRASES, default_end_phrases
from perpetual_logits.text.matcher import PhraseMatch, PhraseMatcher, PhraseScan
from perpetual_logits.text.phrase_stream import PhraseIndex, PhraseStream

STRINGS = ["The End", "<|end_story|>", "the end", "Fin", "End", "e E", "Once upon", "x x", "!"]
REGEXES = [regex.compile(r"Chapter \d+"), regex.compile(r"(?i)(?<!\w)hello(?!\w)"), CHAT_CLOSING_PHRASES[6]]
# Raw bytes too: single ASCII letters (to spell "I hope this helps", "Chapter 9" letter by letter), and the
# halves of "é" (C3 A9) and "»" (C2 BB), which only spell a character together, and a lone continuation byte.
ITEMS: list[str | int] = [*PIECES, *b"I hopetsCar9", 0xC3, 0xA9, 0xC2, 0xBB, 0x80]


def reference(matcher: PhraseMatcher, ids: list[int], prompt: int, first: int, final: bool) -> PhraseScan:
    """scan() on the row's real tokens, its match moved to the row's own indices."""
    scan = matcher.scan(ids[first:], prompt - first, 1, final=final)
    if scan.match is None:
        return scan
    return PhraseScan(type(scan.match)(scan.match.start + first, scan.match.phrase, scan.match.text), scan.hold)


actions = st.lists(
    st.one_of(st.sampled_from(ITEMS).map(lambda item: ("token", item)), st.integers(1, 6).map(lambda k: ("cut", k))),
    min_size=1,
    max_size=40,
)


class PlainDecoder:
    """A tokenizer with nothing but decode(): the stream decodes with it instead of tokenizers' DecodeStream."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def decode(self, ids, skip_special_tokens=False):
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def replay(matcher, ids, prompt_length, padding, steps, tok, final=False, scanned=None):
    """Feed ``steps`` (tokens, or cuts of a few tokens) to a stream and to scan() (of ``scanned``, a matcher of
    the same phrases, by default ``matcher``); they must agree each time."""
    stream = PhraseStream(matcher)
    scanned = matcher if scanned is None else scanned
    strings = [c.source for c in scanned.compiled if c.literal]
    regexes = len(strings) < len(scanned.phrases)
    # With regular expressions, scan()'s hold follows the regex module's partial matches over its whole
    # window, and those report some starts that no continuation can complete (a partial match across a
    # lookbehind that fails); the stream searches on from its previous hold. It holds at least what the
    # string phrases hold, and never more than scan().
    floor = None
    if strings:
        floor = PhraseStream(PhraseMatcher(strings, matcher.tokenizer, matcher.case_sensitive, matcher.word_boundaries))
    for n, (kind, value) in enumerate(steps):
        if kind == "cut":
            length = max(prompt_length, len(ids) - value)
            ids = ids[:length]
            stream.rewind(length)
            if floor is not None:
                floor.rewind(length)
            continue
        ids = ids + ([value] if isinstance(value, int) and tok is None else ids_of(tok, [value]))
        last = final and n == len(steps) - 1
        got = stream.feed(ids, prompt_length, padding, final=last)
        want = reference(scanned, ids, prompt_length, padding, last)
        if scanned is not matcher and want.match is not None and got.match is not None:
            # The same phrase under the name the other matcher lists it by: compared by where and what it is.
            want = PhraseScan(PhraseMatch(want.match.start, got.match.phrase, want.match.text), want.hold)
        context = (matcher.tokenizer.decode(ids), ids)
        if not regexes:
            assert got == want, context
        else:
            assert got.match == want.match, context
            if got.match is None and floor is not None:
                assert floor.feed(ids, prompt_length, padding, final=last).hold <= got.hold <= want.hold, context
            elif got.match is None:
                assert got.hold <= want.hold, context
        if got.match is not None:
            # What a rule does with a match: the row is cut back to where the phrase began. (Without the cut the
            # two differ on an overlapping occurrence that only text a rule never keeps can show: scan() finds
            # matches that do not overlap, "e E" in "Once E" then nothing in "Once E End", while the stream reports
            # the "E E" the new token completes.)
            ids = ids[: max(prompt_length, got.match.start)]
            stream.rewind(len(ids))
            if floor is not None:
                floor.rewind(len(ids))
    return stream


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tokenizer=st.sampled_from(["byte_level", "sentencepiece", "plain"]),
    phrases=st.lists(st.sampled_from(STRINGS + REGEXES), min_size=1, max_size=5, unique_by=id),
    case_sensitive=st.booleans(),
    word_boundaries=st.booleans(),
    padding=st.integers(0, 2),
    prompt=st.lists(st.sampled_from(ITEMS), max_size=4),
    steps=actions,
    final=st.booleans(),
)
def test_stream_reports_what_scan_reports(
    tokenizer, phrases, case_sensitive, word_boundaries, padding, prompt, steps, final
):
    tok = BYTE_LEVEL if tokenizer == "byte_level" else SENTENCEPIECE
    decoder = PlainDecoder(tok) if tokenizer == "plain" else tok
    matcher = PhraseMatcher(phrases, decoder, case_sensitive=case_sensitive, word_boundaries=word_boundaries)
    pad = tok.convert_tokens_to_ids(tok.eos_token)
    ids = [pad] * padding + ids_of(tok, prompt)
    replay(matcher, ids, len(ids), padding, steps, tok, final)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), chat=st.booleans())
def test_stream_agrees_on_the_real_vocabulary(story_tokenizer, seed, chat):
    """Random ids of TinyStories-656K's whole vocabulary (byte-fallback pieces, pieces with and without a
    leading "▁", its special tokens) against the default and the chat phrase sets, with random rewinds."""
    rng = random.Random(seed)
    matcher = PhraseMatcher(default_end_phrases(story_tokenizer, chat=chat), story_tokenizer)
    text = "Once upon a time, The End. I hope this helps! Let me know if you need more.<|end_story|> THE END"
    spelled = story_tokenizer.encode(text, add_special_tokens=False)
    steps = []
    for _ in range(60):
        roll = rng.random()
        if roll < 0.1:
            steps.append(("cut", rng.randint(1, 5)))
        elif roll < 0.6:
            steps.append(("token", rng.choice(spelled)))
        else:
            steps.append(("token", rng.randrange(len(story_tokenizer))))
    replay(matcher, story_tokenizer.encode("Once", add_special_tokens=False), 1, 0, steps, None)


def test_long_rows_stay_bounded_and_agree():
    """A row of 3,000 tokens with rewinds now and then: the stream keeps a bounded tail and still agrees."""
    rng = random.Random(0)
    matcher = PhraseMatcher(STRINGS + REGEXES, SENTENCEPIECE)
    steps = [("cut", rng.randint(1, 8)) if rng.random() < 0.03 else ("token", rng.choice(ITEMS)) for _ in range(3000)]
    stream = replay(matcher, [], 0, 0, steps, SENTENCEPIECE)
    assert len(stream.text.text) < 4 * matcher.need_chars + 300
    assert len(stream.text.tokens) < 4 * matcher.need_chars + 300


def test_matching_benchmark_smoke(tinystories_path, tmp_path, capsys):
    """benchmarks/matching.py runs end to end on tiny sizes and writes its table (no timing is asserted)."""
    import json

    from benchmarks import matching

    assert matching.main(["--phrases", "50", "--rows", "1", "--tokens", "30", "--old-tokens", "2", "--repeats", "1",
                          "--out", str(tmp_path)]) == 0  # fmt: skip
    data = json.loads((tmp_path / "matching.json").read_text())
    assert set(data["per_row_per_token_us"]) == {"default", "chat", "random 50"}
    assert all(v["stream"] > 0 and v["scan"] > 0 for v in data["per_row_per_token_us"].values())
    assert "scan/stream" in capsys.readouterr().out


def test_ten_thousand_phrases_and_a_hundred_regexes_work(story_tokenizer):
    """The anti-slop scale: 10,000 string phrases and 100 regular expressions in one matcher. A planted phrase
    is found where it begins, and the stream agrees with scan() (checked on the last tokens only: scan() is
    slow at this size, which is the point of the stream)."""
    rng = random.Random(3)
    words = [
        "the",
        "a",
        "big",
        "little",
        "dog",
        "cat",
        "ball",
        "park",
        "play",
        "mom",
        "dad",
        "tree",
        "sun",
        "run",
        "jump",
        "happy",
        "sad",
        "red",
        "blue",
        "green",
    ]
    phrases = sorted({" ".join(rng.choice(words) for _ in range(rng.choice((2, 3)))) + f" {i}" for i in range(10_000)})
    regexes = [regex.compile(rf"(?i)zebra{i}q+") for i in range(100)]
    matcher = PhraseMatcher([*phrases, *regexes], story_tokenizer)
    planted = phrases[1234]
    text = "Once upon a time the dog ran to the park. " + planted + ". Then they went home."
    ids = story_tokenizer.encode(text, add_special_tokens=False)
    stream = PhraseStream(matcher)
    found = None
    for n in range(1, len(ids) + 1):
        scan = stream.feed(ids[:n])
        if n > len(ids) - 2:
            assert scan == matcher.scan(ids[:n])
        if scan.match is not None and found is None:
            found = scan.match
    assert found is not None and found.phrase == planted
    assert story_tokenizer.decode(ids[found.start :]).lstrip().startswith(planted)


@pytest.mark.parametrize("text", ["Max liked to run", "She said the summ", "Then they went home and had fun"])
def test_chat_closings_hold_back_nothing_in_plain_prose(text):
    """The conclusion patterns' lookbehinds used to make the regex module report partial matches that no text
    can complete ("to run" for "to sum up"), so scan() held prose back from a streamer for no reason."""
    matcher = PhraseMatcher(list(CHAT_CLOSING_PHRASES[:2]), SENTENCEPIECE)
    ids = ids_of(SENTENCEPIECE, list(text))
    assert matcher.scan(ids).hold == 0
    stream = PhraseStream(matcher)
    assert [stream.feed(ids[:n]).hold for n in range(1, len(ids) + 1)][-1] == 0


GATE_PATTERNS = [
    *CHAT_CLOSING_PHRASES,
    regex.compile(r"(?<!\w)ab|c"),  # a lookbehind that applies to one alternative only
    regex.compile(r"(?<!\w)[]|]x"),
    regex.compile(r"Chapter \d+"),
]


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(st.sampled_from(list("abcx |]\n.*#IiHhopeltsnkwyu'")), max_size=30),
    picks=st.lists(st.integers(0, len(GATE_PATTERNS) - 1), min_size=2, max_size=6, unique=True),
    data=st.data(),
)
def test_the_gate_finds_where_the_first_of_its_patterns_does(text, picks, data):
    """The one search that stands for all regular expressions (their lookbehinds shared where they can be)
    starts where the earliest of them, searched one by one, starts -- complete or partial."""
    _gate = importlib.import_module(PhraseStream.__module__)._gate  # the module wherever it lives

    patterns = [GATE_PATTERNS[i] for i in picks]
    gate = _gate(patterns)
    assert gate is not None
    start, end = data.draw(st.integers(0, len(text))), len(text)

    def where(pattern):  # an empty partial match at the very end is nothing (what the stream reads it as)
        m = pattern.search(text, start, end, partial=True)
        return None if m is None or m.start() == m.end() == end else m.start()

    found = [s for s in map(where, patterns) if s is not None]
    assert where(gate) == (min(found) if found else None)


# One matcher per setting for every example of the test below: the answers that one example's steps leave in the
# matcher's index (the usual step's hold, the pieces that cannot begin a regular expression) serve the next
# examples, whose texts before those pieces differ. Each is checked against a stream that keeps no answers.
_SHARED_MATCHERS: dict[tuple[str, bool, bool], PhraseMatcher] = {}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tokenizer=st.sampled_from(["byte_level", "sentencepiece"]),
    case_sensitive=st.booleans(),
    word_boundaries=st.booleans(),
    prompt=st.lists(st.sampled_from(ITEMS), max_size=4),
    steps=actions,
    final=st.booleans(),
)
def test_answers_learned_from_other_rows_change_nothing(
    tokenizer, case_sensitive, word_boundaries, prompt, steps, final
):
    tok = BYTE_LEVEL if tokenizer == "byte_level" else SENTENCEPIECE
    key = (tokenizer, case_sensitive, word_boundaries)
    if key not in _SHARED_MATCHERS:
        _SHARED_MATCHERS[key] = PhraseMatcher(
            STRINGS + REGEXES, tok, case_sensitive=case_sensitive, word_boundaries=word_boundaries
        )
    learning = PhraseStream(_SHARED_MATCHERS[key])
    plain = _forgetful_stream(PhraseMatcher(STRINGS + REGEXES, tok, case_sensitive, word_boundaries))
    ids = ids_of(tok, prompt)
    prompt_length = len(ids)
    for n, (kind, value) in enumerate(steps):
        if kind == "cut":
            ids = ids[: max(prompt_length, len(ids) - value)]
            learning.rewind(len(ids))
            plain.rewind(len(ids))
            continue
        ids = ids + (ids_of(tok, [value]) if isinstance(value, str) else [value])
        last = final and n == len(steps) - 1
        context = (tok.decode(ids), ids)
        assert learning.feed(ids, prompt_length, final=last) == plain.feed(ids, prompt_length, final=last), context
        assert (learning.string_from, learning.regex_from) == (plain.string_from, plain.regex_from), context


def _forgetful_stream(matcher: PhraseMatcher) -> PhraseStream:
    """A stream whose matcher keeps no answers and takes no shortcut: every step is worked out in full. It runs
    the Python source (its methods are replaced below, which a compiled class does not allow), so the comparisons
    also hold a compiled build to its source."""
    stream = source_module(PhraseStream.__module__).PhraseStream(matcher)
    stream.index.string_holds = _Forgetful()
    stream.index.candidates = _Forgetful()
    stream.index.quiet = _Forgetful()
    stream.index.token_next = _Forgetful()
    stream.index.learn_quiet = lambda token, before, after: None
    stream.index.learn_pair_quiet = lambda token, before, trail, after: None
    stream.index.quiet_after = lambda text: None
    return stream


def test_the_usual_step_reuses_answers_and_agrees_with_a_stream_that_does_not(story_tokenizer):
    """Rows of a story with the chat set: most steps are answered from what earlier steps found (the answers
    are used, not dead code), and every scan and hold equals that of a stream whose answers are never kept."""
    matcher = PhraseMatcher(default_end_phrases(story_tokenizer, chat=True), story_tokenizer)
    text = (
        "Once upon a time, a happy dog named Max liked to play. Let me tell you about the end of the park. "
        "In the end, they had fun. I hope this helps you see why the sun was happy. The End of nothing."
    )
    ids = story_tokenizer.encode(text, add_special_tokens=False)
    fresh = PhraseMatcher(default_end_phrases(story_tokenizer, chat=True), story_tokenizer)
    module = importlib.import_module(PhraseStream.__module__)
    for _ in range(2):  # the second row finds the answers of the first
        learning, plain = PhraseStream(matcher), _forgetful_stream(fresh)
        for n in range(1, len(ids) + 1):
            assert learning.feed(ids[:n]) == plain.feed(ids[:n]), story_tokenizer.decode(ids[:n])
            assert (learning.string_from, learning.regex_from) == (plain.string_from, plain.regex_from)
    assert len(PhraseIndex.of(matcher).string_holds) > 10
    candidates = PhraseIndex.of(matcher).candidates.values()
    assert () in candidates and any(candidates)  # most pieces begin no regex; some ("I hope", "Let") may
    assert len(PhraseIndex.of(matcher).quiet) > 10  # and most steps hold nothing before or after
    assert sum(map(bool, PhraseIndex.of(matcher).quiet_next)) > 10  # (also kept per token)
    assert len(PhraseIndex.of(matcher).token_next) > 3  # and the common words held and let go, per token
    assert module._MEMO_ENTRIES > 0


class _Forgetful(dict):
    """A memo that keeps nothing: every step is worked out in full."""

    def __setitem__(self, key, value):
        pass


def test_the_prefilter_drops_positive_lookbehinds_and_refuses_what_reads_before_a_match():
    module = importlib.import_module(PhraseStream.__module__)
    conclusion = module._prefilter(CHAT_CLOSING_PHRASES[0])  # "In conclusion" after a sentence end or a heading
    assert conclusion is not None and "(?<=" not in conclusion.pattern

    def begins_something(prefilter, piece, before=" "):  # as the stream reads it, after one character of context
        m = prefilter.search(before + piece, 1, partial=True)
        return m is not None and not m.start() == m.end() == len(piece) + 1

    assert begins_something(conclusion, "in conclusion") and begins_something(conclusion, " in conc")
    assert not begins_something(conclusion, " the dog")
    # A negative lookbehind stays: it holds at the piece's start and reads the piece's own text inside it.
    let_me_know = module._prefilter(CHAT_CLOSING_PHRASES[2])
    assert "(?<!" in let_me_know.pattern
    assert begins_something(let_me_know, " let") and begins_something(let_me_know, "let")
    assert not begins_something(let_me_know, " outlet") and not begins_something(let_me_know, "let", before="t")
    for source in [r"\bword", r"^word", r"\Aword", r"(a)?(?(1)b|c)", r"(?<!\bx)y"]:
        assert module._prefilter(regex.compile(source)) is None, source
    # A "(?<" inside a set or after a backslash is no lookbehind.
    assert module._without_lookbehinds(r"[(?<=]x\(?<=y") == r"[(?<=]x\(?<=y"
    assert module._without_lookbehinds(r"(?<=a(b)[)])c(?<!d)") == "c(?<!d)"


def test_an_unfinished_character_at_the_last_token_confirms_a_match_as_in_scan() -> None:
    """Found by hypothesis: "hello" then the first byte of a two-byte character as the row's last token. A
    decode of the row reads "hello\\ufffd", whose U+FFFD (no word character) confirms "hello(?!\\w)"; the stream
    left the unfinished character out of its text and missed the match."""
    matcher = PhraseMatcher([regex.compile(r"(?i)(?<!\w)hello(?!\w)")], BYTE_LEVEL, False, False)
    ids = [*ids_of(BYTE_LEVEL, ["hello"]), *ids_of(BYTE_LEVEL, [0xC3])]
    stream = PhraseStream(matcher)
    stream.feed(ids[:1])
    found = stream.feed(ids, final=True)
    assert found == matcher.scan(ids, new_tokens=1, final=True) and found.match is not None


# Regular expressions whose lookbehinds read back over non-word characters only, spelled with the test pieces:
# after a word character of the new text, the regex itself (not its prefilter) decides whether it may begin.
LOOKBEHIND_REGEXES = [
    CHAT_CLOSING_PHRASES[0],  # "in conclusion", "to sum up" ... after a sentence end, a heading or "**"
    regex.compile(r"(?i)(?<=(?:[.!?]|\n)\s*)(?:the end|fin)(?!\w)"),
    regex.compile(r"(?<=\n\n|[!.] )(?:Once|x x)"),
]
LOOKBEHIND_ITEMS: list[str | int] = [".", ",", "!", "\n", " ", " the", "the", " end", "Fin", "Once", "x", " "]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tokenizer=st.sampled_from(["byte_level", "sentencepiece"]),
    prompt=st.lists(st.sampled_from(LOOKBEHIND_ITEMS), max_size=4),
    steps=st.lists(
        st.one_of(
            st.sampled_from(LOOKBEHIND_ITEMS).map(lambda item: ("token", item)),
            st.integers(1, 6).map(lambda k: ("cut", k)),
        ),
        min_size=1,
        max_size=40,
    ),
    final=st.booleans(),
)
def test_lookbehinds_after_a_word_are_read_as_scan_reads_them(tokenizer, prompt, steps, final):
    """A sentence-start closing right after a sentence end matches, and the same words after a word or a comma do
    not -- whatever rows taught the matcher before (one matcher serves every example)."""
    tok = BYTE_LEVEL if tokenizer == "byte_level" else SENTENCEPIECE
    matcher = _LOOKBEHIND_MATCHERS.get(tokenizer)
    if matcher is None:
        # (The string phrase cannot overlap itself: scan() reports no occurrence that overlaps an earlier one, such
        # as one begun in the prompt, where the stream reports what the new token completes; see replay.)
        matcher = _LOOKBEHIND_MATCHERS[tokenizer] = PhraseMatcher([*LOOKBEHIND_REGEXES, "Fin x"], tok, False)
    ids = ids_of(tok, [item for item in prompt if isinstance(item, str)])
    replay(matcher, ids, len(ids), 0, steps, tok, final)


_LOOKBEHIND_MATCHERS: dict[str, PhraseMatcher] = {}


def test_a_lookbehind_over_non_word_characters_stops_at_a_word():
    module = importlib.import_module(PhraseStream.__module__)
    reads_no_word = module._lookbehinds_take_no_word
    assert reads_no_word(CHAT_CLOSING_PHRASES[0].pattern) and reads_no_word(CHAT_CLOSING_PHRASES[1].pattern)
    for source in [r"(?<=[.!?]\s*)x", r"(?<=\n\n|\*\*)x", r"(?<=[-.]{1,3})x", r"(?<!\w)x", "x(?<=x)"[:1]]:
        assert reads_no_word(source), source
    for source in [r"(?<=\w)x", r"(?<=a)x", r"(?<=.)x", r"(?<=[^.])x", r"(?<=[a-z])x", r"(?<=[!-/])x", r"(?<=\d)x",
                   r"(?<=\x41)x", r"(?<=\b )x", r"(?<=(?i)\.)x", r"(?<=\.(?=\s))x"]:  # fmt: skip
        assert not reads_no_word(source), source
    matcher = PhraseMatcher([CHAT_CLOSING_PHRASES[0]], SENTENCEPIECE, case_sensitive=False)
    stream = PhraseStream(matcher)
    # Mid-word "t" may not begin "to sum up"; after the word "wanted" neither; after a space that follows a
    # sentence end it may (the character before the piece is kept only by its class).
    assert stream.index.regex_candidates("dit") == () and stream.index.regex_candidates("d wanted to ") == ()
    assert stream.index.regex_candidates(" to") == (0,)


@pytest.mark.parametrize("tok", [BYTE_LEVEL, SENTENCEPIECE], ids=["byte_level", "sentencepiece"])
def test_a_word_let_go_leaves_a_later_start_held(tok):
    """ "Once upon" is held for "Once upon a time x"; " The" lets it go, but "upon The" may still become "upon The
    End": the hold moves to " upon", as in scan(). (A step that lets a held word go is worked out alone only when
    the held text has no other place a phrase may begin.)"""
    prompt = ids_of(tok, ["."])
    steps = [("token", "Once"), ("token", " upon"), ("token", " The")]
    replay(PhraseMatcher(["zzz"], tok), prompt, len(prompt), 0, steps, tok)  # the tokens' texts known: plain steps
    stream = replay(PhraseMatcher(["Once upon a time x", "upon The End"], tok), prompt, len(prompt), 0, steps, tok)
    assert stream.text.text[stream.string_from - stream.text.char_base :].strip() == "upon The"


# Words that begin chat closings or string endings, and the words that continue or break them: rows of these hold
# and let go a word at nearly every step, through the held states kept per token (PhraseIndex.token_next).
_HELD_WORDS = [
    " to",
    " in",
    " is",
    " I",
    " if",
    " do",
    " let",
    " me",
    " know",
    " you",
    " have",
    " any",
    " questions",
    " kind",
    " best",
    " regards",
    " happy",
    " learning",
    " hope",
    " this",
    " helps",
    " The",
    " End",
    " the",
    " end",
    " to",
    " be",
    " continued",
    " not",
    " hesitate",
    " feel",
    " free",
    " ask",
    ".",
    ",",
    "!",
    " park",
    " dog",
    "\n",
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(
        st.lists(
            st.one_of(
                st.sampled_from(_HELD_WORDS).map(lambda w: ("token", w)), st.integers(1, 4).map(lambda k: ("cut", k))
            ),
            min_size=1,
            max_size=40,
        ),
        min_size=2,
        max_size=4,
    )
)
def test_words_held_and_let_go_per_token_agree_with_a_stream_that_keeps_no_answers(rows, story_tokenizer):
    """The chat set on TinyStories' tokenizer, rows that keep holding and letting go words that may begin a
    closing, through rewinds: every scan, hold and hold position of a stream that answers such steps from the held
    states other rows taught (and enters them from quiet steps) equals that of a stream working every step out."""
    phrases = default_end_phrases(story_tokenizer, chat=True)
    matcher = _HELD_MATCHERS.setdefault(id(story_tokenizer), PhraseMatcher(phrases, story_tokenizer))
    prompt = story_tokenizer.encode("Once upon a time", add_special_tokens=False)
    for steps in rows:
        learning, plain = PhraseStream(matcher), _forgetful_stream(PhraseMatcher(phrases, story_tokenizer))
        ids = list(prompt)
        for kind, value in steps:
            if kind == "cut":
                ids = ids[: max(len(prompt), len(ids) - value)]
                learning.rewind(len(ids))
                plain.rewind(len(ids))
                continue
            ids = ids + story_tokenizer.encode(value, add_special_tokens=False)[-1:]
            context = (story_tokenizer.decode(ids), ids)
            assert learning.feed(ids, len(prompt)) == plain.feed(ids, len(prompt)), context
            assert (learning.string_from, learning.regex_from) == (plain.string_from, plain.regex_from), context


_HELD_MATCHERS: dict[int, PhraseMatcher] = {}


def test_held_words_are_answered_per_token_once_seen(story_tokenizer):
    """The steps that hold and let go "happy" (it may begin "Happy learning!") are kept per token: once a row has
    written the same words, another row holds "happy" and lets it go without reading its text (the tokens' texts
    stay deferred until a step needs them)."""
    matcher = PhraseMatcher(default_end_phrases(story_tokenizer, chat=True), story_tokenizer)
    prompt = story_tokenizer.encode("Once upon a time", add_special_tokens=False)
    happy, he_was, and_ = story_tokenizer.convert_tokens_to_ids(["happy", "he▁was▁", "▁and▁"])
    ids = prompt + [he_was, happy, and_] * 4
    teacher = PhraseStream(matcher)
    for n in range(len(prompt) + 1, len(ids) + 1):
        teacher.feed(ids[:n], len(prompt))
    stream = PhraseStream(matcher)
    unread = []
    for n in range(len(prompt) + 1, len(ids) + 1):
        scan = stream.feed(ids[:n], len(prompt))
        if ids[n - 1] == happy:
            assert scan.hold == 1
            unread.append(stream.held >= 0 and stream.text.deferred > 0)
    assert unread == [True] * 4 and stream.quiet_before >= 0 and stream.text.deferred >= 6


def test_a_piece_that_may_begin_a_lookbehind_regex_is_answered_per_trail(story_tokenizer):
    """ "in " may begin "In conclusion" after a sentence end, so whether its step is quiet depends on what comes
    before it. After ", " it is quiet: once seen, that answer serves every token whose text ends the same way (the
    trail ", "), and the step leaves its text unread; after ". " the regex may begin, and it is worked out again."""
    phrases = default_end_phrases(story_tokenizer, chat=True)
    matcher = PhraseMatcher(phrases, story_tokenizer)
    prompt = story_tokenizer.encode("Once upon a time", add_special_tokens=False)
    in_, comma, stop, park, dog, the, he_was = story_tokenizer.convert_tokens_to_ids(
        ["in▁", ",▁", ".▁", "park", "dog", "the▁", "he▁was▁"]
    )
    teacher = PhraseStream(matcher)
    taught = [*prompt, *[he_was, the, park, comma, in_, the, dog, stop] * 2]  # (answers kept from the 2nd on)
    for n in range(len(prompt) + 1, len(taught) + 1):
        teacher.feed(taught[:n], len(prompt))
    index = PhraseIndex.of(matcher)
    assert index.pair_quiet and index.trails.get(", ") is not None
    for before, deferred in [(comma, True), (stop, False)]:
        stream, plain = PhraseStream(matcher), _forgetful_stream(PhraseMatcher(phrases, story_tokenizer))
        ids = [*prompt, he_was, the, dog, before, in_]  # "dog, in " / "dog. in "
        for n in range(len(prompt) + 1, len(ids) + 1):
            unread = stream.text.deferred
            assert stream.feed(ids[:n], len(prompt)) == plain.feed(ids[:n], len(prompt))
        assert (stream.text.deferred > unread) == deferred, story_tokenizer.decode(ids)


def test_the_answers_kept_per_held_state_and_trail_stay_bounded(story_tokenizer, monkeypatch):
    """Like every answer an index keeps, the held states, their steps and the trails stop growing at the memo's
    size; past it, steps are worked out in full and still agree with a stream that keeps nothing."""
    module = source_module(PhraseStream.__module__)
    monkeypatch.setattr(module, "_MEMO_ENTRIES", 3)
    phrases = default_end_phrases(story_tokenizer, chat=True)
    matcher = PhraseMatcher(phrases, story_tokenizer)
    index = module.PhraseIndex.of(matcher)
    assert [index.trail_number(t) for t in [" ", ", ", ". ", "! ", " "]] == [0, 1, 2, -1, 0]
    prompt = story_tokenizer.encode("Once upon a time", add_special_tokens=False)
    text = "He was happy, in the park. Best wishes! I was kind, happy and best. Let me see, in a box. " * 3
    ids = prompt + story_tokenizer.encode(text, add_special_tokens=False)
    for _ in range(2):  # the second row reads what the first could keep
        stream, plain = module.PhraseStream(matcher), _forgetful_stream(PhraseMatcher(phrases, story_tokenizer))
        for n in range(len(prompt) + 1, len(ids) + 1):
            assert stream.feed(ids[:n], len(prompt)) == plain.feed(ids[:n], len(prompt))
    sizes = [len(index.held_states), len(index.token_next), len(index.pair_quiet), len(index.trails)]
    assert max(sizes) <= 3 and len(index.token_trail) <= 3, sizes


def test_an_occurrence_in_the_prompt_does_not_hide_one_the_new_text_completes():
    """Found by hypothesis: with the prompt "e E", " End" completes "E E", which overlaps the prompt's own "e E".
    scan() searched for matches that do not overlap, so the prompt's hid it; the stream reported it. Both do now."""
    matcher = PhraseMatcher(["e E"], BYTE_LEVEL, case_sensitive=False, word_boundaries=False)
    prompt = ids_of(BYTE_LEVEL, ["e E"])
    ids = prompt + ids_of(BYTE_LEVEL, [" End"])
    scan = matcher.scan(ids, len(prompt), 1)
    assert scan.match is not None and scan.match.text == "E E"
    replay(matcher, prompt, len(prompt), 0, [("token", " End")], BYTE_LEVEL)
