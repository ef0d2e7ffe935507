"""Backstep on the HF backend at its edges (issue 19 items 1, 3, 4, 5): batches with an ``inputs_embeds``
prompt, processors that read the rows' tokens, a huge ``n_remove`` and a static cache sized like stock
``generate()``'s."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import EOS, PAD, BoostEOS, tiny_model
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation import logits_process as lp

from perpetual_logits import BackstepConfig, _compat, make_perpetual


class BoostEOSOnRows(LogitsProcessor):
    """Raises EOS by ``amount`` on the listed batch rows only."""

    def __init__(self, rows: list[int], amount: float) -> None:
        self.rows, self.amount = rows, amount

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores.clone()
        out[self.rows, EOS] += self.amount
        return out  # type: ignore[return-value]


# -- item 1: inputs_embeds prompts in a batch --------------------------------------------------------------------
@given(
    lengths=st.lists(st.integers(1, 5), min_size=2, max_size=3),
    forced=st.lists(st.booleans(), min_size=3, max_size=3).filter(any),
    amount=st.sampled_from([2.0, 4.0, 100.0]),
    n_remove=st.integers(1, 4),
    logits_buffer=st.sampled_from([None, 1, 2]),
    seed=st.integers(0, 50),
)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_inputs_embeds_batches_rewind_exactly(
    lengths: list[int], forced: list[bool], amount: float, n_remove: int, logits_buffer: int | None, seed: int
) -> None:
    model = make_perpetual(tiny_model("llama", seed=seed % 3))
    embed = model.get_input_embeddings()
    width = max(lengths)
    prompts = [[1] + [4 + (seed + 3 * i + j) % 50 for j in range(n - 1)] for i, n in enumerate(lengths)]
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = (ids != PAD).long()
    rows = [b for b in range(len(prompts)) if forced[b]]
    new = 10
    with torch.no_grad():
        out = model.generate(
            inputs_embeds=embed(ids),
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new,
            logits_processor=[BoostEOSOnRows(rows, amount)],
            backstep=BackstepConfig(n_remove=n_remove, max_backsteps=4, logits_buffer=logits_buffer),
            return_dict_in_generate=True,
            output_logits=True,
        )
    assert out.sequences.shape == (len(prompts), new)
    for b, prompt in enumerate(prompts):
        generated = out.sequences[b].tolist()
        with torch.no_grad():
            fresh = model(inputs_embeds=embed(torch.tensor([prompt + generated]))).logits[0, len(prompt) - 1 : -1]
        recorded = torch.stack([step[b] for step in out.logits])
        assert (recorded - fresh).abs().max() <= 1e-4, f"row {b} is not what its tokens give"


def test_inputs_embeds_batch_where_one_row_rewinds_to_its_first_token() -> None:
    """The case the adversarial pass found: two rows, all-ones mask, EOS raised on row 0 only."""
    model = make_perpetual(tiny_model("llama"))
    prompt = torch.tensor([[1, 5, 6, 7], [1, 9, 3, 4]])
    embeds = model.get_input_embeddings()(prompt)
    kwargs = {"do_sample": False, "max_new_tokens": 8, "backstep": BackstepConfig(n_remove=2, max_backsteps=3)}
    batch = model.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones(2, 4, dtype=torch.long),
        logits_processor=[BoostEOSOnRows([0], 100.0)],
        return_dict_in_generate=True,
        **kwargs,
    )
    assert len(batch.backstep_events[0]) == 3 and not batch.backstep_events[1]
    for b in range(2):
        solo = model.generate(
            inputs_embeds=embeds[b : b + 1], logits_processor=[BoostEOSOnRows([0] if b == 0 else [], 100.0)], **kwargs
        )
        assert batch.sequences[b].tolist() == solo[0].tolist()


# -- item 3: processors that read the tokens see each row's own ---------------------------------------------------
PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 9, 3], [1, 4, 4, 11, 12], [1, 7, 7, 7]]


TOKEN_READERS = {
    "repetition_penalty": lambda: {"repetition_penalty": 1.6, "logits_processor": [BoostEOS(1.5)]},
    "repetition_reward": lambda: {"repetition_penalty": 0.8, "logits_processor": [BoostEOS(3.0)]},
    "no_repeat_ngram_size": lambda: {"no_repeat_ngram_size": 2, "logits_processor": [BoostEOS(1.5)]},
}


@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "equal-prompts"])
@pytest.mark.parametrize("name", list(TOKEN_READERS))
def test_token_reading_processors_see_each_rows_own_tokens(name: str, padded: bool) -> None:
    """Greedy: a batch row equals its solo run; the padding before a rewound row is not its text (with pad = EOS,
    a penalty that counted it would penalise EOS in that row)."""
    model = make_perpetual(tiny_model("llama", attn="sdpa"))
    prompts = PROMPTS if padded else [p[:3] for p in PROMPTS]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = (ids != PAD).long()
    cfg = BackstepConfig(n_remove=3, max_backsteps=5)
    kwargs = {"do_sample": False, "max_new_tokens": 24, "pad_token_id": EOS, "backstep": cfg, **TOKEN_READERS[name]()}
    batch = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **kwargs)
    assert len({tuple(e.step for e in events) for events in batch.backstep_events}) > 1, "rows rewind apart"
    for i in range(len(prompts)):
        kwargs = {
            "do_sample": False,
            "max_new_tokens": 24,
            "pad_token_id": EOS,
            "backstep": cfg,
            **TOKEN_READERS[name](),
        }
        solo = model.generate(ids[i : i + 1], attention_mask=mask[i : i + 1], **kwargs)
        generated = solo[0, width:].tolist()
        assert batch.sequences[i, width : width + len(generated)].tolist() == generated, f"row {i} differs"


def _token_readers() -> list[LogitsProcessor]:
    from perpetual_logits import DRYLogitsProcessor

    return [
        lp.RepetitionPenaltyLogitsProcessor(2.0),
        lp.RepetitionPenaltyLogitsProcessor(2.0, prompt_ignore_length=torch.tensor([0, 1, 0, 2])),
        lp.SequenceBiasLogitsProcessor({(PAD, PAD, 5): 4.0, (9,): -1.0}),
        lp.NoBadWordsLogitsProcessor([[PAD, PAD, 6]], eos_token_id=EOS),
        DRYLogitsProcessor(1.0, 2.0, 1, penalty_last_n=4),
    ]


@pytest.mark.parametrize("index", range(5))
def test_every_token_reader_judges_a_shorter_row_by_its_own_tokens(index: int) -> None:
    """The wrapped processor gives each row exactly what it gives that row alone; unwrapped, the padding before
    the shorter rows counts as their text."""
    from perpetual_logits.processor_list import per_row_lengths

    own = [[1, 5, 9, 5, 7, 9, 5, EOS, 5], [PAD, 7, PAD], [PAD], [3, 4, 5, 6, 5]]
    lens = [len(row) for row in own]
    width = max(lens)
    padded = torch.tensor([[PAD] * (width - len(row)) + row for row in own])
    scores = torch.linspace(-3.0, 3.0, 4 * 12).reshape(4, 12)
    processor = _token_readers()[index]
    expected = []
    for b, row in enumerate(own):
        alone = copy.deepcopy(processor)
        ignore = getattr(alone, "prompt_ignore_length", None)
        if isinstance(ignore, torch.Tensor):
            alone.prompt_ignore_length = ignore[b : b + 1]
        expected.append(alone(torch.tensor([row]), scores[b : b + 1].clone())[0])
    wrapped = per_row_lengths(LogitsProcessorList([copy.deepcopy(processor)]), lambda: lens)
    assert torch.equal(wrapped(padded, scores.clone()), torch.stack(expected))
    assert not torch.equal(processor(padded, scores.clone()), torch.stack(expected)), "padding matters here"


# -- item 4: a huge n_remove allocates nothing for it ---------------------------------------------------------
def test_a_huge_n_remove_runs_like_one_that_removes_everything() -> None:
    """(2**31 + 1) buffered positions of logits would be hundreds of GB: the buffer holds what the run can use."""
    model = make_perpetual(tiny_model("llama"))
    ids = torch.tensor([[1, 5, 6, 7], [1, 9, 3, 4]])
    kwargs = {"do_sample": False, "max_new_tokens": 12, "logits_processor": [BoostEOS(2.5)]}
    huge = model.generate(ids, backstep=BackstepConfig(n_remove=2**31, max_backsteps=3), **kwargs)
    events = model.last_backstep[0]
    whole = model.generate(ids, backstep=BackstepConfig(n_remove=13, max_backsteps=3), **kwargs)
    assert any(events), "rows rewind"
    assert torch.equal(huge, whole)


# -- item 5: a StaticCache sized like stock generate()'s --------------------------------------------------------
CACHE = _compat.output_cache_field()  # the cache argument: `cache` after transformers 5.18, `past_key_values` before


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_a_static_cache_sized_like_stock_generate_works_alone_and_is_refused_up_front_in_a_batch(batch: int) -> None:
    from transformers import StaticCache

    model = make_perpetual(tiny_model("llama", attn="sdpa"))
    prompts = [[1, 5, 6, 7, 8, 9], [1, 9, 3], [1, 4, 4, 11, 12]][:batch]
    width, new = max(map(len, prompts)), 16
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    kwargs = {
        "attention_mask": (ids != PAD).long(),
        "do_sample": False,
        "max_new_tokens": new,
        "logits_processor": [BoostEOS(2.5)],
        "backstep": BackstepConfig(n_remove=3, max_backsteps=6),
    }
    expected = model.generate(ids, **kwargs)
    assert any(model.last_backstep[0]), "rows rewind"
    stock_size = StaticCache(config=model.config, max_cache_len=width + new - 1)
    if batch == 1:
        assert torch.equal(model.generate(ids, **{CACHE: stock_size}, **kwargs), expected)
        return
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    with pytest.raises(ValueError, match=f"max_cache_len >= {width + new} .*got {width + new - 1}"):
        model.generate(ids, **{CACHE: stock_size}, **kwargs)
    assert len(forwards) <= 1, "refused before any token is generated"
    one_more = StaticCache(config=model.config, max_cache_len=width + new)
    assert torch.equal(model.generate(ids, **{CACHE: one_more}, **kwargs), expected)
