"""The vLLM driver has no context shift (issue 17): a request that cannot fit max_model_len is refused up front."""

from __future__ import annotations

import pytest
from vllm import SamplingParams

import perpetual_logits as pl
import perpetual_logits.vllm as plv


def test_a_request_past_max_model_len_is_refused_before_anything_runs(llm):
    limit = llm.llm_engine.model_config.max_model_len
    prompt = [1, 2, 3, 4]
    too_long = SamplingParams(max_tokens=limit - len(prompt) + 1, seed=0)
    with pytest.raises(ValueError, match=rf"= {limit + 1} exceeds the engine's max_model_len \({limit}\)"):
        plv.generate(llm, [prompt], too_long, backstep=pl.BackstepConfig.method4(4))
    fits = SamplingParams(max_tokens=4, seed=0, temperature=0.7)
    out = plv.generate(llm, [prompt], fits, backstep=pl.BackstepConfig.method4(4))
    assert len(out[0].token_ids) == 4
