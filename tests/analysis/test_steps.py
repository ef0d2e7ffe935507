"""perpetual_logits.analysis (steps and plotting): statistics in bits, blocks, EOS window, figures."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import EOS, tiny_model

import perpetual_logits
from perpetual_logits.analysis import (
    StepStats,
    StepStatsRecorder,
    WindowStep,
    aligned_means,
    blockwise,
    eos_window,
    step_stats,
    token_label,
)

NEG = float("-inf")


def reference(probs: list[float], ids: list[int]) -> tuple[float, float, float, float]:
    """Independent float64 computation from probabilities, in bits."""
    p = np.asarray(probs, dtype=np.float64)
    p = p / p.sum()
    nz = p[p > 0]
    surprisal = -np.log2(nz)
    entropy = float((nz * surprisal).sum())
    varentropy = float((nz * (surprisal - entropy) ** 2).sum())
    p_set = float(p[ids].sum())
    info = math.inf if p_set == 0 else -math.log2(p_set)
    return p_set, info, entropy, varentropy


def one(scores: torch.Tensor, token_id: int | list[int] = 0) -> tuple[float, float, float, float]:
    stats = step_stats((scores,), token_id)[0]
    return stats.eos_prob[0], stats.info[0], stats.entropy[0], stats.varentropy[0]


# -- hand-made distributions -------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [2, 4, 7, 64, 2048])
def test_uniform(vocab):
    p, info, h, v = one(torch.zeros(1, vocab))
    assert p == pytest.approx(1 / vocab, rel=1e-5)
    assert info == pytest.approx(math.log2(vocab), rel=1e-5)
    assert h == pytest.approx(math.log2(vocab), rel=1e-5)
    assert v == pytest.approx(0.0, abs=1e-4)


def test_one_hot_on_eos_and_elsewhere():
    scores = torch.full((1, 5), NEG)
    scores[0, 3] = 1.0
    assert one(scores, 3) == (1.0, 0.0, 0.0, 0.0)
    p, info, h, v = one(scores, 0)
    assert (p, info, h, v) == (0.0, math.inf, 0.0, 0.0)


@pytest.mark.parametrize("a", [0.5, 0.25, 0.1, 0.9, 0.01])
def test_two_point(a):
    scores = torch.tensor([[math.log(a), math.log(1 - a), NEG]])
    p, info, h, v = one(scores, 0)
    entropy = -a * math.log2(a) - (1 - a) * math.log2(1 - a)
    varentropy = a * (1 - a) * math.log2(a / (1 - a)) ** 2
    assert p == pytest.approx(a, rel=1e-5)
    assert info == pytest.approx(-math.log2(a), rel=1e-5)
    assert h == pytest.approx(entropy, rel=1e-5)
    assert v == pytest.approx(varentropy, rel=1e-4, abs=1e-6)


def test_token_set_sums_probabilities():
    probs = [0.1, 0.2, 0.3, 0.4]
    scores = torch.tensor([probs]).log()
    p, info, _, _ = one(scores, [0, 2])
    assert p == pytest.approx(0.4, rel=1e-5)
    assert info == pytest.approx(-math.log2(0.4), rel=1e-5)


def test_random_distributions_match_reference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, 50, generator=gen) * 3  # (steps, batch, vocab)
    logits[2, 1, :40] = NEG  # a truncated distribution, as after top-k
    stats = step_stats(logits, [EOS, 7])
    for row in range(3):
        for step in range(6):
            probs = torch.softmax(logits[step, row].double(), -1).tolist()
            expected = reference(probs, [EOS, 7])
            got = tuple(getattr(stats[row], n)[step] for n in ("eos_prob", "info", "entropy", "varentropy"))
            assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_tiny_eos_probability_keeps_exact_information():
    # EOS at e^-120 underflows float32 as a probability, but its information content is still exact.
    scores = torch.tensor([[0.0, -120.0]])
    p, info, _, _ = one(scores, 1)
    assert info == pytest.approx(120 / math.log(2), rel=1e-5)
    assert 0.0 <= p < 1e-50 or p == 0.0


# -- properties ---------------------------------------------------------------------------------------------
score_value = st.one_of(
    st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32), st.just(NEG), st.just(-1e30)
)


@st.composite
def score_tensors(draw):
    steps = draw(st.integers(1, 4))
    batch = draw(st.integers(1, 3))
    vocab = draw(st.integers(2, 12))
    flat = draw(st.lists(score_value, min_size=steps * batch * vocab, max_size=steps * batch * vocab))
    scores = torch.tensor(flat, dtype=torch.float32).reshape(steps, batch, vocab)
    # Every row needs one finite score to be a distribution.
    keep = draw(st.integers(0, vocab - 1))
    scores[..., keep] = torch.where(torch.isfinite(scores[..., keep]), scores[..., keep], torch.tensor(0.0))
    token = draw(st.integers(0, vocab - 1))
    return scores, token


@settings(max_examples=60, deadline=None)
@given(score_tensors())
def test_never_nan_and_in_range(case):
    scores, token = case
    steps, batch, vocab = scores.shape
    stats = step_stats(scores, token)
    assert len(stats) == batch
    for row in stats:
        assert len(row) == steps
        for p, info, h, v in zip(row.eos_prob, row.info, row.entropy, row.varentropy, strict=True):
            assert not any(math.isnan(x) for x in (p, info, h, v))
            assert 0.0 <= p <= 1.0 + 1e-6
            assert info >= -1e-5  # bits, possibly inf
            assert -1e-6 <= h <= math.log2(vocab) + 1e-4
            assert v >= 0.0 and math.isfinite(v)
            if p > 1e-30:  # below that, p itself is a rounded float32 subnormal; info is the exact one
                assert info == pytest.approx(-math.log2(p), rel=1e-3, abs=1e-4)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-100, 100), max_size=40), st.integers(1, 50), st.booleans())
def test_blockwise_properties(values, size, from_end):
    blocks = blockwise(values, size, from_end=from_end)
    assert len(blocks) == math.ceil(len(values) / size)
    if values:
        # Block means weighted by block lengths give back the overall mean.
        lengths = [size] * len(blocks)
        short = len(values) - size * (len(blocks) - 1)
        lengths[0 if from_end else -1] = short
        total = sum(m * n for m, n in zip(blocks, lengths, strict=True))
        assert total == pytest.approx(sum(values), abs=1e-6 * (1 + sum(abs(x) for x in values)))


# -- validation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("logits", "message"),
    [
        (torch.zeros(2, 5), "steps, batch, vocab"),
        ((), "empty"),
        ((torch.zeros(1, 5), torch.zeros(2, 5)), "one shape"),
        ("abc", "tuple of"),
        (torch.zeros(1, 1, 5, dtype=torch.long), "floating point"),
        (torch.tensor([[[0.0, float("nan")]]]), "NaN"),
        (torch.tensor([[[0.0, float("inf")]]]), "NaN or \\+inf"),
        (torch.tensor([[[NEG, NEG]]]), "no finite score"),
    ],
)
def test_step_stats_rejects(logits, message):
    with pytest.raises(ValueError, match=message):
        step_stats(logits, 0)


def test_step_stats_rejects_bad_token_and_lengths():
    with pytest.raises(ValueError, match="token_id"):
        step_stats((torch.zeros(1, 4),), 4)
    with pytest.raises(ValueError, match="token_id"):
        step_stats((torch.zeros(1, 4),), -1)
    with pytest.raises(ValueError, match="one entry per row"):
        step_stats((torch.zeros(2, 4),), 0, lengths=[1])
    with pytest.raises(ValueError, match=r"ints in \[0, 1\]"):
        step_stats((torch.zeros(1, 4),), 0, lengths=[2])


def test_lengths_cut_rows_and_tuple_equals_stack():
    steps = tuple(torch.randn(2, 9, generator=torch.Generator().manual_seed(i)) for i in range(5))
    full = step_stats(steps, 1)
    assert step_stats(torch.stack(steps), 1) == full
    cut = step_stats(steps, 1, lengths=[5, 2])
    assert cut[0] == full[0]
    assert cut[1] == full[1][:2] and len(cut[1]) == 2


def test_stepstats_container():
    stats = StepStats([0.5, 0.25], [1.0, 2.0], [1.0, 2.0], [0.0, 0.0])
    assert len(stats) == 2 and stats[1:].info == [2.0]
    assert stats.to_dict()["eos_prob"] == [0.5, 0.25]
    with pytest.raises(ValueError, match="same length"):
        StepStats([0.5], [], [], [])
    with pytest.raises(TypeError, match="slicing"):
        stats[0]  # type: ignore[index]


# -- blockwise ----------------------------------------------------------------------------------------------
def test_blockwise_ragged_and_large_blocks():
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert blockwise(values, 3) == [2.0, 5.0, 7.0]  # last block short
    assert blockwise(values, 3, from_end=True) == [1.0, 3.0, 6.0]  # first block short
    assert blockwise(values, 7) == [4.0]
    assert blockwise(values, 100) == [4.0]  # block larger than the run: one block
    assert blockwise(values, 1) == values
    assert blockwise([], 5) == []


def test_blockwise_stepstats():
    stats = StepStats([0.0, 1.0, 0.5], [1.0, 3.0, 5.0], [2.0, 2.0, 2.0], [0.0, 2.0, 4.0])
    blocks = blockwise(stats, 2)
    assert blocks == StepStats([0.5, 0.5], [2.0, 5.0], [2.0, 2.0], [1.0, 4.0])


@pytest.mark.parametrize("size", [0, -3, 1.5, True, "2", None])
def test_blockwise_rejects_block_size(size):
    with pytest.raises(ValueError, match="`block_size` must be an int >= 1"):
        blockwise([1.0, 2.0], size)


def test_blockwise_rejects_other_input():
    with pytest.raises(ValueError, match="`stats`"):
        blockwise("abc", 2)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="`from_end`"):
        blockwise([1.0], 2, from_end=1)  # type: ignore[arg-type]


def test_aligned_means():
    runs = [[1.0, 2.0, 3.0], [5.0], [math.inf, 4.0]]
    assert aligned_means(runs) == [3.0, 3.0, 3.0]
    assert aligned_means(runs, from_end=True) == [1.0, 2.0, 4.0]
    assert aligned_means([[math.inf]])[0] != aligned_means([[math.inf]])[0]  # NaN: nothing finite
    assert aligned_means([]) == []


# -- recorder -----------------------------------------------------------------------------------------------
def test_recorder_changes_nothing_and_records():
    recorder = StepStatsRecorder(eos_token_id=2)
    scores = torch.randn(2, 6, generator=torch.Generator().manual_seed(3))
    scores[1, 4] = NEG
    out = recorder(torch.tensor([[1, 3], [1, 4]]), scores.clone())
    assert torch.equal(out, scores) and out.dtype == scores.dtype
    recorder(torch.tensor([[1, 3, 5], [1, 4, 5]]), scores.clone())
    stats = recorder.stats
    assert len(stats) == 2 and all(len(s) == 2 for s in stats)
    assert stats[0] == step_stats((scores, scores), 2)[0]


def test_recorder_token_set_and_validation():
    recorder = StepStatsRecorder(eos_token_id=2, token_id=[0, 1])
    recorder(torch.tensor([[1]]), torch.zeros(1, 4))
    assert recorder.stats[0].eos_prob[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="token_id"):
        StepStatsRecorder(eos_token_id=2, token_id=[])
    with pytest.raises(ValueError, match="eos_token_id"):
        StepStatsRecorder(eos_token_id=-1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        StepStatsRecorder(eos_token_id=2, token_id=9)(torch.tensor([[1]]), torch.zeros(1, 4))
    # Inside generate() the recorder does not validate every step (that would cost three passes and a
    # host sync per token): scores pass through untouched, whatever they hold.
    odd = torch.tensor([[0.0, float("nan"), 0.0]])
    assert StepStatsRecorder(eos_token_id=2)(torch.tensor([[1]]), odd) is odd


def test_recorder_drops_rewound_positions():
    recorder = StepStatsRecorder(eos_token_id=0)
    recorder.start(batch_size=1, prompt_length=2)
    for i in range(4):  # generated steps 0..3
        recorder(torch.zeros(1, 2 + i, dtype=torch.long), torch.tensor([[float(i), 0.0, 0.0]]))
    recorder.rewind(0, 3)  # keep one generated token: steps 1..3 are gone
    recorder(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[10.0, 0.0, 0.0]]))
    probs = recorder.stats[0].eos_prob
    assert len(probs) == 2
    assert probs[0] == pytest.approx(1 / 3)  # step 0 kept
    assert probs[1] == pytest.approx(math.exp(10) / (math.exp(10) + 2), rel=1e-5)  # the redrawn step 1


def test_recorder_agrees_with_output_logits_of_generate():
    model = tiny_model("llama")
    recorder = StepStatsRecorder(EOS)
    prompt = torch.tensor([[1, 5, 6, 7], [1, 9, 10, 11]])
    torch.manual_seed(0)
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=True,
        top_k=5,
        max_new_tokens=12,
        logits_processor=[recorder],
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=0,
    )
    expected = step_stats(out.logits, EOS)
    got = recorder.stats
    assert len(got) == 2 and len(got[0]) == len(out.logits)
    for g, e in zip(got, expected, strict=True):
        for name in ("eos_prob", "info", "entropy", "varentropy"):
            assert getattr(g, name) == pytest.approx(getattr(e, name), rel=1e-5, abs=1e-6)
    # A second call starts fresh records.
    model.generate(prompt, do_sample=False, max_new_tokens=3, logits_processor=[recorder], pad_token_id=0)
    assert all(len(s) == 3 for s in recorder.stats)


@pytest.mark.skipif(not hasattr(perpetual_logits, "make_perpetual"), reason="backstep generation not there yet")
def test_recorder_follows_backstep_rewinds():
    model = perpetual_logits.make_perpetual(tiny_model("llama"))
    recorder = StepStatsRecorder(EOS)

    def boost_eos(input_ids, scores):  # after the recorder: EOS gets sampled often, the records stay raw
        return scores + 3.0 * (torch.arange(scores.shape[-1]) == EOS)

    torch.manual_seed(1)
    out = model.generate(
        torch.tensor([[1, 5, 6]]),
        do_sample=True,
        max_new_tokens=40,
        logits_processor=[recorder, boost_eos],
        backstep=perpetual_logits.BackstepConfig(n_remove=3),
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=0,
    )
    generated = out.sequences.shape[1] - 3
    assert out.backstep_events[0], "EOS boosted by +3 should be sampled in 40 tokens"
    stats = recorder.stats[0]
    assert len(stats) == generated  # one record per kept position, rewound ones dropped
    raw = step_stats(out.logits, EOS)[0]
    # At a rewind point the loop bans EOS before the processors run: there the recorder saw EOS at -inf.
    banned = step_stats(tuple(t.index_fill(-1, torch.tensor([EOS]), NEG) for t in out.logits), EOS)[0]
    rewind_points = {e.position for e in out.backstep_events[0]}
    for j in range(generated):
        if j in rewind_points and stats.eos_prob[j] == 0.0:
            assert stats.info[j] == math.inf
            assert stats.entropy[j] == pytest.approx(banned.entropy[j], rel=1e-5, abs=1e-6)
        else:
            assert stats.entropy[j] == pytest.approx(raw.entropy[j], rel=1e-5, abs=1e-6)
            assert stats.eos_prob[j] == pytest.approx(raw.eos_prob[j], rel=1e-4, abs=1e-9)


# -- EOS window ---------------------------------------------------------------------------------------------
class Vocab:
    """A decode()-only tokenizer: id i -> WORDS[i]."""

    WORDS = ("<eos>", "\n", "cat", " ", "", "a\tb")

    def decode(self, ids, **kwargs):
        return self.WORDS[ids[0]]


def test_token_label():
    labels = [token_label(Vocab(), i) for i in range(6)]
    assert labels == ["<eos>", "\\n", "cat", "' '", "<4>", "a\\tb"]


def test_eos_window():
    gen = torch.Generator().manual_seed(0)
    steps = tuple(torch.randn(2, 6, generator=gen) for _ in range(8))
    window = eos_window(steps, Vocab(), k=3, last=5, row=1)
    assert [w.step for w in window] == [3, 4, 5, 6, 7]
    assert [w.offset for w in window] == [-5, -4, -3, -2, -1]
    for w in window:
        assert len(w.tokens) == 3 and w.probs == sorted(w.probs, reverse=True)
        probs = torch.softmax(steps[w.step][1], -1)
        assert w.token_ids == probs.topk(3).indices.tolist()
        assert w.probs == pytest.approx(probs.topk(3).values.tolist())
        assert all("\n" not in t for t in w.tokens)
    short = eos_window(steps, Vocab(), k=100, last=5, length=2)
    assert [w.step for w in short] == [0, 1] and len(short[0].tokens) == 6
    assert window[0].to_dict()["step"] == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"k": 0}, "`k`"), ({"last": 0}, "`last`"), ({"row": 2}, "`row`"), ({"length": 9}, "lengths")],
)
def test_eos_window_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        eos_window((torch.zeros(2, 6),), Vocab(), **kwargs)


# -- figures ------------------------------------------------------------------------------------------------
PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_are_written(tmp_path):
    from perpetual_logits.analysis.plotting import plot_blockwise, plot_eos_window

    gen = torch.Generator().manual_seed(0)
    runs = [step_stats(torch.randn(n, 1, 30, generator=gen), 2)[0] for n in (40, 55, 12)]
    for align in ("start", "end"):
        out = plot_blockwise(runs, tmp_path / f"sub/{align}.png", block_size=10, align=align)
        assert out.read_bytes().startswith(PNG) and out.stat().st_size > 10_000
    window = eos_window(torch.randn(6, 1, 6, generator=gen), Vocab(), k=4, last=3)
    out = plot_eos_window(window, tmp_path / "window.png", highlight={0})
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 10_000


def test_plot_validation(tmp_path):
    from perpetual_logits.analysis.plotting import plot_blockwise, plot_eos_window

    run = StepStats([0.1], [3.3], [1.0], [0.5])
    with pytest.raises(ValueError, match=r"\.png"):
        plot_blockwise(run, tmp_path / "x.pdf")
    with pytest.raises(ValueError, match="`align`"):
        plot_blockwise(run, tmp_path / "x.png", align="middle")
    with pytest.raises(ValueError, match="`stats`"):
        plot_blockwise([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="`block_size`"):
        plot_blockwise(run, tmp_path / "x.png", block_size=0)
    with pytest.raises(ValueError, match="`min_runs`"):
        plot_blockwise(run, tmp_path / "x.png", min_runs=0)
    with pytest.raises(ValueError, match="`window`"):
        plot_eos_window([], tmp_path / "x.png")
    assert not any(tmp_path.iterdir())
    plot_eos_window([WindowStep(0, -1, [0], ["<eos>"], [1.0])], tmp_path / "ok.png")


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    from perpetual_logits.analysis.plotting import plot_blockwise

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'perpetual-logits\[plot\]'"):
        plot_blockwise(StepStats([0.1], [3.3], [1.0], [0.5]), tmp_path / "x.png")
