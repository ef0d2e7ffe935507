"""Per-row truncation (perpetual_logits.truncation) and Method 2's widened truncation after an eviction."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import EOS, STORIES260K, TINYSTORIES, require_model_dir, tiny_model
from transformers import (
    GenerationConfig,
    LogitNormalization,
    LogitsProcessor,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from perpetual_logits import Constant, LinearDecay, PostEOSResamplingLogitsProcessor, StepDecay, Truncation, Widening
from perpetual_logits.processor_list import (
    StepProcessors,
    check_no_double_truncation,
    configured_truncation,
    take_over_truncation,
)
from perpetual_logits.truncation import RowTruncation, TruncationSchedule, truncate_rows, weight_table

NEG = float("-inf")


def reference(row: torch.Tensor, k: int, p: float, m: float, temperature: float = 1.0, keep: int = 1) -> torch.Tensor:
    """transformers' own warpers on one row, in generate()'s order, each only when it is on."""
    warpers: list[LogitsProcessor] = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if k > 0:
        warpers.append(TopKLogitsWarper(k, min_tokens_to_keep=keep))
    if p < 1.0:
        warpers.append(TopPLogitsWarper(p, min_tokens_to_keep=keep))
    if m > 0.0:
        warpers.append(MinPLogitsWarper(m, min_tokens_to_keep=keep))
    return LogitsProcessorList(warpers)(torch.ones(1, 1, dtype=torch.long), row[None].clone())[0]


@st.composite
def cases(draw: st.DrawFn):
    batch = draw(st.integers(1, 6))
    vocab = draw(st.integers(2, 70))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, vocab, generator=gen) * draw(st.floats(0.1, 8.0))
    levels = draw(st.sampled_from([0, 2, 4]))  # 0: continuous; else rounded to few values -> many ties
    if levels:
        scores = torch.round(scores * levels / 4) * 4 / levels
    inf_share = draw(st.sampled_from([0.0, 0.2, 0.6]))
    holes = torch.rand(batch, vocab, generator=gen) < inf_share
    holes[:, 0] = False  # every row keeps one finite score
    scores = scores.masked_fill(holes, NEG).to(draw(st.sampled_from([torch.float32, torch.float64])))
    ks = draw(st.lists(st.integers(0, vocab + 3), min_size=batch, max_size=batch))
    ps = draw(st.lists(st.sampled_from([1.0, 0.95, 0.9, 0.8, 0.5, 0.3, 0.1, 0.01]), min_size=batch, max_size=batch))
    ms = draw(st.lists(st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.3, 1.0]), min_size=batch, max_size=batch))
    temperature = draw(st.sampled_from([1.0, 0.7, 1.5]))
    keep = draw(st.sampled_from([1, 1, 2, 3]))
    return scores, ks, ps, ms, temperature, keep


@given(cases())
@settings(max_examples=300, deadline=None)
def test_truncate_rows_equals_transformers_warpers_row_by_row(case) -> None:
    scores, ks, ps, ms, temperature, keep = case
    out = truncate_rows(
        scores,
        torch.tensor(ks),
        torch.tensor(ps, dtype=torch.float64),
        torch.tensor(ms, dtype=torch.float64),
        temperature=temperature,
        min_tokens_to_keep=keep,
    )
    assert out.dtype == scores.dtype and out.shape == scores.shape
    finite = torch.isfinite(out)
    # The kept scores are the input's, unchanged (the temperature only decides which are kept).
    assert torch.equal(out[finite], scores[finite])
    for row in range(scores.shape[0]):
        expected = reference(scores[row], ks[row], ps[row], ms[row], temperature, keep)
        assert torch.equal(out[row] / temperature if temperature != 1.0 else out[row], expected), row


def test_top_p_threshold_is_computed_like_transformers() -> None:
    """transformers compares with ``1 - top_p`` computed in double precision (a Python float); a cumulative
    probability of 0.1000000164 lies between that (0.1000000015 in float32) and 1 - float32(0.9)."""
    scores = torch.tensor([[-2.1972243785858154, 0.0]])
    assert scores.sort().values.softmax(-1).cumsum(-1)[0, 0].item() == pytest.approx(0.1000000164, abs=1e-10)
    out = truncate_rows(scores, top_p=torch.tensor([0.9], dtype=torch.float64))
    assert torch.equal(out[0], reference(scores[0], 0, 0.9, 0.0))
    assert torch.isfinite(out).all()


@given(cases())
@settings(max_examples=60, deadline=None)
def test_off_values_change_nothing_and_return_new_tensor(case) -> None:
    scores = case[0]
    batch = scores.shape[0]
    out = truncate_rows(
        scores, torch.zeros(batch, dtype=torch.long), torch.ones(batch), torch.zeros(batch), temperature=0.5
    )
    assert torch.equal(out, scores) and out.data_ptr() != scores.data_ptr()


def test_truncate_rows_validation() -> None:
    scores = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="scores"):
        truncate_rows(torch.zeros(5))
    with pytest.raises(ValueError, match="top_k"):
        truncate_rows(scores, top_k=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="min_tokens_to_keep"):
        truncate_rows(scores, min_tokens_to_keep=0)
    with pytest.raises(ValueError, match="temperature"):
        truncate_rows(scores, temperature=0.0)


# -- Truncation / Widening / TruncationSchedule -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": "0.9"}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
    ],
)
def test_truncation_validation(kwargs, name) -> None:
    with pytest.raises(ValueError, match=f"`{name}`"):
        Truncation(**kwargs)
    if name != "temperature":
        with pytest.raises(ValueError, match=f"`{name}`"):
            Widening(**kwargs)
        with pytest.raises(ValueError, match=f"`{name}`"):
            RowTruncation(**kwargs)


def test_widen_validation() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Widening()
    with pytest.raises(ValueError, match="`schedule`"):
        Widening(top_k=100, schedule=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`top_k`=20 is narrower"):
        Widening(top_k=20).check(Truncation(top_k=50))
    with pytest.raises(ValueError, match=r"`top_k`=200 is narrower than the configured top_k=0"):
        Widening(top_k=200).check(Truncation(top_k=0))
    with pytest.raises(ValueError, match=r"`top_p`=0\.8 is narrower"):
        Widening(top_p=0.8).check(Truncation(top_p=0.9))
    with pytest.raises(ValueError, match=r"`min_p`=0\.2 is narrower"):
        Widening(min_p=0.2).check(Truncation(min_p=0.1))
    Widening(top_k=0, top_p=1.0, min_p=0.0).check(Truncation(top_k=50, top_p=0.9, min_p=0.1))  # off is widest
    with pytest.raises(ValueError, match="`schedule`"):
        TruncationSchedule(Truncation(), Widening(top_k=100))


def test_schedule_mapping() -> None:
    plan = TruncationSchedule(Truncation(top_k=50, top_p=0.9, min_p=0.1), Widening(top_k=200, top_p=0.99, min_p=0.0),
                              LinearDecay(2.0, 10))  # fmt: skip
    steps = torch.arange(12)
    values = plan.row_values(steps, torch.ones(12, dtype=torch.bool), 2048)
    assert values.top_k.tolist() == [200, 185, 170, 155, 140, 125, 110, 95, 80, 65, 50, 50]
    assert values.top_p[0].item() == 0.99 and values.top_p[10:].tolist() == [0.9, 0.9]
    assert values.min_p[0].item() == 0.0 and values.min_p[10:].tolist() == [0.1, 0.1]
    assert values.top_p[5].item() == pytest.approx(0.945)
    idle = plan.row_values(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.bool), 2048)
    assert idle.top_k.tolist() == [50] * 3 and idle.top_p.tolist() == [0.9] * 3 and idle.min_p.tolist() == [0.1] * 3
    # A truncation that is off in every row at every step is None (truncate_rows skips it).
    plan = TruncationSchedule(Truncation(top_k=50), Widening(top_k=200), LinearDecay(2.0, 10))
    values = plan.row_values(steps, torch.ones(12, dtype=torch.bool), 2048)
    assert values.top_p is None and values.min_p is None
    assert values.top_k is not None and values.top_k.tolist() == [200, 185, 170, 155, 140, 125, 110, 95, 80, 65, 50, 50]
    plan = TruncationSchedule(Truncation(top_k=50, top_p=0.9), Widening(top_p=1.0), LinearDecay(2.0, 10))
    values = plan.row_values(steps, torch.ones(12, dtype=torch.bool), 2048)
    assert values.top_p is not None and values.top_p[0].item() == 1.0 and values.top_p[10].item() == 0.9
    assert values.top_k is not None and values.top_k.tolist() == [50] * 12


def test_schedule_mapping_off_values_and_odd_schedules() -> None:
    vocab = 100
    active = torch.ones(4, dtype=torch.bool)
    # top_k=0 ("off") counts as the vocabulary size, and comes back as 0 at the event.
    plan = TruncationSchedule(Truncation(top_k=50), Widening(top_k=0), LinearDecay(3.0, 2))
    assert plan.row_values(torch.arange(4), active, vocab).top_k.tolist() == [0, 75, 50, 50]
    # A flat schedule (peak 1.0) keeps the wide values for its length.
    plan = TruncationSchedule(Truncation(top_k=5), Widening(top_k=20), Constant(1.0, steps=2))
    assert plan.row_values(torch.arange(4), active, vocab).top_k.tolist() == [20, 20, 5, 5]
    # A schedule that never ends keeps them forever; widen.schedule wins over the caller's schedule.
    plan = TruncationSchedule(Truncation(top_k=5), Widening(top_k=20, schedule=Constant(2.0)), LinearDecay(2.0, 1))
    assert plan.row_values(torch.tensor([0, 5, 10**6, 3]), active, vocab).top_k.tolist() == [20, 20, 20, 20]
    # Cooling schedules map the same way (w = (f - 1) / (f(0) - 1)).
    assert weight_table(LinearDecay(0.5, 2)).tolist() == [1.0, 0.5, 0.0]
    assert weight_table(StepDecay(1.3)).tolist() == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])


# -- RowTruncation and processor lists ---------------------------------------------------------------------
def test_row_truncation_set_rows_and_defaults() -> None:
    scores = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    ids = torch.ones(3, 1, dtype=torch.long)
    proc = RowTruncation(top_k=10, top_p=0.9)
    chain = LogitsProcessorList([TopKLogitsWarper(10), TopPLogitsWarper(0.9)])
    assert torch.equal(proc(ids, scores), chain(ids, scores.clone()))
    proc.set_rows(top_k=torch.tensor([10, 20, 0]))
    out = proc(ids, scores)
    for row, k in enumerate([10, 20, 0]):
        assert torch.equal(out[row], reference(scores[row], k, 0.9, 0.0))
    proc.set_rows()  # back to the configured values
    assert torch.equal(proc(ids, scores), chain(ids, scores.clone()))
    proc.set_rows(top_p=torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="2 values for a batch of 3"):
        proc(ids, scores)
    with pytest.raises(ValueError, match="`top_k`"):
        proc.set_rows(top_k=[1, 2, 3])  # type: ignore[arg-type]


def test_take_over_truncation_on_generate_built_list() -> None:
    model = tiny_model("llama")
    captured: list[LogitsProcessorList] = []
    original = model._get_logits_processor

    def spy(*args, **kwargs):
        captured.append(original(*args, **kwargs))
        return captured[-1]

    model._get_logits_processor = spy  # type: ignore[method-assign]
    model.generate(
        torch.tensor([[1, 5, 6]]),
        do_sample=True,
        max_new_tokens=2,
        temperature=0.7,
        top_k=20,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.2,
        pad_token_id=0,
    )
    built = captured[0]
    names = [type(p).__name__ for p in built]
    assert names[-3:] == ["TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper"]
    assert configured_truncation(built) == Truncation(20, 0.9, 0.05, 0.7)
    new, rows = take_over_truncation(built)
    assert [type(p).__name__ for p in new] == [*names[:-3], "RowTruncation"]
    assert rows.configured == Truncation(20, 0.9, 0.05, 0.7) and len(built) == len(names)  # input unchanged
    ids = torch.ones(4, 3, dtype=torch.long)
    scores = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 3
    assert torch.equal(new(ids, scores.clone()), built(ids, scores.clone()))


def test_take_over_truncation_placement_and_errors() -> None:
    new, rows = take_over_truncation([TemperatureLogitsWarper(0.5), TypicalLogitsWarper(0.9), LogitNormalization()])
    assert [type(p).__name__ for p in new] == [
        "TemperatureLogitsWarper",
        "RowTruncation",
        "TypicalLogitsWarper",
        "LogitNormalization",
    ]
    assert rows.configured == Truncation(top_k=0, temperature=0.5)
    new, rows = take_over_truncation([])
    assert [type(p).__name__ for p in new] == ["RowTruncation"]
    with pytest.raises(ValueError, match="more than one TopKLogitsWarper"):
        take_over_truncation([TopKLogitsWarper(5), TemperatureLogitsWarper(0.5), TopKLogitsWarper(5)])
    with pytest.raises(ValueError, match="not next to each other"):
        take_over_truncation([TopKLogitsWarper(5), TemperatureLogitsWarper(0.5), TopPLogitsWarper(0.9)])
    with pytest.raises(ValueError, match="min_tokens_to_keep"):
        take_over_truncation([TopKLogitsWarper(5, min_tokens_to_keep=2), TopPLogitsWarper(0.9)])


def test_check_no_double_truncation() -> None:
    owner = PostEOSResamplingLogitsProcessor(EOS, widen=Widening(top_k=100), truncation=Truncation(top_k=20))
    plain = PostEOSResamplingLogitsProcessor(EOS)
    with pytest.raises(ValueError, match="top_k=50"):
        check_no_double_truncation([owner], GenerationConfig(do_sample=True, top_k=50))
    with pytest.raises(ValueError, match=r"top_p=0\.9"):
        check_no_double_truncation([owner], GenerationConfig(do_sample=True, top_k=0, top_p=0.9))
    with pytest.raises(ValueError, match="temperature"):
        check_no_double_truncation([owner], GenerationConfig(do_sample=True, top_k=0, temperature=0.7))
    check_no_double_truncation([owner], GenerationConfig(**owner.generate_kwargs()))
    check_no_double_truncation([owner], GenerationConfig(do_sample=False, top_k=50))  # greedy: no warpers
    check_no_double_truncation([plain], GenerationConfig(do_sample=True, top_k=50))


# -- Method 2 -------------------------------------------------------------------------------------------------
def test_method2_widen_validation() -> None:
    with pytest.raises(ValueError, match="`truncation` must be a Truncation"):
        PostEOSResamplingLogitsProcessor(EOS, widen=Widening(top_k=100))
    with pytest.raises(ValueError, match="`widen` must be a Widening"):
        PostEOSResamplingLogitsProcessor(EOS, truncation=Truncation())
    with pytest.raises(ValueError, match="`widen` must be a Widening"):
        PostEOSResamplingLogitsProcessor(EOS, widen=(50, 200), truncation=Truncation())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="narrower"):
        PostEOSResamplingLogitsProcessor(EOS, widen=Widening(top_k=10), truncation=Truncation(top_k=50))
    proc = PostEOSResamplingLogitsProcessor(EOS, widen=Widening(top_p=0.99), truncation=Truncation(top_p=0.9))
    assert proc.generate_kwargs() == {"do_sample": True, "top_k": 0, "top_p": 1.0, "min_p": None, "temperature": 1.0}
    assert PostEOSResamplingLogitsProcessor(EOS).generate_kwargs() == {"do_sample": True}


class EOSAt(LogitsProcessor):
    """Puts EOS on top in chosen rows at chosen generated steps (so an argmax trigger evicts exactly there)."""

    def __init__(self, prompt_length: int, events: dict[int, set[int]]) -> None:
        self.prompt_length, self.events = prompt_length, events

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        out = scores.clone()
        for row in self.events.get(step, ()):
            out[row, EOS] = out[row].max() + 5.0
        return out  # type: ignore[return-value]


def test_method2_widened_counts_follow_the_schedule_per_row() -> None:
    """Row 0 is evicted at steps 3 and 9, row 2 at step 5, row 1 never: finite counts per row and step."""
    model = tiny_model("llama", vocab=256)
    prompt = torch.tensor([[1, 5, 6, 7]] * 3)
    events = {3: {0}, 5: {2}, 9: {0}}
    proc = PostEOSResamplingLogitsProcessor(
        EOS, schedule=LinearDecay(2.0, 4), trigger="argmax", widen=Widening(top_k=90), truncation=Truncation(top_k=10)
    )
    torch.manual_seed(0)
    out = model.generate(
        prompt,
        logits_processor=[EOSAt(4, events), proc],
        max_new_tokens=20,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
        **proc.generate_kwargs(),
    )
    assert proc.evictions == [[3, 9], [], [5]]
    counts = torch.stack([torch.isfinite(s).sum(-1) for s in out.scores], dim=1).tolist()  # (batch, steps)
    ramp = [90, 70, 50, 30]  # w = 1, 3/4, 1/2, 1/4 -> round(10 + 80 w); then 10
    expected0 = [10] * 3 + ramp + [10, 10] + ramp + [10] * 7
    expected2 = [10] * 5 + ramp + [10] * 11
    assert counts == [expected0, [10] * 20, expected2]


@pytest.mark.models
def test_method2_widened_scores_equal_per_row_warpers_on_tinystories(tinystories) -> None:
    """A real run: every step's final scores equal transformers' warpers applied row by row, at the row's
    effective temperature and truncation (widened after its evictions, configured elsewhere)."""
    model, tokenizer = tinystories
    eos = int(model.config.eos_token_id)
    schedule = LinearDecay(2.0, 10)
    configured = Truncation(top_k=50, top_p=0.9, temperature=0.8)
    proc = PostEOSResamplingLogitsProcessor(
        eos, schedule=schedule, widen=Widening(top_k=200, top_p=0.99), truncation=configured
    )
    batch = tokenizer(["Once upon a time"] * 3, return_tensors="pt")
    plen = batch.input_ids.shape[1]
    torch.manual_seed(3)
    out = model.generate(
        **batch,
        logits_processor=[proc],
        max_new_tokens=260,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        **proc.generate_kwargs(),
    )
    assert out.sequences.shape[1] - plen == 260
    evictions = proc.evictions
    assert sum(map(len, evictions)) >= 2, evictions
    widened_steps = 0
    for row in range(3):
        last = None
        for step, (logits, final) in enumerate(zip(out.logits, out.scores)):
            if step in evictions[row]:
                last = step
            s = None if last is None else step - last
            m = 1.0 if s is None else schedule(s)
            w = 0.0 if s is None else max(0.0, (schedule(s) - 1.0) / (schedule(0) - 1.0))
            k = round(50 + w * 150)
            p = (1.0 - w) * 0.9 + w * 0.99
            x = logits[row] / torch.tensor(m, dtype=torch.float32)
            x[eos] = NEG
            expected = reference(x, k, p, 0.0, temperature=0.8)
            assert torch.equal(final[row], expected), (row, step)
            widened_steps += w > 0
    assert widened_steps >= 10


@pytest.mark.models
def test_method2_widened_is_wider_only_after_evictions_on_tinystories(tinystories) -> None:
    """top_k only: exactly 50 finite scores per step except in the 10 steps after an eviction (200 -> 65)."""
    model, tokenizer = tinystories
    eos = int(model.config.eos_token_id)
    proc = PostEOSResamplingLogitsProcessor(
        eos, schedule=LinearDecay(2.0, 10), widen=Widening(top_k=200), truncation=Truncation(top_k=50)
    )
    batch = tokenizer(["Once upon a time", "Tom had a big red ball"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = model.generate(
        **batch,
        logits_processor=[proc],
        max_new_tokens=300,
        return_dict_in_generate=True,
        output_scores=True,
        **proc.generate_kwargs(),
    )
    counts = torch.stack([torch.isfinite(s).sum(-1) for s in out.scores], dim=1).tolist()
    assert all(proc.evictions), proc.evictions
    for row in range(2):
        expected, last = [], None
        for step in range(300):
            if step in proc.evictions[row]:
                last = step
            s = None if last is None else step - last
            expected.append(50 if s is None or s >= 10 else 200 - 15 * s)
        assert counts[row] == expected
        assert (
            counts[row][proc.evictions[row][0]] == 200
            and counts[row][: proc.evictions[row][0]] == [50] * (proc.evictions[row][0])
        )


@pytest.mark.models
def test_method2_widen_leaves_greedy_unchanged(tinystories) -> None:
    model, tokenizer = tinystories
    eos = int(model.config.eos_token_id)
    inputs = tokenizer("Once upon a time", return_tensors="pt")
    outs = []
    for widen in (None, Widening(top_k=200, top_p=0.99)):
        kwargs = {"widen": widen, "truncation": Truncation(top_k=50, top_p=0.9)} if widen else {}
        proc = PostEOSResamplingLogitsProcessor(eos, trigger="argmax", **kwargs)  # type: ignore[arg-type]
        outs.append(model.generate(**inputs, do_sample=False, max_new_tokens=250, logits_processor=[proc]))
        assert proc.evictions[0], "greedy run had no eviction to widen after"
    assert torch.equal(outs[0], outs[1])


@pytest.mark.models
@pytest.mark.slow
def test_quality_widening_benchmark_smoke(tmp_path) -> None:
    import json

    require_model_dir(TINYSTORIES)
    require_model_dir(STORIES260K)
    from benchmarks import quality_widening

    out = tmp_path / "results"
    assert quality_widening.main(["--smoke", "--out", str(out)]) == 0
    data = json.loads((out / "quality_widening.json").read_text())
    assert set(data["arms"]) == set(quality_widening.ARMS)
    assert data["pairs_whose_method2_arms_differ_before_first_eviction"] == 0
    assert data["eligible_pairs"] >= 1
    for name, arm in data["arms"].items():
        assert arm["runs"] == data["settings"]["runs"]
        if name != "baseline":
            assert arm["new_tokens"]["min"] == data["settings"]["max_new_tokens"]
            assert arm["near"]["bpc"] > 0 and arm["far"]["pairs"] == data["eligible_pairs"]
    text = (out / "quality_widening.md").read_text()
    assert "### Definitions" in text and "context gain" in text


def test_a_perpetual_model_refuses_double_truncation_with_a_widening_processor() -> None:
    import perpetual_logits as pl

    model = pl.make_perpetual(tiny_model("llama"))
    wide = pl.PostEOSResamplingLogitsProcessor(
        EOS, schedule=pl.LinearDecay(2.0, 4), widen=pl.Widening(top_k=40), truncation=pl.Truncation(top_k=10)
    )
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(ValueError, match="top_k"):
        model.generate(ids, do_sample=True, top_k=10, max_new_tokens=3, logits_processor=[wide])
    out = model.generate(ids, max_new_tokens=3, logits_processor=[wide], **wide.generate_kwargs())
    assert out.shape == (1, 6)


def test_step_processors_check_once_and_apply_like_transformers_list() -> None:
    """The backstep loop's list reads each processor's signature once, when built, and then scores exactly as
    transformers' list does; a processor that needs more than (input_ids, scores) is refused at once."""
    processors = [MinLengthLogitsProcessor(4, eos_token_id=0), RepetitionPenaltyLogitsProcessor(1.5)]
    ids = torch.tensor([[1, 2, 2], [3, 1, 0]])
    scores = torch.randn(2, 5)
    expected = LogitsProcessorList(processors)(ids, scores.clone())
    assert torch.equal(StepProcessors(processors)(ids, scores.clone()), expected)

    class NeedsMore:
        def __call__(self, input_ids, scores, cur_len):
            return scores

    with pytest.raises(ValueError, match=r"required parameters: \['input_ids', 'scores', 'cur_len'\]"):
        StepProcessors([NeedsMore()])
