"""Method 4 with widened truncation (issue 13, the loop half): after a rewind a row samples from a wider top-k /
top-p that returns to the configured one on the schedule."""

from __future__ import annotations

import pytest
import torch
from support import PAD, BoostEOS, tiny_model

from perpetual_logits import BackstepConfig, LinearDecay, Widening, make_perpetual


def finite_counts(out, row: int) -> list[int]:
    return [int(torch.isfinite(step[row]).sum()) for step in out.scores]


def expected_k(steps_since: int, configured: int = 5, wide: int = 20, length: int = 4) -> int:
    if steps_since >= length:
        return configured
    f = 2.0 - 1.0 * steps_since / length  # LinearDecay(2.0, length)
    w = f - 1.0
    return round((1 - w) * configured + w * wide)


def test_after_a_rewind_top_k_is_wide_and_returns_on_schedule_rows_without_events_untouched() -> None:
    model = make_perpetual(tiny_model("llama", attn="sdpa"))
    prompts = [[1, 5, 6, 7], [PAD, PAD, 1, 9]]
    ids = torch.tensor(prompts)
    torch.manual_seed(3)
    out = model.generate(
        ids,
        attention_mask=(ids != PAD).long(),
        do_sample=True,
        top_k=5,
        max_new_tokens=30,
        logits_processor=[BoostEOS(2.5)],
        backstep=BackstepConfig(n_remove=2, schedule=LinearDecay(2.0, 4), widen=Widening(top_k=20), max_backsteps=4),
        return_dict_in_generate=True,
        output_scores=True,
    )
    events = out.backstep_events
    assert any(events), "rewinds must happen"
    widened = 0
    for row in range(2):
        counts = finite_counts(out, row)
        restarts = sorted({e.position for e in events[row]})
        for j, count in enumerate(counts):
            since = [j - p for p in restarts if p <= j]
            # the latest restart at or before j decides (a later rewind restarts the schedule)
            want = expected_k(min(since)) if since else 5
            assert count == want, (row, j, count, want)
            widened += want > 5
    assert widened >= 3, "some steps must be widened"


def test_widen_needs_a_schedule_and_leaves_greedy_decoding_alone() -> None:
    with pytest.raises(ValueError, match="schedule"):
        BackstepConfig(widen=Widening(top_k=20))
    with pytest.raises(ValueError, match="widen"):
        BackstepConfig.method4(4, widen="wide")
    model = make_perpetual(tiny_model("llama"))
    kwargs = {"do_sample": False, "max_new_tokens": 20, "logits_processor": [BoostEOS(2.0)]}
    ids = torch.tensor([[1, 5, 6]])
    plain = model.generate(ids, backstep=BackstepConfig.method4(2), **kwargs)
    widened = model.generate(ids, backstep=BackstepConfig.method4(2, widen=Widening(top_k=20)), **kwargs)
    assert torch.equal(plain, widened)


def test_widen_narrower_than_configured_is_refused_clearly() -> None:
    model = make_perpetual(tiny_model("llama"))
    with pytest.raises(ValueError, match="narrower"):
        model.generate(
            torch.tensor([[1, 5, 6]]),
            do_sample=True,
            top_k=50,
            max_new_tokens=3,
            backstep=BackstepConfig.method4(4, widen=Widening(top_k=10)),
        )
