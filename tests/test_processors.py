"""Methods 1 and 2 as LogitsProcessors: properties on random logits, and behaviour inside generate()."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import EOS, BoostEOS, tiny_model

from perpetual_logits import (
    Constant,
    LinearDecay,
    PostEOSResamplingLogitsProcessor,
    SuppressEOSLogitsProcessor,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def batches(draw: st.DrawFn) -> tuple[torch.Tensor, list[int], torch.dtype]:
    batch = draw(st.integers(1, 5))
    vocab = draw(st.integers(3, 80))
    eos = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=min(3, vocab - 1), unique=True))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(0.1, 20.0))
    gen = torch.Generator().manual_seed(seed)
    scores = (torch.randn(batch, vocab, generator=gen) * scale).to(dtype)
    return scores, eos, dtype


def ids_for(scores: torch.Tensor, length: int = 4) -> torch.Tensor:
    return torch.ones(scores.shape[0], length, dtype=torch.long)


# --- Method 1 ---------------------------------------------------------------------------------------------


@given(batches())
@settings(max_examples=60, deadline=None)
def test_suppress_never_eos_never_nan_keeps_dtype(case) -> None:
    scores, eos, dtype = case
    out = SuppressEOSLogitsProcessor(eos)(ids_for(scores), scores)
    assert out.dtype == dtype and out.shape == scores.shape
    assert not torch.isnan(out).any()
    assert torch.isneginf(out[:, eos]).all()
    keep = [i for i in range(scores.shape[1]) if i not in eos]
    assert torch.equal(out[:, keep], scores[:, keep])
    assert not torch.isin(out.argmax(-1), torch.tensor(eos)).any()


@given(batches())
@settings(max_examples=60, deadline=None)
def test_masking_equals_two_draws_without_replacement(case) -> None:
    """P(t) under the mask equals the blog's rule, computed draw by draw: first draw t, or first draw EOS
    and then t from what is left."""
    scores, eos, _ = case
    scores = scores.double()
    p = torch.softmax(scores, -1)
    masked = SuppressEOSLogitsProcessor(eos)(ids_for(scores), scores)
    q = torch.softmax(masked, -1)
    p_eos = p[:, eos].sum(-1, keepdim=True)
    # Draw until the token is not EOS (with several EOS ids, a geometric series of EOS draws).
    two_draws = p + p_eos * p / (1 - p_eos)
    two_draws[:, eos] = 0.0
    ok = (1 - p_eos.squeeze(-1)) > 1e-9
    assert torch.allclose(q[ok], two_draws[ok], atol=1e-9)
    greedy_expected = p.masked_fill(torch.isin(torch.arange(p.shape[1]), torch.tensor(eos)), -1).argmax(-1)
    assert torch.equal(masked.argmax(-1)[ok], greedy_expected[ok])


def test_row_with_only_eos_finite_is_left_unchanged() -> None:
    scores = torch.tensor([[float("-inf"), float("-inf"), 0.3, float("-inf")], [0.0, 1.0, 2.0, 3.0]])
    out = SuppressEOSLogitsProcessor([2, 3])(ids_for(scores), scores)
    assert torch.equal(out[0], scores[0])  # nothing else allowed: EOS stays possible, no NaN
    assert not torch.isnan(torch.softmax(out, -1)).any()
    assert torch.isneginf(out[1, 2:]).all()


def test_suppress_records_and_starts_clean_each_generate_call() -> None:
    model = tiny_model("llama")
    proc = SuppressEOSLogitsProcessor(EOS)
    ids = torch.tensor([[1, 5, 6]])
    model.generate(ids, do_sample=False, max_new_tokens=5, logits_processor=[BoostEOS(3.0), proc])
    assert len(proc.eos_probabilities[0]) == 5
    first = proc.eos_probabilities
    model.generate(torch.tensor([[1, 7, 8, 9]]), do_sample=False, max_new_tokens=3, logits_processor=[proc])
    assert len(proc.eos_probabilities[0]) == 3  # nothing carried over from the first call
    assert first != proc.eos_probabilities
    assert all(0.0 <= p <= 1.0 for p in proc.eos_probabilities[0])


def test_eos_top_steps_are_the_steps_where_eos_led() -> None:
    proc = SuppressEOSLogitsProcessor(2)
    top = torch.tensor([[0.0, 0.0, 9.0, 0.0]])
    low = torch.tensor([[0.0, 0.0, -9.0, 0.0]])
    for width, scores in enumerate([low, top, low, top], start=3):
        proc(torch.ones(1, width, dtype=torch.long), scores)
    assert proc.eos_top_steps == [[1, 3]]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"eos_token_id": -1}, "eos_token_id"),
        ({"eos_token_id": []}, "eos_token_id"),
        ({"eos_token_id": "2"}, "eos_token_id"),
        ({"eos_token_id": [1, 2.5]}, "eos_token_id"),
        ({"eos_token_id": True}, "eos_token_id"),
        ({"eos_token_id": 2, "record": "yes"}, "record"),
    ],
)
def test_suppress_rejects_bad_arguments(kwargs, name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}`"):
        SuppressEOSLogitsProcessor(**kwargs)


def test_eos_outside_vocabulary_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        SuppressEOSLogitsProcessor(10)(torch.ones(1, 2, dtype=torch.long), torch.zeros(1, 5))


def test_accepts_tensor_and_list_eos_ids() -> None:
    assert SuppressEOSLogitsProcessor(torch.tensor([3, 1])).eos_token_id == (1, 3)
    assert SuppressEOSLogitsProcessor([2, 2, 5]).eos_token_id == (2, 5)


# --- Method 2 ---------------------------------------------------------------------------------------------


@given(batches(), st.sampled_from(["sample", "argmax", 0.3]))
@settings(max_examples=60, deadline=None)
def test_post_eos_never_eos_never_nan_keeps_dtype(case, trigger) -> None:
    scores, eos, dtype = case
    proc = PostEOSResamplingLogitsProcessor(eos, schedule=LinearDecay(2.0, 3), trigger=trigger)
    for width in range(3, 7):
        out = proc(ids_for(scores, width), scores)
        assert out.dtype == dtype
        assert not torch.isnan(out).any()
        assert torch.isneginf(out[:, eos]).all()


def test_argmax_trigger_restarts_the_schedule_per_row() -> None:
    proc = PostEOSResamplingLogitsProcessor(2, schedule=LinearDecay(2.0, 2), trigger="argmax")
    eos_top = [0.0, 0.0, 9.0, 2.0]
    plain = [0.0, 0.0, -9.0, 2.0]
    steps = [
        torch.tensor([eos_top, plain]),  # row 0 evicts
        torch.tensor([plain, plain]),
        torch.tensor([plain, eos_top]),  # row 1 evicts
        torch.tensor([plain, plain]),
    ]
    seen = []
    for width, scores in enumerate(steps, start=4):
        out = proc(torch.ones(2, width, dtype=torch.long), scores)
        seen.extend((out[:, 3] / scores[:, 3]).tolist())
    # multiplier 2.0 at the eviction step, 1.5 one step later, then back to 1.0
    assert seen == pytest.approx([0.5, 1.0, 1 / 1.5, 1.0, 1.0, 0.5, 1.0, 1 / 1.5])
    assert proc.evictions == [[0], [2]]


def test_constant_schedule_lasts_forever_after_the_first_eviction_only() -> None:
    proc = PostEOSResamplingLogitsProcessor(2, schedule=Constant(1.5), trigger="argmax")
    eos_top = torch.tensor([[0.0, 0.0, 9.0, 3.0]])
    plain = torch.tensor([[0.0, 0.0, -9.0, 3.0]])
    factors = []
    for width, scores in enumerate([plain, eos_top, plain, plain, plain], start=4):
        out = proc(torch.ones(1, width, dtype=torch.long), scores)
        factors.append(round(3.0 / out[0, 3].item(), 6))
    assert factors == [1.0, 1.5, 1.5, 1.5, 1.5]
    assert proc.multiplier == pytest.approx([1.5])


def test_threshold_trigger() -> None:
    proc = PostEOSResamplingLogitsProcessor(0, schedule=Constant(2.0, steps=1), trigger=0.5)
    scores = torch.log(torch.tensor([[0.6, 0.4], [0.4, 0.6]]))
    out = proc(torch.ones(2, 3, dtype=torch.long), scores)
    assert out[:, 1].tolist() == pytest.approx([scores[0, 1].item() / 2, scores[1, 1].item()])


def test_sample_trigger_follows_torch_default_generator() -> None:
    scores = torch.log(torch.tensor([[0.5, 0.5]] * 64))

    def evictions(seed: int) -> list[list[int]]:
        proc = PostEOSResamplingLogitsProcessor(0, trigger="sample")
        torch.manual_seed(seed)
        proc(torch.ones(64, 3, dtype=torch.long), scores)
        return proc.evictions

    assert evictions(3) == evictions(3)
    rate = sum(len(e) for e in evictions(4)) / 64
    assert 0.25 < rate < 0.75  # an eviction happens with the EOS probability, here 0.5


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"trigger": "sometimes"}, "trigger"),
        ({"trigger": 0.0}, "trigger"),
        ({"trigger": 1.5}, "trigger"),
        ({"schedule": 2.0}, "schedule"),
        ({"eos_token_id": [-2]}, "eos_token_id"),
    ],
)
def test_post_eos_rejects_bad_arguments(kwargs, name: str) -> None:
    kwargs = {"eos_token_id": 2, **kwargs}
    with pytest.raises(ValueError, match=f"`{name}`"):
        PostEOSResamplingLogitsProcessor(**kwargs)


# --- inside generate() ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("method", ["suppress", "post-eos"])
def test_generate_never_emits_eos(arch: str, method: str) -> None:
    model = tiny_model(arch, eos=[EOS, 3])
    proc = (
        SuppressEOSLogitsProcessor([EOS, 3])
        if method == "suppress"
        else PostEOSResamplingLogitsProcessor([EOS, 3], trigger="sample")
    )
    torch.manual_seed(0)
    ids = torch.tensor([[1, 5, 6, 7]] * 4)
    out = model.generate(ids, do_sample=True, top_k=0, max_new_tokens=30, logits_processor=[BoostEOS(4.0), proc])
    generated = out[:, ids.shape[1] :]
    assert generated.shape == (4, 30)
    assert not torch.isin(generated, torch.tensor([EOS, 3])).any()
    baseline = model.generate(ids, do_sample=True, top_k=0, max_new_tokens=30, logits_processor=[BoostEOS(4.0)])
    assert torch.isin(baseline[:, ids.shape[1] :], torch.tensor([EOS, 3])).any()  # the boost does bite


def test_multiplier_composes_with_generate_temperature() -> None:
    """Effective temperature = T_config x schedule factor, visible in output_scores."""
    model = tiny_model("llama")
    proc = PostEOSResamplingLogitsProcessor(EOS, schedule=LinearDecay(2.0, 4), trigger="argmax")
    out = model.generate(
        torch.tensor([[1, 5, 6], [1, 9, 9]]),
        do_sample=True,
        top_k=0,
        temperature=0.7,
        max_new_tokens=12,
        logits_processor=[BoostEOS(2.5), proc],
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    evictions = proc.evictions
    assert any(evictions), "the boost should make EOS the argmax at some step"
    for row in range(2):
        last = None
        for step, (scores, raw) in enumerate(zip(out.scores, out.logits)):
            if step in evictions[row]:
                last = step
            factor = 1.0 if last is None else LinearDecay(2.0, 4)(step - last)
            boosted = raw[row].clone()
            boosted[EOS] = float("-inf")
            expected = boosted / (0.7 * factor)
            finite = torch.isfinite(expected)
            assert torch.allclose(scores[row][finite], expected[finite], atol=1e-5)
            assert torch.isneginf(scores[row][EOS])


# --- TinyStories-656K -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tinystories_baseline_ends_while_methods_1_and_2_never_do(tinystories) -> None:
    model, tokenizer = tinystories
    ids = tokenizer(["Once upon a time"] * 10, return_tensors="pt").input_ids
    eos = model.generation_config.eos_token_id
    torch.manual_seed(0)
    baseline = model.generate(ids, do_sample=True, max_new_tokens=512)
    ended = [(row == eos).any().item() for row in baseline[:, ids.shape[1] :]]
    assert all(ended), "every baseline story (10 seeds) ends with EOS within 512 tokens"

    for proc in (SuppressEOSLogitsProcessor(eos), PostEOSResamplingLogitsProcessor(eos)):
        torch.manual_seed(0)
        out = model.generate(ids, do_sample=True, max_new_tokens=300, logits_processor=[proc])
        generated = out[:, ids.shape[1] :]
        assert generated.shape[1] == 300
        assert not (generated == eos).any()
    assert sum(len(e) for e in proc.evictions) >= 10  # Method 2 evicted at least once per row on average


@pytest.mark.slow
def test_tinystories_method2_raises_temperature_after_evictions(tinystories) -> None:
    model, tokenizer = tinystories
    eos = model.generation_config.eos_token_id
    proc = PostEOSResamplingLogitsProcessor(eos, schedule=LinearDecay(2.0, 10), trigger="sample")
    torch.manual_seed(1)
    out = model.generate(
        tokenizer(["Once upon a time"] * 4, return_tensors="pt").input_ids,
        do_sample=True,
        top_k=0,
        max_new_tokens=300,
        logits_processor=[proc],
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    checked = 0
    for row, steps in enumerate(proc.evictions):
        for step in steps:
            raw, scores = out.logits[step][row], out.scores[step][row]
            keep = torch.isfinite(scores)
            # at an eviction the scores are the raw logits over the peak multiplier: temperature 2.0
            ratio = raw[keep] / scores[keep]
            assert torch.allclose(ratio, torch.full_like(ratio, 2.0), rtol=1e-4)
            checked += 1
    assert checked >= 4


# --- the cheap paths (issue 19 item 9): the same results as the general path --------------------------------
@given(
    batch=st.integers(1, 3),
    peak=st.floats(1.1, 4.0),
    length=st.integers(1, 6),
    tops=st.lists(st.lists(st.booleans(), min_size=3, max_size=3), min_size=1, max_size=14),
)
@settings(max_examples=60, deadline=None)
def test_method2_multiplier_follows_each_rows_schedule_step_by_step(
    batch: int, peak: float, length: int, tops: list[list[bool]]
) -> None:
    """Steps where no row is hot take a shortcut on the CPU; every step must still use each row's multiplier."""
    schedule = LinearDecay(peak, length)
    proc = PostEOSResamplingLogitsProcessor(EOS, schedule=schedule, trigger="argmax")
    last: list[int | None] = [None] * batch
    for step, top in enumerate(tops):
        scores = torch.tensor([[0.0, 1.0, 9.0 if top[b] else -9.0, 3.0] for b in range(batch)])
        out = proc(torch.ones(batch, 4 + step, dtype=torch.long), scores)
        for b in range(batch):
            if top[b]:
                last[b] = step
            since = None if last[b] is None else step - last[b]
            expected = 1.0 if since is None or since >= length else schedule.factor(since)
            assert out[b, 3].item() == pytest.approx(3.0 / expected, rel=1e-5), (step, b)
            assert out[b, EOS].item() == float("-inf")


@pytest.mark.parametrize("hot", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_method2_row_with_only_eos_finite_keeps_it(batch: int, hot: bool) -> None:
    proc = PostEOSResamplingLogitsProcessor(EOS, schedule=LinearDecay(2.0, 3), trigger="argmax")
    if hot:  # an eviction first: the next steps divide by the multiplier
        proc(torch.ones(batch, 4, dtype=torch.long), torch.tensor([[0.0, 0.0, 9.0, 1.0]] * batch))
    lone = [float("-inf"), float("-inf"), 0.4, float("-inf")]
    scores = torch.tensor([lone, [0.0, 1.0, 2.0, 3.0]][:batch])
    out = proc(torch.ones(batch, 4 + hot, dtype=torch.long), scores)
    assert out[0, EOS].item() == pytest.approx(0.4 / 2.0)  # a lone EOS is on top: an eviction, at the peak
    assert not torch.isnan(torch.softmax(out, -1)).any()
    if batch == 2:
        assert out[1, EOS].item() == float("-inf")
