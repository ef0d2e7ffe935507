"""PhraseMatcher and default_end_phrases: matches across token boundaries, hold-back, windows, tokenizers."""

from __future__ import annotations

import re

import pytest
import regex
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from perpetual_logits.text.endings import ENDING_PHRASES, default_end_phrases
from perpetual_logits.text.matcher import PhraseMatch, PhraseMatcher, PhraseScan

# -- tokenizers built here ----------------------------------------------------------------------------------

PIECES = [
    "Once", " upon", " a", " time", ".", ". The", " The", "The", " Th", "e E", " End", "End", " E", "nd", "nd.",
    "less", " road", " ", "x", "T", "he", "!", "\n", "<|", "end", "_story", "|>", "Fin", "in", "F", " Chapter",
    " 1", "2", "the", " the", " end", "hello",
]  # fmt: skip


def _byte_level_form(piece: str) -> str:
    """The byte-level (GPT-2) spelling of a piece: each UTF-8 byte as one printable character."""
    words = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(piece)
    return "".join(w for w, _ in words)


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-like byte-level BPE: the 256 byte characters plus multi-character pieces (no merges, so the
    tests choose the split by hand)."""
    vocab: dict[str, int] = {"<|endoftext|>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    for piece in PIECES:
        vocab.setdefault(_byte_level_form(piece), len(vocab))
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama/SentencePiece-style BPE with byte fallback: ``▁`` for spaces, <0xNN> byte pieces, and a decoder
    that drops the first leading space (the same decoder chain as TinyStories-656K)."""
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in PIECES + [chr(c) for c in range(33, 127)]:
        vocab.setdefault(piece.replace(" ", "▁"), len(vocab))
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


BYTE_LEVEL = byte_level_tokenizer()
SENTENCEPIECE = sentencepiece_tokenizer()


def ids_of(tok: PreTrainedTokenizerFast, pieces: list[str]) -> list[int]:
    """Token ids of the given pieces; a piece may also be one raw byte, written as an int."""
    out: list[int] = []
    for piece in pieces:
        if isinstance(piece, int):
            name = _BYTE_CHARS[piece] if tok is BYTE_LEVEL else f"<0x{piece:02X}>"
        else:
            name = _byte_level_form(piece) if tok is BYTE_LEVEL else piece.replace(" ", "▁")
        token_id = tok.convert_tokens_to_ids(name)
        assert token_id is not None and token_id != tok.unk_token_id, piece
        out.append(token_id)
    return out


def _byte_chars() -> dict[int, str]:
    """Byte value -> byte-level character, read off the pre-tokenizer (no hand-written table): the
    characters U+0000..U+07FF cover every byte value that starts or continues a 1- or 2-byte sequence."""
    table: dict[int, str] = {}
    for code in range(0x800):
        for b, c in zip(chr(code).encode(), _byte_level_form(chr(code))):
            table.setdefault(b, c)
    return table


_BYTE_CHARS = _byte_chars()
TOKENIZERS = {"byte_level": BYTE_LEVEL, "sentencepiece": SENTENCEPIECE}


def stream(matcher: PhraseMatcher, ids: list[int], prompt_length: int) -> list[PhraseScan]:
    """Scan after every generated token, as a generation loop would."""
    return [matcher.scan(ids[:n], prompt_length) for n in range(prompt_length + 1, len(ids) + 1)]


def first_match(scans: list[PhraseScan]) -> tuple[int, PhraseMatch] | None:
    for i, scan in enumerate(scans):
        if scan.match is not None:
            return i, scan.match
    return None


# -- default_end_phrases ------------------------------------------------------------------------------------


def test_default_end_phrases_tinystories(tinystories_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tinystories_path)
    phrases = default_end_phrases(tok, eos_token_id=2)
    assert phrases[0] == "<|end_story|>"
    assert "<|start_story|>" not in phrases and "<unk>" not in phrases
    assert phrases[1:] == list(ENDING_PHRASES)
    assert default_end_phrases(tok, ending_phrases=False) == ["<|end_story|>"]


