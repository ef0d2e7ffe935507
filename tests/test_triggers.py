"""EarlyTrigger: fires on a rising EOS probability or a falling entropy, with a cool-down, per row; wired into
Method 2 and the backstep schedule."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import tiny_model
from transformers import LogitsProcessor

import perpetual_logits as pl
from perpetual_logits import BackstepConfig, make_perpetual
from perpetual_logits.triggers import EarlyTrigger


def run(trigger: EarlyTrigger, eos: list[list[float]], entropy: list[list[float]] | None = None) -> list[list[int]]:
    """Feed per-step values (steps x batch); return, per row, the steps at which it fired."""
    batch = len(eos[0])
    fired: list[list[int]] = [[] for _ in range(batch)]
    for step, probs in enumerate(eos):
        h = torch.tensor(entropy[step]) if entropy is not None else torch.zeros(batch)
        out = trigger.update(torch.tensor(probs), h)
        assert out.shape == (batch,) and out.dtype == torch.bool
        for row in out.nonzero().flatten().tolist():
            fired[row].append(step)
    return fired


def test_fires_on_rising_eos_not_on_flat():
    rising = [min(1.0, 0.02 * s) for s in range(30)]  # 0 .. 0.58
    flat = [0.05] * 30
    fired = run(EarlyTrigger(window=5, eos_threshold=0.2), [[r, f] for r, f in zip(rising, flat)])
    # Mean of steps s-4..s is 0.02 * (s - 2) >= 0.2 first at s = 12; then the window restarts.
    assert fired[0][0] == 12
    assert all(b - a >= 5 for a, b in pairwise(fired[0]))
    assert fired[1] == []


def test_fires_on_falling_entropy_not_on_flat_or_rising():
    steps = 20
    falling = [6.0 - 0.5 * s for s in range(steps)]
    noisy_flat = [4.0 + (0.3 if s % 2 else -0.3) for s in range(steps)]
    rising = [1.0 + 0.5 * s for s in range(steps)]
    trigger = EarlyTrigger(window=6, eos_threshold=None, entropy_slope=0.25)
    entropy = [[a, b, c] for a, b, c in zip(falling, noisy_flat, rising)]
    fired = run(trigger, [[0.0, 0.0, 0.0]] * steps, entropy)
    assert fired[0] == [5, 11, 17]  # slope -0.5 bits/step as soon as the window is full, then every 6 steps
    assert fired[1] == [] and fired[2] == []
    assert trigger.slope is not None and trigger.slope[2].item() == pytest.approx(0.5, abs=1e-5)


def test_entropy_slope_is_least_squares():
    trigger = EarlyTrigger(window=4, eos_threshold=None, entropy_slope=10.0)
    values = [3.0, 1.0, 2.0, 0.0]
    for v in values:
        trigger.update(torch.zeros(1), torch.tensor([v]))
    x = torch.arange(4.0)
    y = torch.tensor(values)
    expected = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    assert trigger.slope is not None
    assert torch.allclose(trigger.slope, expected[None])


def test_started_says_whether_there_is_history():
    trigger = EarlyTrigger(window=3, eos_threshold=0.5)
    assert not trigger.started
    with pytest.raises(RuntimeError, match="before the first update"):
        trigger.drop_steps(0, 1)
    with pytest.raises(RuntimeError, match="start"):
        trigger.rewind(0, 1)
    trigger.update(torch.tensor([0.1]))
    assert trigger.started
    trigger.reset()
    assert not trigger.started


def test_drop_steps_drops_history():
    trigger = EarlyTrigger(window=3, eos_threshold=0.5)
    for _ in range(2):
        assert not trigger.update(torch.tensor([0.9, 0.9]), torch.zeros(2)).any()
    trigger.drop_steps(0, 2)  # row 0 loses both steps: needs three more
    assert trigger.update(torch.tensor([0.9, 0.9]), torch.zeros(2)).tolist() == [False, True]
    assert trigger.update(torch.tensor([0.9, 0.9]), torch.zeros(2)).tolist() == [False, False]
    assert trigger.update(torch.tensor([0.9, 0.9]), torch.zeros(2)).tolist() == [True, False]
    # Rewinding a row keeps its older steps: the removed high values no longer count.
    trigger.reset()
    for p in (0.9, 0.0, 0.0):
        trigger.update(torch.tensor([p]), torch.zeros(1))
    trigger.drop_steps(0, 2)  # history is now [0.9]
    assert trigger.update(torch.tensor([0.9]), torch.zeros(1)).tolist() == [False]
    assert trigger.update(torch.tensor([0.9]), torch.zeros(1)).tolist() == [True]
    trigger.drop_steps(0, 0)


def test_update_from_scores_and_batch_change():
    trigger = EarlyTrigger(window=2, eos_threshold=0.5, entropy_slope=0.5)
    sure_eos = torch.tensor([[0.0, 0.0, 20.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    assert trigger.update_from_scores(sure_eos, 2).tolist() == [False, False]
    assert trigger.update_from_scores(sure_eos, [2]).tolist() == [True, False]
    assert trigger.mean_eos_prob is not None
    assert torch.allclose(trigger.mean_eos_prob, torch.tensor([1.0, 0.25]), atol=1e-6)  # sure EOS; uniform over 4
    # A new batch size starts a new generation.
    assert trigger.update_from_scores(sure_eos[:1], 2).tolist() == [False]
    with pytest.raises(ValueError, match="eos_token_id"):
        trigger.update_from_scores(sure_eos, 9)
    with pytest.raises(ValueError, match="scores"):
        trigger.update_from_scores(torch.zeros(4), 2)


def test_no_host_sync():
    """Tensors on the meta device have no values: any host sync (item(), bool(), tolist()) would raise."""
    trigger = EarlyTrigger(window=3, eos_threshold=0.2, entropy_slope=0.1)
    for _ in range(5):
        fired = trigger.update(torch.rand(4, device="meta"), torch.rand(4, device="meta"))
    assert fired.device.type == "meta" and fired.shape == (4,)
    trigger.drop_steps(2, 1)


def test_validation():
    with pytest.raises(ValueError, match="window"):
        EarlyTrigger(window=0)
    with pytest.raises(ValueError, match="window"):
        EarlyTrigger(window=1, entropy_slope=0.1)
    with pytest.raises(ValueError, match="eos_threshold"):
        EarlyTrigger(eos_threshold=1.5)
    with pytest.raises(ValueError, match="entropy_slope"):
        EarlyTrigger(entropy_slope=-1.0)
    with pytest.raises(ValueError, match="at least one"):
        EarlyTrigger(eos_threshold=None, entropy_slope=None)
    trigger = EarlyTrigger(window=2, eos_threshold=0.5, entropy_slope=0.1)
    with pytest.raises(RuntimeError, match="before"):
        trigger.drop_steps(0, 1)
    with pytest.raises(ValueError, match="eos_prob"):
        trigger.update(torch.zeros(2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="entropy"):
        trigger.update(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="entropy"):
        trigger.update(torch.zeros(2))
    trigger.update(torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="row"):
        trigger.drop_steps(2, 1)
    with pytest.raises(ValueError, match="n_steps"):
        trigger.drop_steps(0, -1)


def reference(window: int, threshold: float, ops: list[tuple]) -> list[list[bool]]:
    """A plain-Python model of EarlyTrigger (EOS test only): one list of recent values per row."""
    history: list[list[float]] = []
    out: list[list[bool]] = []
    for op in ops:
        if op[0] == "update":
            probs = op[1]
            if not history:
                history = [[] for _ in probs]
            fired = []
            for row, p in enumerate(probs):
                history[row] = [*history[row], p][-window:]
                full = len(history[row]) == window
                fire = full and sum(history[row]) / window >= threshold
                if fire:
                    history[row] = []
                fired.append(fire)
            out.append(fired)
        elif history:
            _, row, n = op
            history[row] = history[row][: max(0, len(history[row]) - n)]
    return out


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 5),
    window=st.integers(1, 6),
    threshold=st.sampled_from([0.25, 0.5, 0.75]),
    data=st.data(),
)
def test_matches_reference_and_never_fires_within_cool_down(batch, window, threshold, data):
    steps = data.draw(st.integers(1, 30))
    ops: list[tuple] = []
    for _ in range(steps):
        probs = data.draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=batch, max_size=batch))
        ops.append(("update", probs))
        if data.draw(st.integers(0, 4)) == 0:
            ops.append(("rewind", data.draw(st.integers(0, batch - 1)), data.draw(st.integers(0, 4))))
    trigger = EarlyTrigger(window=window, eos_threshold=threshold)
    got: list[list[bool]] = []
    for op in ops:
        if op[0] == "update":
            got.append(trigger.update(torch.tensor(op[1]), torch.zeros(batch)).tolist())
        else:
            trigger.drop_steps(op[1], op[2])
    assert got == reference(window, threshold, ops)
    # Cool-down: within one row, two firings are at least `window` updates apart (rewinds only delay).
    for row in range(batch):
        fires = [i for i, f in enumerate(got) if f[row]]
        assert all(b - a >= window for a, b in pairwise(fires))
        assert not fires or fires[0] >= window - 1


# --- inside generation ---------------------------------------------------------------------------------------


class RisingEOS(LogitsProcessor):
    """EOS probability rises step by step in the scores the processors after it see."""

    def __init__(self, eos: int = 2) -> None:
        self.eos = eos

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores.clone()
        out[:, self.eos] = -5.0 + 1.0 * (input_ids.shape[1] - 3)
        return out  # type: ignore[return-value]


def rising_eos_model(eos: int = 2):
    """A tiny model whose own (raw) EOS logit rises with the position: an ending announced in advance."""
    model = make_perpetual(tiny_model("llama"))

    def hook(module, args, kwargs, output):
        position = kwargs["position_ids"][:, -1].float()
        output.logits[:, -1, eos] = -5.0 + 1.0 * (position - 2)
        return output

    model.register_forward_hook(hook, with_kwargs=True)
    return model


def test_early_trigger_restarts_the_method2_schedule_before_any_eviction() -> None:
    model = tiny_model("llama")
    trigger = EarlyTrigger(window=3, eos_threshold=0.05)
    proc = pl.PostEOSResamplingLogitsProcessor(2, schedule=pl.LinearDecay(2.0, 4), trigger=0.99, early_trigger=trigger)
    out = model.generate(
        torch.tensor([[1, 5, 6]]),
        do_sample=True,
        top_k=0,
        max_new_tokens=14,
        logits_processor=[RisingEOS(), proc],
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    early = proc.early_triggers[0]
    assert early, "the rising EOS probability must fire the early trigger"
    first = early[0]
    assert all(first < e for e in proc.evictions[0])  # before EOS would have been chosen
    # at the firing step the row is sampled at the schedule's peak: non-EOS scores are the raw logits / 2
    keep = torch.ones(64, dtype=torch.bool)
    keep[2] = False
    ratio = out.logits[first][0][keep] / out.scores[first][0][keep]
    assert torch.allclose(ratio, torch.full_like(ratio, 2.0), rtol=1e-4)
    if first > 0:
        before = out.logits[first - 1][0][keep] / out.scores[first - 1][0][keep]
        assert torch.allclose(before, torch.ones_like(before), rtol=1e-4)


def test_early_trigger_starts_the_backstep_schedule() -> None:
    model = rising_eos_model()
    cfg = BackstepConfig(
        n_remove=3,
        schedule=pl.LinearDecay(2.0, 4),
        early_trigger=EarlyTrigger(window=3, eos_threshold=0.05),
    )
    out = model.generate(
        torch.tensor([[1, 5, 6]]),
        do_sample=True,
        top_k=0,
        max_new_tokens=12,
        backstep=cfg,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    assert out.early_triggers[0], "fired on the rising EOS probability"
    j = out.early_triggers[0][0]
    assert j >= 2  # needs a full window first
    ratio = (out.logits[j][0] / out.scores[j][0])[torch.isfinite(out.scores[j][0])]
    # the step where it fired is sampled at the schedule's peak (raw logits / 2), EOS column aside
    assert torch.allclose(ratio[:2], torch.full((2,), 2.0), rtol=1e-4)
    assert out.backstep_stats.early_triggers == len(out.early_triggers[0])
