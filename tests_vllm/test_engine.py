"""Methods 1-4 on a real vLLM engine (SmolLM2-135M-Instruct, one engine for the module)."""

from __future__ import annotations

import pytest
from vllm import SamplingParams

import perpetual_logits as pl
import perpetual_logits.vllm as plv
from perpetual_logits.text.endings import default_end_phrases
from perpetual_logits.text.matcher import PhraseMatcher

MAX = 96
SEED = 104  # with these prompts at temperature 0.7, plain vLLM ends every answer with EOS in 8-50 tokens


def params(seed: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.7, top_k=0, max_tokens=MAX, seed=seed, **kwargs)


@pytest.fixture(scope="module")
def baseline(llm, prompts):
    """Plain vLLM: every prompt is answered and ends with EOS well before MAX tokens."""
    outs = llm.generate(prompts, [params(SEED + i) for i in range(len(prompts))], use_tqdm=False)
    eos = set(plv.eos_token_ids(llm))
    ends = [(len(o.outputs[0].token_ids), o.outputs[0].token_ids[-1] in eos) for o in outs]
    assert all(ended and n < MAX for n, ended in ends), ends  # the premise of the tests below
    return [list(o.outputs[0].token_ids) for o in outs]


def test_method1_writes_to_max_tokens_without_eos(llm, prompts, baseline):
    eos = set(plv.eos_token_ids(llm))
    outs = llm.generate(prompts, params(7, extra_args=plv.suppress_eos()), use_tqdm=False)
    for out in outs:
        ids = out.outputs[0].token_ids
        assert len(ids) == MAX and not eos & set(ids)


def test_method2_in_a_mixed_batch_leaves_plain_requests_as_they_were(llm, prompts, baseline):
    eos = set(plv.eos_token_ids(llm))
    method2 = plv.resample_eos(schedule=pl.LinearDecay(2.0, 10), seed=0)
    # Even rows use Method 2, odd rows are plain requests with the baseline's seeds.
    mixed = [params(200 + i, extra_args=method2) if i % 2 == 0 else params(SEED + i) for i in range(len(prompts))]
    outs = llm.generate(prompts, mixed, use_tqdm=False)
    for i, out in enumerate(outs):
        ids = list(out.outputs[0].token_ids)
        if i % 2 == 0:
            assert len(ids) == MAX and not eos & set(ids)
        else:
            assert ids == baseline[i]


def test_driver_with_nothing_to_do_equals_plain_vllm(llm, prompts, baseline):
    each = [params(SEED + i) for i in range(len(prompts))]
    plain = plv.generate(llm, prompts, each)
    assert [o.token_ids for o in plain] == baseline
    assert all(not o.backstep_events for o in plain)
    # No backstep budget and on_exhausted="stop": every EOS ends its request, as in plain vLLM.
    spent = plv.generate(llm, prompts, each, backstep=pl.BackstepConfig(max_backsteps=0, on_exhausted="stop"))
    assert [o.token_ids for o in spent] == baseline


def test_backstep_driver_reaches_max_tokens_without_eos_or_banned_phrases(llm, prompts, baseline):
    tokenizer = llm.get_tokenizer()
    eos = set(plv.eos_token_ids(llm))
    config = pl.BackstepConfig.method4(n_remove=4, peak=2.0, end_phrases="default", ban_phrases=["I hope"])
    streamed: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    outs = plv.generate(
        llm,
        prompts,
        [params(SEED + i) for i in range(len(prompts))],
        backstep=config,
        on_final=lambda i, ids: streamed[i].extend(ids),
    )
    phrases = ["I hope", *default_end_phrases(tokenizer, sorted(eos))]
    matcher = PhraseMatcher(phrases, tokenizer)
    for i, out in enumerate(outs):
        assert len(out.token_ids) == MAX and not eos & set(out.token_ids)
        assert out.finish_reason == "length"
        assert streamed[i] == out.token_ids  # hold-back streaming delivers exactly the final tokens
        assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)
        assert matcher.scan(out.prompt_token_ids + out.token_ids, len(out.prompt_token_ids), None, True).match is None
        # Every prompt ended with EOS in the baseline, so every request rewound at least once.
        assert out.backstep_events and out.stats.submissions == 1 + len(out.backstep_events)
        for event in out.backstep_events:
            assert 0 <= event.removed <= 4 and 0 <= event.position < MAX
            if event.reason == "eos":
                assert 0.0 < event.eos_prob <= 1.0
            else:
                assert event.reason in ("phrase", "ending") and event.phrase in phrases
                # banned_token is the token forbidden at `position`: a banned phrase's first token there; an
                # ending forbids its first token where the phrase began, not at the rewind point (as on HF).
                assert (event.banned_token is not None) == (event.reason == "phrase")
        # The kept prefix comes back from the prefix cache (whole 32-token blocks only).
        assert out.stats.cached_prompt_tokens > 0
    # The first rewind of a request happens where its baseline sampled EOS: same seed, same tokens until then.
    first = outs[0].backstep_events[0]
    if first.reason == "eos":
        assert first.step == len(baseline[0]) - 1
        assert outs[0].token_ids[: first.position] == baseline[0][: first.position]


def test_budget_then_suppress_and_prompt_as_token_ids(llm, prompts):
    tokenizer = llm.get_tokenizer()
    eos = set(plv.eos_token_ids(llm))
    ids = tokenizer.encode(prompts[1])
    (out,) = plv.generate(llm, [ids], params(5), backstep=pl.BackstepConfig(n_remove=3, max_backsteps=1))
    assert out.prompt_token_ids == ids
    assert len(out.token_ids) == MAX and not eos & set(out.token_ids)
    assert len([e for e in out.backstep_events if e.reason == "eos"]) <= 1


def test_bad_arguments_name_the_argument(llm, prompts):
    with pytest.raises(ValueError, match="max_tokens"):
        plv.generate(llm, prompts, SamplingParams(max_tokens=None))
    with pytest.raises(ValueError, match="backstep"):
        plv.generate(llm, prompts, params(0), backstep={"n_remove": 4})
    with pytest.raises(ValueError, match="prompts"):
        plv.generate(llm, [prompts[0], 3.5], params(0))
