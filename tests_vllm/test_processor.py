"""The logits processor on hand-made batches, through both vLLM interfaces (no engine needed)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

import perpetual_logits as pl
import perpetual_logits.vllm as plv

EOS = 2
VOCAB = 8


def v1_processor():
    return plv.PerpetualLogitsProcessor(None, torch.device("cpu"), False)


def add(proc, index: int, params: SamplingParams, output: list[int]) -> None:
    proc.update_state(BatchUpdate(batch_size=index + 1, removed=[], added=[(index, params, [1], output)], moved=[]))


def logits_eos_on_top(rows: int = 1) -> torch.Tensor:
    out = torch.zeros(rows, VOCAB)
    out[:, EOS] = 5.0
    out[:, 3] = 2.0
    return out


def test_one_class_implements_both_interfaces():
    assert issubclass(plv.PerpetualLogitsProcessor, V1LogitsProcessor)
    assert issubclass(plv.PerpetualLogitsProcessor, V2LogitsProcessor)
    assert not v1_processor().is_argmax_invariant()


def test_method1_masks_eos_only_for_requests_that_ask():
    proc = v1_processor()
    add(proc, 0, SamplingParams(extra_args=plv.suppress_eos(EOS)), [])
    add(proc, 1, SamplingParams(), [])  # a plain request in the same batch
    logits = logits_eos_on_top(2)
    out = proc.apply(logits.clone())
    assert out[0, EOS] == float("-inf") and out[0].argmax() == 3
    assert torch.equal(out[1], logits[1])


def test_method2_restarts_the_schedule_at_an_eviction_and_decays():
    proc = v1_processor()
    output: list[int] = [5, 5]
    add(proc, 0, SamplingParams(extra_args=plv.resample_eos(EOS, pl.LinearDecay(2.0, 2), trigger="argmax")), output)
    first = proc.apply(logits_eos_on_top())  # EOS on top at generated index 2: evicted, drawn at the peak
    assert first[0, EOS] == float("-inf") and first[0, 3] == pytest.approx(1.0)
    output.append(3)
    calm = torch.zeros(1, VOCAB)
    calm[0, 3] = 3.0
    second = proc.apply(calm.clone())  # one step later: 1.5x
    assert second[0, 3] == pytest.approx(2.0)
    output.append(3)
    third = proc.apply(calm.clone())  # schedule over: 1.0x (EOS still masked)
    assert third[0, 3] == pytest.approx(3.0) and third[0, EOS] == float("-inf")


def test_method2_sample_trigger_is_reproducible_with_a_seed():
    def run(seed: int) -> list[float]:
        proc = v1_processor()
        output: list[int] = []
        add(proc, 0, SamplingParams(extra_args=plv.resample_eos(EOS, pl.LinearDecay(3.0, 1), seed=seed)), output)
        factors = []
        for _ in range(30):
            logits = torch.zeros(1, VOCAB)  # EOS probability about 1/10
            logits[0, 3] = 1.0
            factors.append(round(float(1.0 / proc.apply(logits)[0, 3]), 4))
            output.append(3)
        return factors

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert 3.0 in run(1)  # evictions happened (the replacement token is drawn at the peak)


def test_driver_settings_schedule_and_bans_by_generated_position():
    proc = v1_processor()
    output: list[int] = []
    extra = {plv.EXTRA_ARGS_KEY: {"eos": [EOS], "bans": [[0, [EOS, 4]]], "schedule": {"factors": [2.0, 1.5]}}}
    add(proc, 0, SamplingParams(extra_args=extra), output)
    logits = torch.ones(1, VOCAB)
    out = proc.apply(logits.clone())
    assert out[0, EOS] == float("-inf") and out[0, 4] == float("-inf") and out[0, 3] == pytest.approx(0.5)
    output.append(3)
    out = proc.apply(logits.clone())
    assert torch.isfinite(out).all() and out[0, 3] == pytest.approx(1 / 1.5)  # bans were for position 0 only
    output.append(3)
    assert torch.equal(proc.apply(logits.clone()), logits)  # schedule over


def test_a_row_with_everything_banned_keeps_its_logits():
    proc = v1_processor()
    add(proc, 0, SamplingParams(extra_args={plv.EXTRA_ARGS_KEY: {"bans": [[0, list(range(VOCAB))]]}}), [])
    logits = torch.randn(1, VOCAB)
    assert torch.equal(proc.apply(logits.clone()), logits)


def test_state_follows_removed_and_swapped_requests():
    proc = v1_processor()
    add(proc, 0, SamplingParams(extra_args=plv.suppress_eos(EOS)), [])
    add(proc, 1, SamplingParams(), [])
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=[], moved=[(0, 1, MoveDirectionality.SWAP)]))
    out = proc.apply(logits_eos_on_top(2))
    assert out[1, EOS] == float("-inf") and out[0, EOS] == 5.0
    proc.update_state(BatchUpdate(batch_size=1, removed=[1], added=[], moved=[]))
    assert torch.equal(proc.apply(logits_eos_on_top(2)), logits_eos_on_top(2))


def test_v2_interface_maps_rows_to_slots_and_positions():
    req_states = SimpleNamespace(device=torch.device("cpu"), prompt_len=SimpleNamespace(np=[0, 0, 10, 0]))
    proc = plv.PerpetualLogitsProcessor(None, req_states)
    extra = {plv.EXTRA_ARGS_KEY: {"eos": [EOS], "bans": [[1, [4]]], "schedule": {"factors": [2.0, 4.0]}}}
    assert proc.add_request(2, SamplingParams(extra_args=extra))
    assert not proc.add_request(3, SamplingParams())
    proc.apply_staged_writes()
    # Row 0 is slot 3 (plain), row 1 is slot 2 at position 10: the token sampled lands at generated index 1.
    ctx = SimpleNamespace(expanded_idx_mapping=torch.tensor([3, 2]), pos=torch.tensor([7, 10]))
    logits = torch.ones(2, VOCAB)
    out = proc.apply(logits.clone(), ctx)
    assert torch.equal(out[0], logits[0])
    assert out[1, 4] == float("-inf") and out[1, 3] == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({plv.EXTRA_ARGS_KEY: {"suppress": True}}, "unknown keys"),
        ({plv.EXTRA_ARGS_KEY: {"suppress_eos": "yes"}}, "suppress_eos"),
        ({plv.EXTRA_ARGS_KEY: {"bans": [[0, [-1]]]}}, "bans tokens"),
        ({plv.EXTRA_ARGS_KEY: {"schedule": {"factors": [0.0]}}}, "factors"),
        ({plv.EXTRA_ARGS_KEY: {"resample": {"factors": [2.0], "trigger": "often"}}}, "trigger"),
    ],
)
def test_malformed_settings_are_refused_at_admission(extra, message):
    with pytest.raises(ValueError, match=message):
        plv.PerpetualLogitsProcessor.validate_params(SamplingParams(extra_args=extra))


def test_importing_perpetual_logits_never_imports_vllm():
    import subprocess
    import sys

    code = "import sys, perpetual_logits; print('vllm' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# -- issue 19 item 10: ids outside the vocabulary ----------------------------------------------------------
@pytest.mark.parametrize(
    "extra",
    [
        plv.suppress_eos([EOS, 10**6]),
        {plv.EXTRA_ARGS_KEY: {"bans": [[0, [4, 60000]]]}},
        plv.resample_eos(eos_token_id=[EOS, 60000], trigger="argmax"),
        plv.resample_eos(eos_token_id=60000, trigger="argmax"),
        plv.suppress_eos(10**6),
    ],
)
def test_ids_outside_the_vocabulary_never_raise_in_the_worker(extra):
    # Old main: IndexError inside the worker (the engine died). Admission refuses them where the vocabulary is
    # known; a worker that still meets one ignores it (it can never be sampled) and masks the rest.
    proc = v1_processor()
    add(proc, 0, SamplingParams(extra_args=extra), [])
    out = proc.apply(logits_eos_on_top())
    assert torch.isfinite(out).any()
    ids = extra[plv.EXTRA_ARGS_KEY].get("eos", [])
    masked = {4} if "bans" in extra[plv.EXTRA_ARGS_KEY] else ({EOS} if EOS in ids else set())
    assert all(out[0, t] == float("-inf") for t in masked)
    assert all(torch.isfinite(out[0, t]) for t in set(range(VOCAB)) - masked)


def test_admission_knows_the_vocabulary_of_the_class_registered_for_a_model():
    cls = plv.processor.processor_for_vocabulary(VOCAB)
    assert issubclass(cls, plv.PerpetualLogitsProcessor)
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        cls.validate_params(SamplingParams(extra_args=plv.suppress_eos(VOCAB)))
    cls.validate_params(SamplingParams(extra_args=plv.suppress_eos(VOCAB - 1)))
    # vLLM's worker processes unpickle it by name.
    import pickle

    assert pickle.loads(pickle.dumps(cls)) is cls


# -- early triggers: the HF backend's TemperatureSchedule, step for step -----------------------------------
def _factor_of(out: torch.Tensor, logits: torch.Tensor) -> float:
    return round(float(logits[0, 3] / out[0, 3]), 5)


def test_early_trigger_restarts_the_schedule_as_on_the_hf_backend_across_a_resubmission():
    from perpetual_logits.backstep.temperature import TemperatureSchedule

    schedule, trigger = pl.LinearDecay(2.0, 3), pl.EarlyTrigger(window=3, eos_threshold=0.2, entropy_slope=0.3)
    restarts: list[int | None] = [None]  # the rewind policy's record of where it restarted the schedule
    hf = TemperatureSchedule(schedule, trigger, torch.device("cpu"), lambda: restarts)
    hf.start(1, 0)
    gen = torch.Generator().manual_seed(0)
    first = [torch.randn(1, VOCAB, generator=gen) * 2 + torch.tensor([0, 0, 1.5, 1, 0, 0, 0, 0]) for _ in range(12)]
    second = [torch.randn(1, VOCAB, generator=gen) * 2 + torch.tensor([0, 0, 1.5, 1, 0, 0, 0, 0]) for _ in range(10)]

    def hf_factor(logits: torch.Tensor, position: int) -> float:
        hf.observe(logits, [0], [position], [EOS])
        hf.set_factors([0], [position], 1)
        return 1.0 if hf.processor.factors is None else round(float(hf.processor.factors[0]), 5)

    def request(at: int, started: int | None) -> tuple[Any, list[int]]:
        proc_settings = {
            "eos": [EOS],
            "schedule": {**plv.schedule_table(schedule).to_data(), "started": started},
            "early": plv.EarlySettings.of(trigger, "row-0", at).to_data(),
        }
        output: list[int] = []
        add(proc, 0, SamplingParams(extra_args={plv.EXTRA_ARGS_KEY: proc_settings}), output)
        return proc, output

    proc = v1_processor()
    _, output = request(0, None)  # the first request: nothing started
    ours, theirs = [], []
    for position, logits in enumerate(first):
        ours.append(_factor_of(proc.apply(logits.clone()), logits))
        theirs.append(hf_factor(logits, position))
        output.append(3)
    # A rewind to position 7 that restarts the schedule: a new engine request from there.
    hf.rewind(0, 7)
    restarts[0] = 7
    proc.update_state(BatchUpdate(batch_size=1, removed=[0], added=[], moved=[]))
    _, output = request(7, 0)
    for step, logits in enumerate(second):
        ours.append(_factor_of(proc.apply(logits.clone()), logits))
        theirs.append(hf_factor(logits, 7 + step))
        output.append(3)
    assert ours == theirs
    assert ours.count(2.0) >= 3  # the rewind's restart and at least two early firings


# -- widen: the processor truncates itself ------------------------------------------------------------------
def test_widen_truncates_wide_at_the_start_and_returns_to_the_configured_values():
    widen = plv.WideningSettings.of(pl.Widening(top_k=0), pl.LinearDecay(2.0, 2), pl.Truncation(top_k=2))
    extra = {plv.EXTRA_ARGS_KEY: {"schedule": {"factors": [2.0, 1.5], "started": 0}, "widen": widen.to_data()}}
    proc = v1_processor()
    output: list[int] = []
    add(proc, 0, SamplingParams(extra_args=extra), output)
    kept = []
    for _ in range(4):
        kept.append(int(torch.isfinite(proc.apply(torch.arange(VOCAB, dtype=torch.float32)[None])).sum()))
        output.append(3)
    assert kept == [VOCAB, 5, 2, 2]  # top-k: the whole vocabulary, half-way back (round(0.5 * 2 + 0.5 * 8)), 2


def test_widen_is_refused_with_vllms_own_truncation_or_penalties():
    widen = plv.WideningSettings.of(pl.Widening(top_k=0), pl.LinearDecay(2.0, 2), pl.Truncation(top_k=2))
    extra = {plv.EXTRA_ARGS_KEY: {"schedule": {"factors": [2.0, 1.5]}, "widen": widen.to_data()}}
    with pytest.raises(ValueError, match=r"top_k=0, top_p=1\.0, min_p=0\.0"):
        plv.PerpetualLogitsProcessor.validate_params(SamplingParams(top_k=2, extra_args=extra))
    with pytest.raises(ValueError, match=r"repetition_penalty=1\.2"):
        plv.PerpetualLogitsProcessor.validate_params(SamplingParams(repetition_penalty=1.2, extra_args=extra))
    plv.PerpetualLogitsProcessor.validate_params(SamplingParams(extra_args=extra))


def test_vllm_truncation_keeps_what_vllms_sampler_keeps():
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    from perpetual_logits.vllm.processor import vllm_truncation

    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        logits = torch.randn(6, 50, generator=gen) * 3
        logits[0, :10] = 1.0  # ties
        k = torch.randint(0, 51, (6,), generator=gen)
        p = torch.where(torch.rand(6, generator=gen) < 0.3, 1.0, torch.rand(6, generator=gen) * 0.9 + 0.05)
        m = torch.where(torch.rand(6, generator=gen) < 0.5, 0.0, torch.rand(6, generator=gen) * 0.3)
        # vLLM: min-p (its built-in processor's arithmetic), then top-k and top-p.
        after_min_p = logits.clone()
        probs = after_min_p.softmax(dim=-1)
        after_min_p.masked_fill_(probs < probs.amax(dim=-1, keepdim=True) * m[:, None], float("-inf"))
        theirs = apply_top_k_top_p_pytorch(after_min_p.clone(), torch.where(k > 0, k, 50), p)
        assert torch.equal(vllm_truncation(logits, k, p.float(), m.float()), torch.isfinite(theirs))
        # Top-k alone: vLLM takes its path without a sort, and so do we.
        theirs = apply_top_k_top_p_pytorch(after_min_p.clone(), torch.where(k > 0, k, 50), None, allow_cpu_sync=True)
        assert torch.equal(vllm_truncation(logits, k, torch.ones(6), m.float()), torch.isfinite(theirs))


def test_early_trigger_histories_are_bounded(monkeypatch):
    monkeypatch.setattr(plv.processor, "_MAX_HISTORIES", 2)
    proc = v1_processor()
    for row in range(3):
        settings = {
            "schedule": {"factors": [2.0], "started": None},
            "early": plv.EarlySettings.of(pl.EarlyTrigger(window=2), f"row-{row}", 0).to_data(),
        }
        add(proc, row, SamplingParams(extra_args={plv.EXTRA_ARGS_KEY: settings}), [])
    assert list(proc.histories) == ["row-1", "row-2"]  # the least recently used went first
    proc.apply(torch.zeros(3, VOCAB))  # row 0 keeps its own history while it runs


def test_a_preempted_request_keeps_its_trigger_history_and_schedule_when_it_comes_back():
    schedule, trigger = pl.LinearDecay(2.0, 6), pl.EarlyTrigger(window=2, eos_threshold=0.3)
    settings = {
        "eos": [EOS],
        "schedule": {**plv.schedule_table(schedule).to_data(), "started": None},
        "early": plv.EarlySettings.of(trigger, "row-p", 0).to_data(),
    }
    steps = [logits_eos_on_top() * (0.1 * i) for i in range(10)]  # EOS probability rising: fires early on

    def run(preempt_at: int | None) -> list[float]:
        proc, output = v1_processor(), []
        add(proc, 0, SamplingParams(extra_args={plv.EXTRA_ARGS_KEY: settings}), output)
        factors = []
        for i, logits in enumerate(steps):
            if i == preempt_at:  # vLLM removes the request and adds it back with the tokens it has
                proc.update_state(BatchUpdate(batch_size=1, removed=[0], added=[], moved=[]))
                add(proc, 0, SamplingParams(extra_args={plv.EXTRA_ARGS_KEY: settings}), output)
            factors.append(_factor_of(proc.apply(logits.clone() + 0.01), logits + 0.01))
            output.append(3)
        return factors

    uninterrupted = run(None)
    assert 2.0 in uninterrupted[:5] and uninterrupted[5] != 1.0  # fired before the preemption, still decaying
    assert run(5) == uninterrupted


# -- the landing's EOS bonus ---------------------------------------------------------------------------------
def landing(start: int, margin: int = 4, strength: float = 8.0, last_token: int = 1) -> dict[str, Any]:
    data = {"start": start, "margin": margin, "strength": strength, "sentence_ends": [5], "last_token": last_token}
    return {plv.EXTRA_ARGS_KEY: {"eos": [EOS], "landing": data}}


def test_landing_raises_eos_after_a_sentence_end_token_from_its_start_rising_over_the_margin():
    proc = v1_processor()
    output: list[int] = []
    add(proc, 0, SamplingParams(extra_args=landing(start=2)), output)
    bonus = []
    for token in (5, 5, 5, 3, 5, 5):  # the previous token decides: 5 ends a sentence, 3 does not
        out = proc.apply(torch.zeros(1, VOCAB))
        bonus.append(float(out[0, EOS]))
        assert out[0, 3] == 0.0  # only EOS moves
        output.append(token)
    # index 0: before the start; 1: before the start; 2: 8 * 1/4; 3: 8 * 2/4; 4: after a 3, none; 5: 8 * 4/4
    assert bonus == [0.0, 0.0, 2.0, 4.0, 0.0, 8.0]


def test_landing_judges_the_first_output_by_the_token_before_the_request():
    for last, expected in ((5, 2.0), (3, 0.0)):
        proc = v1_processor()
        add(proc, 0, SamplingParams(extra_args=landing(start=0, last_token=last)), [])
        assert float(proc.apply(torch.zeros(1, VOCAB))[0, EOS]) == expected


def test_landing_on_the_v2_interface_reads_the_last_sampled_token_of_the_slot():
    req_states = SimpleNamespace(
        device=torch.device("cpu"), prompt_len=SimpleNamespace(np=[0, 10]), last_sampled_tokens=torch.tensor([[3], [5]])
    )
    proc = plv.PerpetualLogitsProcessor(None, req_states)
    assert proc.add_request(1, SamplingParams(extra_args=landing(start=0, margin=1)))
    ctx = SimpleNamespace(expanded_idx_mapping=torch.tensor([1]), pos=torch.tensor([12]))  # generated index 3
    assert float(proc.apply(torch.zeros(1, VOCAB), ctx)[0, EOS]) == 8.0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"start": 0, "margin": 0, "strength": 1.0, "sentence_ends": [5], "last_token": 1}, "landing.margin"),
        ({"start": 0, "margin": 2, "strength": -1.0, "sentence_ends": [5], "last_token": 1}, "landing.strength"),
        ({"start": 0, "margin": 2, "strength": 1.0, "sentence_ends": "5", "last_token": 1}, "sentence_ends"),
        ({"start": 0, "margin": 2, "strength": 1.0, "sentence_ends": [5]}, "exactly the keys"),
        ({"start": 0, "margin": 2, "strength": 1.0, "sentence_ends": [VOCAB], "last_token": 1}, "sentence_ends"),
    ],
)
def test_malformed_landing_settings_are_refused(data, message):
    with pytest.raises(ValueError, match=message):
        plv.RequestSettings.parse({plv.EXTRA_ARGS_KEY: {"landing": data}}, vocab_size=VOCAB)
