"""RepetitionLoopCriteria and EvictionBudgetCriteria, by hand, inside plain generate(), as a guard of backstep
generation, and on TinyStories-656K."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import tiny_model
from transformers import LogitsProcessor, StoppingCriteriaList

import perpetual_logits as pl
from perpetual_logits import BackstepConfig, PostEOSResamplingLogitsProcessor, make_perpetual
from perpetual_logits.criteria import EventSource, EvictionBudgetCriteria, RepetitionLoopCriteria

PAD = 0


class ForceTokens(LogitsProcessor):
    """Row b's token at generated step s is ``plan[b][s]`` (everything else at -inf)."""

    def __init__(self, plan: list[list[int]], prompt_length: int) -> None:
        self.plan = plan
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        out = torch.full_like(scores, float("-inf"))
        for b, tokens in enumerate(self.plan):
            out[b, tokens[step % len(tokens)]] = 0.0
        return out


# -- RepetitionLoopCriteria ---------------------------------------------------------------------------------


def test_loop_by_hand():
    crit = RepetitionLoopCriteria(min_span=2, max_span=5, repeats=3)
    rows = torch.tensor(
        [
            [1, 2, 3, 4, 5, 6, 4, 5, 6, 4, 5, 6],  # span 3, three times
            [1, 2, 3, 4, 5, 6, 4, 5, 6, 4, 5, 7],  # broken
            [9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9],  # one token repeated: periodic for every span
            [1, 2, 3, 4, 5, 6, 7, 8, 3, 4, 3, 4],  # span 2 twice, not three times
            [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2],  # span 5: twice (3 4 5 1 2), not three times
        ]
    )
    assert crit(rows, None).tolist() == [True, False, True, False, False]
    assert RepetitionLoopCriteria(min_span=2, max_span=5, repeats=2)(rows, None).tolist() == [
        True, False, True, True, True,
    ]  # fmt: skip
    # min_span excludes short stutters: 9 9 9 is not a loop when spans start at 4 and 3 copies need 12 tokens.
    assert RepetitionLoopCriteria(min_span=4, max_span=4, repeats=3)(rows[2:3, :11], None).tolist() == [False]
    # Too short for any span: never stops.
    assert RepetitionLoopCriteria()(rows[:, :3], None).tolist() == [False] * 5


def test_loop_ignores_the_prompt():
    prompt = [7, 8, 7, 8, 7, 8]
    ids = torch.tensor([[*prompt, 7, 8]])  # the model continues the prompt's pattern for two tokens
    assert RepetitionLoopCriteria(min_span=2, max_span=4, repeats=3)(ids, None).tolist() == [True]
    with_prompt = RepetitionLoopCriteria(min_span=2, max_span=4, repeats=3, prompt_length=len(prompt))
    assert with_prompt(ids, None).tolist() == [False]
    assert with_prompt(torch.tensor([[*prompt, 1, 2, 1, 2, 1, 2]]), None).tolist() == [True]


def brute_force_loop(row: list[int], min_span: int, max_span: int, repeats: int) -> bool:
    for p in range(min_span, max_span + 1):
        if p * repeats <= len(row):
            tail = row[len(row) - p * repeats :]
            if tail == tail[:p] * repeats:
                return True
    return False


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    rows=st.lists(st.lists(st.integers(0, 2), min_size=12, max_size=12), min_size=1, max_size=4),
    min_span=st.integers(1, 4),
    extra=st.integers(0, 3),
    repeats=st.integers(2, 4),
)
def test_loop_matches_brute_force(rows, min_span, extra, repeats):
    crit = RepetitionLoopCriteria(min_span=min_span, max_span=min_span + extra, repeats=repeats)
    out = crit(torch.tensor(rows), None)
    assert out.shape == (len(rows),) and out.dtype == torch.bool
    assert out.tolist() == [brute_force_loop(r, min_span, min_span + extra, repeats) for r in rows]


def test_loop_stops_a_row_in_generate():
    model = tiny_model("llama")
    prompt = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]])
    plan = [[10, 11, 12], list(range(10, 50))]  # row 0 cycles with period 3, row 1 never repeats
    crit = RepetitionLoopCriteria(min_span=2, max_span=8, repeats=3, prompt_length=4)
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=30,
        logits_processor=[ForceTokens(plan, 4)],
        stopping_criteria=StoppingCriteriaList([crit]),
        pad_token_id=PAD,
        eos_token_id=2,
    )
    generated = out[:, 4:].tolist()
    assert generated[0][:9] == [10, 11, 12] * 3
    assert generated[0][9:] == [PAD] * 21, "row 0 stopped after three copies of its span"
    assert generated[1] == list(range(10, 40))