def test_default_end_phrases_chat_markers():
    vocab = {
        "<unk>": 0, "<|begin_of_text|>": 1, "<|end_of_text|>": 2, "<|eot_id|>": 3, "<|im_end|>": 4,
        "<|start_header_id|>": 5, "</think>": 6, "\n": 7, "hi": 8,
    }  # fmt: skip
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        unk_token="<unk>",
        additional_special_tokens=["<|eot_id|>", "<|im_end|>", "<|start_header_id|>", "</think>"],
    )
    # generation_config-style ids: <|eot_id|> is listed, "\n" is an ordinary piece and must not be banned.
    phrases = default_end_phrases(tok, eos_token_id=[2, 3, 7], ending_phrases=False)
    assert phrases == ["<|end_of_text|>", "<|eot_id|>", "<|im_end|>"]


def test_default_end_phrases_validation():
    with pytest.raises(ValueError, match="tokenizer"):
        default_end_phrases(object())
    with pytest.raises(ValueError, match="eos_token_id"):
        default_end_phrases(BYTE_LEVEL, eos_token_id=-1)
    with pytest.raises(ValueError, match="ending_phrases"):
        default_end_phrases(BYTE_LEVEL, ending_phrases="yes")  # type: ignore[arg-type]


# -- scripted matches ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TOKENIZERS))
@pytest.mark.parametrize(
    ("pieces", "start_piece"),
    [
        (["Once", " upon", " a", " time", " The", " End", "."], 4),  # one token per word
        (["Once", " upon", " a", " time", " Th", "e E", "nd", "."], 4),  # split mid-word
        (["Once", " upon", " a", " time", " Th", "e E", "nd."], 4),  # confirmed inside the last token
        (["Once", " upon", " a", " time", ". The", " End", "!"], 4),  # the token starts before the phrase
        (["Once", " upon", " a", " time", " ", "T", "he", " ", "E", "nd", "\n"], 5),  # letter by letter
        (["Once", " upon", " a", " time", " The", "\n", "\n", "End", "."], 4),  # whitespace run
    ],
)
def test_match_start_across_token_boundaries(name, pieces, start_piece):
    tok = TOKENIZERS[name]
    ids = ids_of(tok, pieces)
    scans = stream(PhraseMatcher(["The End"], tok), ids, prompt_length=2)
    found = first_match(scans)
    assert found is not None
    step, match = found
    assert step == len(ids) - 3, "reported as soon as the character after 'End' arrived"
    assert match.start == start_piece
    assert re.fullmatch(r"The\s+End", match.text)
    assert scans[step].hold == len(ids) - start_piece
    assert all(s.match is None for s in scans[step + 1 :])


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_innocent_words_are_not_hit(name):
    tok = TOKENIZERS[name]
    matcher = PhraseMatcher(["The End"], tok)
    ids = ids_of(tok, ["Once", " The", " End", "less", " road", ".", " The", "he", " E", "nd", "less", "."])
    scans = stream(matcher, ids, prompt_length=1)
    assert all(s.match is None for s in scans)
    # " The" might start "The End": held; " End" completes it but "less" may follow: held; then released.
    assert [s.hold for s in scans[:4]] == [1, 2, 0, 0]
    # "Thehe" is no prefix of "The End": nothing to hold after "he".
    assert scans[6].hold == 0
    # A preceding word character blocks the phrase: "xThe End." is not "The End".
    ids = ids_of(tok, ["Once", " ", "x", "The", " End", "."])
    assert all(s.match is None for s in stream(matcher, ids, prompt_length=1))


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_hold_back_lengths(name):
    tok = TOKENIZERS[name]
    matcher = PhraseMatcher(["<|end_story|>", "The End"], tok)
    ids = ids_of(tok, ["Once", " upon", ".", "<|", "end", "_story", "|>", " The", " E", "nd", "less"])
    scans = stream(matcher, ids, prompt_length=2)
    # ".": nothing; "<|": 1; "end": 2; "_story": 3; "|>": the marker is complete (no confirmation needed
    # after ">") -> match at "<|" with 4 tokens held; " The": 1; " E": 2; "nd": 3 (pending); "less": 0.
    assert [s.hold for s in scans] == [0, 1, 2, 3, 4, 1, 2, 3, 0]
    assert scans[4].match == PhraseMatch(start=3, phrase="<|end_story|>", text="<|end_story|>")
    assert [i for i, s in enumerate(scans) if s.match] == [4]


