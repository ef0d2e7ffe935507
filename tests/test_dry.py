"""DRYLogitsProcessor: the penalty matches a brute-force definition, breakers end repeats, generate() works."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import tiny_model, tiny_tokenizer

from perpetual_logits.analysis.metrics import rep_n
from perpetual_logits.dry import DRYLogitsProcessor, dry_penalties


def brute_force(ids: list[int], allowed: int, breakers: set[int]) -> dict[int, int]:
    """Straight from the definition: for every earlier position j followed by token ids[j + 1], the longest
    m such that ids[j - m + 1 : j + 1] == ids[-m:] and the suffix holds no breaker."""
    n = len(ids)
    limit = next((n - 1 - k for k in range(n - 1, -1, -1) if ids[k] in breakers), n)
    out: dict[int, int] = {}
    for j in range(n - 1):
        m = 0
        while m < min(j + 1, limit) and ids[j - m] == ids[n - 1 - m]:
            m += 1
        token = ids[j + 1]
        if m >= allowed and token not in breakers:
            out[token] = max(out.get(token, 0), m)
    return out


@settings(max_examples=400, deadline=None)
@given(
    ids=st.lists(st.integers(0, 4), max_size=40),
    allowed=st.integers(1, 4),
    breakers=st.sets(st.integers(0, 4), max_size=2),
)
def test_penalties_match_the_definition(ids, allowed, breakers):
    assert dry_penalties(ids, allowed, breakers) == brute_force(ids, allowed, breakers)


def test_processor_applies_the_exponential_penalty_per_row():
    dry = DRYLogitsProcessor(multiplier=0.5, base=3.0, allowed_length=1, sequence_breakers={9})
    ids = torch.tensor([[1, 2, 3, 1, 2], [1, 2, 9, 1, 2], [4, 5, 6, 7, 8]])
    out = dry(ids, torch.zeros(3, 10))
    # Row 0: suffix "1 2" occurred before "3": length 2 -> 0.5 * 3 ** 1; also "2" alone preceded... only 3.
    assert out[0, 3].item() == pytest.approx(-1.5)
    # Row 1: the earlier "1 2" is followed by the breaker 9, which is never penalised.
    assert out[1].abs().sum().item() == 0.0
    assert out[2].abs().sum().item() == 0.0  # no repeat at all: scores untouched
    scores = torch.randn(3, 10)
    same = DRYLogitsProcessor()(torch.tensor([[1, 2, 3]] * 3), scores)
    assert same is scores  # nothing to penalise: no copy made


def test_penalty_last_n_limits_the_window():
    ids = torch.tensor([[1, 2, 3, 7, 7, 7, 7, 1, 2]])
    assert DRYLogitsProcessor(allowed_length=2)(ids, torch.zeros(1, 10))[0, 3] < 0
    assert DRYLogitsProcessor(allowed_length=2, penalty_last_n=6)(ids, torch.zeros(1, 10))[0, 3] == 0


def test_reduces_verbatim_repetition_in_generate():
    model = tiny_model("llama")
    prompt = torch.tensor([[1, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]])
    kw = {"do_sample": False, "max_new_tokens": 60, "pad_token_id": 0, "eos_token_id": 63}
    plain = model.generate(prompt, **kw)[0, prompt.shape[1] :].tolist()
    dry = model.generate(prompt, logits_processor=[DRYLogitsProcessor(multiplier=2.0)], **kw)
    dry_ids = dry[0, prompt.shape[1] :].tolist()
    assert rep_n(dry_ids, 4) < rep_n(plain, 4)


def test_from_tokenizer_and_validation():
    tok = tiny_tokenizer()
    dry = DRYLogitsProcessor.from_tokenizer(tok, breakers=["z"])
    assert dry.sequence_breakers == {tok.convert_tokens_to_ids("z")}
    for kwargs, name in [
        ({"multiplier": 0}, "multiplier"),
        ({"base": 1.0}, "base"),
        ({"allowed_length": 0}, "allowed_length"),
        ({"sequence_breakers": "\n"}, "sequence_breakers"),
        ({"sequence_breakers": [-1]}, "sequence_breakers"),
        ({"penalty_last_n": 0}, "penalty_last_n"),
    ]:
        with pytest.raises(ValueError, match=f"`{name}`"):
            DRYLogitsProcessor(**kwargs)
    with pytest.raises(ValueError, match="`breakers`"):
        DRYLogitsProcessor.from_tokenizer(tok, breakers="\n")
    with pytest.raises(ValueError, match="`input_ids`"):
        DRYLogitsProcessor()(torch.zeros(3, dtype=torch.long), torch.zeros(1, 5))  # type: ignore[arg-type]
