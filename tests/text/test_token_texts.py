"""TokenTexts: the text a token adds after its neighbour, learned once per token where the decoder allows it."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import source_module
from test_matcher import BYTE_LEVEL, SENTENCEPIECE
from tokenizers import Tokenizer, decoders, models

from perpetual_logits.text.text_stream import TokenTexts, _reads_tokens_alone, rust_backend


def _fresh_text(tokenizer, neighbour: int, token: int) -> str | None:
    """What the pair reads as, decoded now (nothing kept)."""
    return TokenTexts(tokenizer).relative(neighbour, [token])


@pytest.fixture(params=["byte_level", "sentencepiece", "tinystories"])
def tokenizer(request):
    if request.param == "tinystories":
        return request.getfixturevalue("story_tokenizer")
    return BYTE_LEVEL if request.param == "byte_level" else SENTENCEPIECE


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_pair_reads_as_its_own_decode_after_other_pairs_taught_the_token(tokenizer, data) -> None:
    """Whatever pairs came before (they teach each plain token its text after a plain neighbour), every pair --
    byte-fallback pieces, bytes of unfinished characters and special tokens included -- reads exactly as
    decoding that pair says."""
    assert TokenTexts(tokenizer).local  # all three decoders read tokens on their own
    token = st.integers(0, len(tokenizer) - 1)
    texts = TokenTexts(tokenizer)
    neighbour, last = data.draw(token, label="neighbour"), data.draw(token, label="token")
    often = st.one_of(token, st.just(last))  # earlier pairs often end with the token: its text is then known
    for before, after in data.draw(st.lists(st.tuples(token, often), max_size=20), label="earlier pairs"):
        texts.after_pair(before, after)
    known = texts.known(neighbour, last)
    found = texts.after_pair(neighbour, last)
    assert found == _fresh_text(tokenizer, neighbour, last)
    assert known is None or known == found


def test_a_plain_token_is_decoded_once_whatever_its_neighbours(story_tokenizer) -> None:
    """Once each token of a text was read after some plain neighbour, any pair of them -- pairs never seen
    included -- is read without a decode."""
    ids = story_tokenizer(" the dog ran to the park and the cat sat", add_special_tokens=False).input_ids
    unseen = [(a, b) for a in ids for b in ids if (a, b) not in set(pairwise(ids))]
    # Decodes are counted on the Python source (a compiled class's methods cannot be replaced) ...
    texts = source_module(TokenTexts.__module__).TokenTexts(story_tokenizer)
    for neighbour, token in pairwise(ids):
        texts.after_pair(neighbour, token)
    calls = []
    decode = texts.decode
    texts.decode = lambda batch: calls.append(batch) or decode(batch)
    assert [texts.known(a, b) for a, b in unseen] == [texts.after_pair(a, b) for a, b in unseen]
    assert all(texts.known(a, b) == _fresh_text(story_tokenizer, a, b) for a, b in unseen)
    assert calls == []
    # ... and the package's own (compiled or not) knows the same pairs after the same reads.
    used = TokenTexts(story_tokenizer)
    for neighbour, token in pairwise(ids):
        used.after_pair(neighbour, token)
    assert [used.known(a, b) for a, b in unseen] == [texts.known(a, b) for a, b in unseen]


def test_decoders_not_known_to_read_tokens_alone_keep_one_text_per_pair() -> None:
    """A decoder outside the known ones (WordPiece here), a Replace of more than one character (it could span two
    tokens) or a Strip at the end (it touches whichever token is last) is decoded per pair."""
    vocab = {"<unk>": 0, "a": 1, "b": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    for decoder in (
        decoders.WordPiece(),
        decoders.Replace("ab", "x"),
        decoders.Sequence([decoders.Fuse(), decoders.Strip(" ", 0, 1)]),
    ):
        tok.decoder = decoder
        assert not _reads_tokens_alone(rust_backend(tok))
        texts = TokenTexts(tok)
        texts.after_pair(1, 2)
        assert texts.follows == {} and (1 << 32 | 2) in texts.after
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    assert _reads_tokens_alone(rust_backend(tok))
