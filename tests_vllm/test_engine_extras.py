"""Early triggers, widening and bad token ids on a real vLLM engine (the session's SmolLM2 engine)."""

from __future__ import annotations

import warnings

import pytest
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

import perpetual_logits as pl
import perpetual_logits.vllm as plv

SHORT = 6


@pytest.mark.parametrize(
    "extra",
    [
        plv.suppress_eos(10**6),
        {plv.EXTRA_ARGS_KEY: {"bans": [[0, [60000]]]}},
        plv.resample_eos(eos_token_id=60000),
    ],
)
def test_an_id_outside_the_vocabulary_is_refused_at_admission_and_the_engine_lives_on(llm, prompts, extra):
    # Issue 19 item 10: old main raised EngineDeadError here, and on every later call. vLLM reports an admission
    # error as a VLLMValidationError carrying our message.
    with pytest.raises(VLLMValidationError, match="outside this model's vocabulary"):
        llm.generate(prompts[:1], SamplingParams(max_tokens=SHORT, extra_args=extra), use_tqdm=False)
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        plv.generate(llm, prompts[:1], SamplingParams(max_tokens=SHORT, extra_args=extra))
    (out,) = llm.generate(prompts[:1], SamplingParams(max_tokens=SHORT), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == SHORT


def test_backstep_refuses_a_users_eos_list_with_an_id_outside_the_vocabulary(llm, prompts):
    params = SamplingParams(max_tokens=SHORT, extra_args=plv.suppress_eos([2, 50000]))
    with pytest.raises(ValueError, match="50000"):
        plv.generate(llm, prompts[:1], params, backstep=pl.BackstepConfig(n_remove=2))
    assert len(plv.generate(llm, prompts[:1], SamplingParams(max_tokens=SHORT))[0].token_ids) == SHORT


def test_the_processors_own_truncation_equals_vllms_where_nothing_is_widened(llm, prompts):
    # A request with `widen` is submitted with vLLM's truncation off; our processor truncates it in vLLM's
    # order and arithmetic, so until a schedule starts it samples exactly what vLLM samples.
    configured = pl.Truncation(top_k=20, top_p=0.9, min_p=0.05, temperature=0.8)
    widen = plv.WideningSettings.of(pl.Widening(top_k=0, top_p=1.0, min_p=0.0), pl.LinearDecay(2.0, 4), configured)
    ours = {plv.EXTRA_ARGS_KEY: {"schedule": {"factors": [2.0], "started": None}, "widen": widen.to_data()}}
    plain = [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, max_tokens=24, seed=s) for s in (1, 2)]
    taken_over = [SamplingParams(temperature=0.8, max_tokens=24, seed=s, extra_args=ours) for s in (1, 2)]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts[:2], plain, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts[:2], taken_over, use_tqdm=False)]
    assert got == expected


def test_backstep_with_early_trigger_and_widen_runs_and_passes_them_to_the_processor(llm, prompts, monkeypatch):
    config = pl.BackstepConfig.method4(
        4, widen=pl.Widening(top_k=200), early_trigger=pl.EarlyTrigger(window=2, eos_threshold=0.02)
    )
    submitted = []
    engine = llm.llm_engine
    real_add = engine.add_request

    def spy(request_id, prompt, params, *args, **kwargs):
        submitted.append((len(prompt["prompt_token_ids"]), params))
        return real_add(request_id, prompt, params, *args, **kwargs)

    monkeypatch.setattr(engine, "add_request", spy)
    tokenizer = llm.get_tokenizer()
    params = [SamplingParams(temperature=0.7, top_k=20, max_tokens=40, seed=104 + i) for i in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # old main: "fields ['early_trigger', 'widen'] are not supported"
        outs = plv.generate(llm, prompts[:2], params, backstep=config)
    monkeypatch.undo()
    eos = set(plv.eos_token_ids(llm))
    assert all(len(o.token_ids) == 40 and not eos & set(o.token_ids) for o in outs)
    assert sum(len(o.backstep_events) for o in outs) >= 1  # these seeds end early on plain vLLM
    prompt_lengths = {len(tokenizer.encode(p)) for p in prompts[:2]}
    rows = {}
    for length, sent in submitted:
        ours = sent.extra_args[plv.EXTRA_ARGS_KEY]
        # Widening from the first token (the early trigger may start it anywhere): vLLM's truncation is off.
        assert (sent.top_k, sent.top_p, sent.min_p) == (0, 1.0, 0.0) and ours["widen"]["configured"]["top_k"] == 20
        early = ours["early"]
        first = early["row"] not in rows
        rows.setdefault(early["row"], length - early["at"])
        assert length - early["at"] == rows[early["row"]] and rows[early["row"]] in prompt_lengths
        assert ours["schedule"]["started"] == (None if first else 0)  # a rewind restarts it where it resumes
    assert len(rows) == 2 and len(submitted) > 2


def test_backstep_refuses_widen_that_vllm_could_not_honour(llm, prompts):
    config = pl.BackstepConfig.method4(4, widen=pl.Widening(top_k=200))
    with pytest.raises(ValueError, match="narrower than the configured top_k=0"):  # vLLM's default: no top-k
        plv.generate(llm, prompts[:1], SamplingParams(temperature=0.8, max_tokens=4), backstep=config)
    with pytest.raises(ValueError, match="repetition_penalty"):
        plv.generate(
            llm,
            prompts[:1],
            SamplingParams(temperature=0.8, top_k=20, repetition_penalty=1.2, max_tokens=4),
            backstep=config,
        )