def test_case_and_whitespace():
    tok = BYTE_LEVEL
    ids = ids_of(tok, ["hello", "\n", "the", " end", "."])
    assert first_match(stream(PhraseMatcher(["The end."], tok), ids, 1)) is None
    found = first_match(stream(PhraseMatcher(["The end."], tok, case_sensitive=False), ids, 1))
    assert found is not None and found[1].start == 2 and found[1].text == "the end."
    # Leading/trailing whitespace of a phrase is ignored; a space in it matches any whitespace run.
    found = first_match(stream(PhraseMatcher(["  The   End  "], tok), ids_of(tok, ["x", " The", "\n", "End", "!"]), 1))
    assert found is not None and found[1].start == 1
    # word_boundaries=False: "The End" inside "The Endless" is a match.
    ids = ids_of(tok, ["x", " The", " End", "less"])
    found = first_match(stream(PhraseMatcher(["The End"], tok, word_boundaries=False), ids, 1))
    assert found is not None and found[0] == 1 and found[1].start == 1


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_multibyte_characters_split_across_byte_tokens(name):
    tok = TOKENIZERS[name]
    matcher = PhraseMatcher(["«Fin»"], tok)
    # « is C2 AB and » is C2 BB in UTF-8: each is two byte tokens.
    ids = ids_of(tok, ["Once", " upon", " ", 0xC2, 0xAB, "Fin", 0xC2, 0xBB, "!"])
    scans = stream(matcher, ids, prompt_length=2)
    assert [s.hold for s in scans[:3]] == [0, 1, 2]  # a dangling byte is held (it may start a phrase)
    found = first_match(scans)
    assert found is not None
    step, match = found
    assert step == 5 and match.text == "«Fin»"
    assert match.start == 3, "the first byte of «, not the token that completed it"


def test_regex_phrases():
    tok = BYTE_LEVEL
    matcher = PhraseMatcher([re.compile(r"Chapter \d+"), regex.compile(r"(?i)the\s+end")], tok)
    ids = ids_of(tok, ["Once", " upon", " Chapter", " 1", "2", ".", " the", " end", "."])
    scans = stream(matcher, ids, prompt_length=2)
    # " Chapter": partial; " 1", "2": complete but a regex match at the text end waits for one more char.
    assert [s.hold for s in scans[:3]] == [1, 2, 3]
    assert scans[3].match == PhraseMatch(start=2, phrase=r"Chapter \d+", text="Chapter 12")
    assert scans[6].match == PhraseMatch(start=6, phrase=r"(?i)the\s+end", text="the end")
    # final=True: the end of the text confirms a pending match.
    last = matcher.scan(ids[:5], prompt_length=2, final=True)
    assert last.match is not None and last.match.text == "Chapter 12"
    with pytest.raises(ValueError, match="empty string"):
        PhraseMatcher([re.compile(r"x*")], tok)
    with pytest.raises(ValueError, match="bytes"):
        PhraseMatcher([re.compile(rb"x")], tok)  # type: ignore[list-item]


def test_prompt_and_new_tokens():
    tok = BYTE_LEVEL
    matcher = PhraseMatcher(["The End"], tok)
    ids = ids_of(tok, ["Once", " The", " End", ".", " The"])
    # Wholly in the prompt: ignored; the generated " The" is held, the prompt never is.
    assert matcher.scan(ids, prompt_length=4) == PhraseScan(None, 1)
    # Begun in the prompt, finished in the generated text: the first generated token is the start.
    scan = matcher.scan(ids[:4], prompt_length=2)
    assert scan.match is not None and scan.match.start == 2 and scan.hold == 2
    # A match the caller kept is not reported again by later calls...
    ids = ids_of(tok, ["Once", " The", " End", ".", " road", "."])
    found = PhraseMatch(start=1, phrase="The End", text="The End")
    assert matcher.scan(ids[:4], 1).match == found
    assert matcher.scan(ids[:5], 1).match is None and matcher.scan(ids, 1).match is None
    # ...unless the caller asks for every match in the tail.
    assert matcher.scan(ids, 1, new_tokens=None).match == found
    assert matcher.scan(ids, 1, new_tokens=3).match == found
    assert matcher.scan(ids[:1], 1) == PhraseScan(None, 0)


