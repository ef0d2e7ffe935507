"""The length mode and the landing on vLLM, with the HF backend's semantics (the same policy)."""

from __future__ import annotations

from vllm import SamplingParams

import perpetual_logits.vllm as plv
from perpetual_logits import BackstepConfig, Landing
from perpetual_logits.text.boundaries import count_words, ends_sentence


def test_a_minimum_in_words_then_the_models_own_end_or_a_landing(llm, prompts):
    words = 30
    params = [SamplingParams(temperature=0.7, top_p=0.9, max_tokens=90, seed=104 + i) for i in range(len(prompts))]
    outs = plv.generate(llm, prompts, params, backstep=BackstepConfig.chat(min_words=words))
    eos = set(plv.eos_token_ids(llm))
    for out in outs:
        assert count_words(out.text) >= words or out.finish_reason == "length", out.text
        assert ends_sentence(out.text), out.text  # its own end after a sentence, or cut back to one at the limit
        if out.finish_reason == "stop":
            assert out.token_ids[-1] in eos  # the accepted EOS is kept, as on HF
        assert "<|im_end|>" not in out.text


def test_a_request_at_max_tokens_is_cut_back_to_its_last_sentence(llm, prompts):
    params = [SamplingParams(temperature=0.7, top_k=0, max_tokens=60, seed=7 + i) for i in range(len(prompts))]
    config = BackstepConfig.method4(n_remove=4, landing=True)
    streamed: dict[int, list[int]] = {}
    outs = plv.generate(
        llm, prompts, params, backstep=config, on_final=lambda i, ids: streamed.setdefault(i, []).extend(ids)
    )
    assert any(len(out.token_ids) < 60 and out.finish_reason == "length" for out in outs), "some rows were cut"
    for i, out in enumerate(outs):
        assert ends_sentence(out.text), out.text
        assert streamed.get(i, []) == list(out.token_ids)  # nothing streamed was cut back


def test_the_landing_bonus_ends_rows_at_a_sentence_end_inside_the_zone(llm, prompts):
    """Our processor raises EOS after a sentence-end token in the last quarter of the budget (as LandingBias does on
    HF): with a strong bonus every row takes its own end there, none is cut at the limit."""
    params = [SamplingParams(temperature=0.7, top_k=0, max_tokens=120, seed=11 + i) for i in range(len(prompts))]
    config = BackstepConfig.method4(n_remove=4, landing=Landing(margin=30, strength=40.0))
    outs = plv.generate(llm, prompts, params, backstep=config)
    eos = set(plv.eos_token_ids(llm))
    for out in outs:
        assert out.finish_reason == "stop" and out.token_ids[-1] in eos, out.text
        assert 90 <= len(out.token_ids) <= 120 and ends_sentence(out.text), out.text


def test_reaching_the_minimum_resubmits_the_request_with_the_landing(llm, prompts):
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=100, seed=3)
    (out,) = plv.generate(llm, prompts[:1], params, backstep=BackstepConfig.method4(n_remove=4, min_tokens=20))
    # one submission at the start, one where the minimum was reached (plus one per rewind)
    assert out.stats.submissions >= 2 + len(out.backstep_events)