def test_loop_leaves_normal_stories_alone(tinystories):
    model, tok = tinystories
    prompt = tok("Once upon a time", return_tensors="pt").input_ids
    p = prompt.shape[1]
    crit = RepetitionLoopCriteria(prompt_length=p)
    for seed in range(4):
        torch.manual_seed(seed)
        ids = model.generate(prompt, do_sample=True, max_new_tokens=200)
        assert ids.shape[1] - p >= 40, "a real story"
        fired = [bool(crit(ids[:, :n], None)[0]) for n in range(p + 1, ids.shape[1] + 1)]
        assert not any(fired), tok.decode(ids[0, p:])


def test_loop_validation():
    with pytest.raises(ValueError, match="min_span"):
        RepetitionLoopCriteria(min_span=0)
    with pytest.raises(ValueError, match="max_span"):
        RepetitionLoopCriteria(min_span=4, max_span=3)
    with pytest.raises(ValueError, match="repeats"):
        RepetitionLoopCriteria(repeats=1)
    with pytest.raises(ValueError, match="prompt_length"):
        RepetitionLoopCriteria(prompt_length=-1)
    with pytest.raises(ValueError, match="input_ids"):
        RepetitionLoopCriteria()(torch.zeros(3, dtype=torch.long), None)


# -- EvictionBudgetCriteria ---------------------------------------------------------------------------------


class Counts:
    def __init__(self, counts: list[int]) -> None:
        self.counts = counts

    def event_counts(self, batch_size: int) -> list[int]:
        return self.counts


def test_budget_with_event_counts():
    source = Counts([0, 3, 5])
    assert isinstance(source, EventSource)
    budget = EvictionBudgetCriteria(source, max_events=3)
    ids = torch.zeros(3, 4, dtype=torch.long)
    assert budget(ids, None).tolist() == [False, True, True]
    source.counts = [1, 2]
    with pytest.raises(ValueError, match="rows"):
        budget(ids, None)


def test_budget_validation():
    with pytest.raises(ValueError, match="source"):
        EvictionBudgetCriteria(object(), 2)
    with pytest.raises(ValueError, match="max_events"):
        EvictionBudgetCriteria(Counts([0]), 0)


class BoostEOS(LogitsProcessor):
    """Makes EOS the top token of row 0 at the given generated steps."""

    def __init__(self, steps: set[int], prompt_length: int) -> None:
        self.steps = steps
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, PAD] = float("-inf")  # so that a generated PAD cannot look like a stopped row
        if input_ids.shape[1] - self.prompt_length in self.steps:
            scores[0, 2] = 1e4
        return scores


def test_budget_stops_a_row_after_k_evictions_in_generate():
    model = tiny_model("llama")
    prompt = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]])
    resample = PostEOSResamplingLogitsProcessor(2, trigger="argmax")
    budget = EvictionBudgetCriteria(resample, max_events=2)
    assert budget.counts(2) == [0, 0]  # before generation the processor has no records
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=20,
        logits_processor=[BoostEOS({2, 5, 8}, 4), resample],
        stopping_criteria=StoppingCriteriaList([budget]),
        pad_token_id=PAD,
        eos_token_id=2,
    )
    generated = out[:, 4:]
    # Evictions at steps 2 and 5: row 0 stops right after the token that replaced the second EOS.
    assert resample.evictions[0][:2] == [2, 5]
    assert (generated[0, 6:] == PAD).all() and (generated[0, :6] != PAD).all()
    assert (generated[1] != PAD).all() and generated.shape[1] == 20
    assert budget.counts(2)[1] == 0


# --- guards ------------------------------------------------------------------------------------------------


def test_budget_criterion_reads_live_backstep_counts() -> None:
    model = make_perpetual(tiny_model("llama"))

    class Boost(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            out = scores.clone()
            out[:, 2] += 4.0
            return out  # type: ignore[return-value]

    torch.manual_seed(0)
    out = model.generate(
        torch.tensor([[1, 5, 6]]),
        do_sample=True,
        top_k=0,
        max_new_tokens=200,
        logits_processor=[Boost()],
        stopping_criteria=[pl.EvictionBudgetCriteria(model, max_events=3)],
        backstep=BackstepConfig(n_remove=2),
        return_dict_in_generate=True,
    )
    assert len(out.backstep_events[0]) == 3
    assert out.sequences.shape[1] - 3 < 200  # stopped by the budget, not by max_new_tokens


@pytest.mark.slow
def test_tinystories_loop_criterion_leaves_a_story_alone(tinystories) -> None:
    model, tokenizer = tinystories
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    criterion = pl.RepetitionLoopCriteria(min_span=2, max_span=16, repeats=3, prompt_length=ids.shape[1])
    for seed in range(3):
        torch.manual_seed(seed)
        plain = model.generate(ids, do_sample=True, max_new_tokens=300)
        torch.manual_seed(seed)
        guarded = model.generate(ids, do_sample=True, max_new_tokens=300, stopping_criteria=[criterion])
        assert torch.equal(plain, guarded)
