"""The logits processor on hand-made batches, through both vLLM interfaces (no engine needed)."""

from __future__ import annotations

from types import SimpleNamespace

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
    extra = {plv.KEY: {"eos": [EOS], "bans": [[0, [EOS, 4]]], "schedule": {"factors": [2.0, 1.5]}}}
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
    add(proc, 0, SamplingParams(extra_args={plv.KEY: {"bans": [[0, list(range(VOCAB))]]}}), [])
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
    extra = {plv.KEY: {"eos": [EOS], "bans": [[1, [4]]], "schedule": {"factors": [2.0, 4.0]}}}
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
        ({plv.KEY: {"suppress": True}}, "unknown keys"),
        ({plv.KEY: {"suppress_eos": "yes"}}, "suppress_eos"),
        ({plv.KEY: {"bans": [[0, [-1]]]}}, "bans tokens"),
        ({plv.KEY: {"schedule": {"factors": [0.0]}}}, "factors"),
        ({plv.KEY: {"resample": {"factors": [2.0], "trigger": "often"}}}, "trigger"),
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
