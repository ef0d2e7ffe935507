"""The vLLM processor's settings, validated without vLLM (the engine-side tests live in tests_vllm)."""

from __future__ import annotations

import pytest
import torch

import perpetual_logits as pl
from perpetual_logits.truncation import Truncation, TruncationSchedule, Widening
from perpetual_logits.vllm.settings import (
    EXTRA_ARGS_KEY,
    EarlySettings,
    RequestSettings,
    ScheduleTable,
    WideningSettings,
)


@pytest.mark.parametrize("factor", [1e-300, 0.0009, 1000.5, float("inf"), -1.0])
def test_schedule_factors_outside_the_schedule_classes_bounds_are_refused(factor):
    # Issue 19 item 14: factors [1e-300] passed and made every token 0.
    for key in ("schedule", "resample"):
        with pytest.raises(ValueError, match=r"factors.*\[0.001, 1000\]"):
            RequestSettings.parse({EXTRA_ARGS_KEY: {key: {"factors": [2.0, factor]}}})


def test_schedule_factors_at_the_bounds_are_accepted():
    table = ScheduleTable((0.001, 1000.0))
    assert table(0) == 0.001 and table(1) == 1000.0 and table(2) == 1.0


@pytest.mark.parametrize(
    ("data", "name"),
    [
        ({"suppress_eos": True, "eos": [2, 10**6]}, "'eos'"),
        ({"bans": [[3, [5, 60000]]]}, "'bans'"),
        ({"resample": {"factors": [2.0]}, "eos": [60000]}, "'eos'"),
    ],
)
def test_token_ids_outside_the_vocabulary_are_refused_when_it_is_known(data, name):
    with pytest.raises(ValueError, match=rf"\[{name}\]` holds the token id \d+, outside this model's vocabulary"):
        RequestSettings.parse({EXTRA_ARGS_KEY: data}, vocab_size=49152)
    parsed = RequestSettings.parse({EXTRA_ARGS_KEY: data})  # without the vocabulary: only the form is checked
    assert parsed is not None
    kept = set(parsed.eos or ()) | {token for tokens in (parsed.bans or {}).values() for token in tokens}
    assert max(kept) >= 49152  # the id outside the vocabulary is kept as given


def test_early_and_widen_need_a_schedule_and_valid_values():
    early = EarlySettings.of(pl.EarlyTrigger(window=4), "row-1", 0).to_data()
    with pytest.raises(ValueError, match="set `schedule` too"):
        RequestSettings.parse({EXTRA_ARGS_KEY: {"early": early}})
    bad = {**early, "window": 0}
    with pytest.raises(ValueError, match="window"):
        RequestSettings.parse({EXTRA_ARGS_KEY: {"early": bad, "schedule": {"factors": [2.0]}}})
    with pytest.raises(ValueError, match="narrower"):
        WideningSettings.of(Widening(top_k=10), pl.LinearDecay(2.0, 4), Truncation(top_k=50))
    with pytest.raises(ValueError, match=r"schedule.started"):
        RequestSettings.parse({EXTRA_ARGS_KEY: {"schedule": {"factors": [2.0], "started": 3}}})


def test_widen_settings_give_the_hf_backends_values_step_by_step():
    # The same interpolation as TruncationSchedule (the HF backend), through plain data.
    schedule = pl.LinearDecay(2.0, 10)
    configured = Truncation(top_k=50, top_p=0.9, min_p=0.05, temperature=0.7)
    widen = Widening(top_k=200, top_p=0.99, min_p=0.0)
    settings = WideningSettings.from_data(WideningSettings.of(widen, schedule, configured).to_data())
    plan = TruncationSchedule(configured, widen, schedule)
    steps = torch.arange(14)
    hf = plan.row_values(steps, torch.ones(14, dtype=torch.bool), 2048)
    for s in range(14):
        top_k, top_p, min_p = settings.values(settings.weight(s), 2048)
        assert top_k == int(hf.top_k[s])
        assert top_p == pytest.approx(float(hf.top_p[s])) and min_p == pytest.approx(float(hf.min_p[s]))
    assert settings.values(settings.weight(0), 2048)[0] == 200 and settings.values(settings.weight(12), 2048)[0] == 50