def test_scan_batch_matches_scan():
    tok = SENTENCEPIECE
    matcher = PhraseMatcher(["The End", "<|end_story|>"], tok)
    rows = [
        ids_of(tok, ["Once", " upon", " The", " End", "."]),
        ids_of(tok, ["Once", " upon", "<|", "end"]),
        ids_of(tok, ["Once"]),
        ids_of(tok, ["Once", " upon", " a", " time"] * 30 + [" The"]),
    ]
    prompts = [1, 1, 1, 2]
    assert matcher.scan_batch(rows, prompts) == [matcher.scan(r, p) for r, p in zip(rows, prompts)]
    tensor = torch.tensor([rows[0], rows[0][:3] + rows[1][2:4]])
    assert matcher.scan_batch(tensor, 1) == [matcher.scan(tensor[0], 1), matcher.scan(tensor[1], 1)]


def test_validation():
    tok = BYTE_LEVEL
    with pytest.raises(ValueError, match="phrases"):
        PhraseMatcher([], tok)
    with pytest.raises(ValueError, match="phrases"):
        PhraseMatcher("The End", tok)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="phrases"):
        PhraseMatcher(["  "], tok)
    with pytest.raises(ValueError, match="phrases"):
        PhraseMatcher([3], tok)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="tokenizer"):
        PhraseMatcher(["x"], object())
    with pytest.raises(ValueError, match="case_sensitive"):
        PhraseMatcher(["x"], tok, case_sensitive=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_match_chars"):
        PhraseMatcher(["x"], tok, max_match_chars=0)
    matcher = PhraseMatcher(["x"], tok)
    with pytest.raises(ValueError, match="prompt_length"):
        matcher.scan([1, 2], prompt_length=3)
    with pytest.raises(ValueError, match="new_tokens"):
        matcher.scan([1, 2], new_tokens=0)
    with pytest.raises(ValueError, match="token_ids"):
        matcher.scan(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="token_ids"):
        matcher.scan([1, -2])
    with pytest.raises(ValueError, match="prompt_length"):
        matcher.scan_batch([[1], [2]], prompt_length=[0])


class CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call received."""

    def __init__(self, inner):
        self.inner = inner
        self.sizes: list[int] = []

    def decode(self, ids, **kwargs):
        self.sizes.append(len(ids))
        return self.inner.decode(ids, **kwargs)


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_decodes_a_bounded_tail(name):
    tok = TOKENIZERS[name]
    counting = CountingTokenizer(tok)
    matcher = PhraseMatcher(default_end_phrases(tok), counting)
    body = ids_of(tok, ["Once", " upon", " a", " time", "."] * 600)
    tail = ids_of(tok, [" The", " E", "nd", "."])
    for n in range(1, len(tail) + 1):
        counting.sizes.clear()
        scan = matcher.scan(body + tail[:n], prompt_length=1)
        assert max(counting.sizes) <= 64, "only the tail is decoded"
    assert scan.match is not None and scan.match.start == len(body)
    # Single-character pieces: the window widens until it holds enough text, and stays bounded.
    counting.sizes.clear()
    letters = ids_of(tok, [*"abcdefghij" * 50, " The", " E", "nd", "."])
    scan = matcher.scan(letters, prompt_length=1)
    assert scan.match is not None and scan.match.start == 500
    assert max(counting.sizes) <= 128


# -- TinyStories: the spelled end marker --------------------------------------------------------------------


def test_tinystories_spelled_end_marker(tinystories_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tinystories_path)
    pieces = tok.convert_tokens_to_ids(["<|", "end", "_story", "|>"])
    assert tok.decode(pieces) == "<|end_story|>"
    prompt = tok("Once upon a time, there was a cat.").input_ids
    after = tok("It was fun.", add_special_tokens=False).input_ids
    ids = prompt + pieces + after
    matcher = PhraseMatcher(default_end_phrases(tok), tok)
    scans = stream(matcher, ids, prompt_length=len(prompt))
    assert [s.hold for s in scans[:4]] == [1, 2, 3, 4]
    found = first_match(scans)
    assert found is not None and found[0] == 3
    assert found[1] == PhraseMatch(start=len(prompt), phrase="<|end_story|>", text="<|end_story|>")


def test_tinystories_generated_markers_are_all_caught(tinystories):
    """A real Method 1 run spells <|end_story|> several times; streaming catches every one, once."""
    from perpetual_logits import SuppressEOSLogitsProcessor

    model, tok = tinystories
    torch.manual_seed(0)
    prompt = tok("Once upon a time", return_tensors="pt").input_ids
    out = model.generate(prompt, do_sample=True, max_new_tokens=200, logits_processor=[SuppressEOSLogitsProcessor(2)])
    ids = out[0].tolist()
    p = prompt.shape[1]
    text = tok.decode(ids[p:])
    expected = text.count("<|end_story|>")
    assert expected >= 2, "the model spells its end marker when EOS is suppressed"
    scans = stream(PhraseMatcher(default_end_phrases(tok, ending_phrases=False), tok), ids, p)
    starts = [s.match.start for s in scans if s.match is not None]
    assert len(starts) == expected
    for k, start in enumerate(starts):
        # The k-th marker begins in token `start`: before it there are k markers, from it on the rest.
        assert tok.decode(ids[p:start]).count("<|end_story|>") == k
        assert tok.decode(ids[start:]).count("<|end_story|>") == expected - k


# -- property: streaming agrees with a brute-force scan of the whole text --------------------------------


def _brute_force(matcher: PhraseMatcher, tok, ids: list[int], prompt_length: int) -> tuple[int, int] | None:
    """(step, start token) of the first confirmed match, decoding every prefix from the row's first token."""
    for n in range(prompt_length + 1, len(ids) + 1):
        text = tok.decode(ids[:n])
        body = text.rstrip("\ufffd")
        prompt_text = tok.decode(ids[:prompt_length])
        starts = []
        for item in matcher.compiled:
            for m in item.pattern.finditer(body):
                s, e = m.span()
                if e < len(body) or item.stable_at_end:
                    if e <= len(_common(prompt_text, text)):
                        continue
                    cut = max(
                        j
                        for j in range(n + 1)
                        if len(tok.decode(ids[:j])) <= s and text[:s].startswith(tok.decode(ids[:j]))
                    )
                    starts.append(max(cut, prompt_length))
        if starts:
            return n - prompt_length - 1, min(starts)
    return None


def _common(a: str, b: str) -> str:
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return a[:i]


STREAM_PIECES = [
    "The", " The", " End", "End", " E", "nd", "nd.", "less", ".", " ", "x", "T", "he", "e E", " road", "!",
    "\n", "<|", "end", "_story", "|>", "Fin", 0xC2, 0xAB, 0xBB, "Once", " upon",
    (" The", " End", "."), (" Th", "e E", "nd", "!"), ("<|", "end", "_story", "|>"),
    (" ", 0xC2, 0xAB, "Fin", 0xC2, 0xBB),
]  # fmt: skip


@pytest.mark.parametrize("name", list(TOKENIZERS))
@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    data=st.lists(st.sampled_from(STREAM_PIECES), min_size=1, max_size=40),
    filler=st.integers(0, 60),
)
def test_streaming_property(name, data, filler):
    tok = TOKENIZERS[name]
    matcher = PhraseMatcher(["The End", "<|end_story|>", "«Fin»"], tok)
    pieces = [q for item in data for q in (item if isinstance(item, tuple) else [item])]
    ids = ids_of(tok, ["Once"] + [" upon"] * filler + pieces)
    prompt_length = 1
    released = prompt_length
    reported = None
    for n in range(prompt_length + 1, len(ids) + 1):
        scan = matcher.scan(ids[:n], prompt_length)
        assert 0 <= scan.hold <= n - prompt_length
        if scan.match is not None:
            # The phrase was never shown: it starts at or after everything already released.
            assert scan.match.start >= released
            reported = (n - prompt_length - 1, scan.match.start)
            break
        # A streamer releases up to len - hold and never takes text back. (hold may reach over released
        # tokens when a decoder rewrites earlier text, e.g. a byte-fallback "»" that the next byte turns
        # into three U+FFFD; such text can never complete a phrase.)
        released = max(released, n - scan.hold)
    assert reported == _brute_force(matcher, tok, ids, prompt_length)
