"""Methods 3 and 4: backstep generation inside model.generate()."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import EOS, PAD, BoostEOS, tiny_config, tiny_model
from transformers import LlamaForCausalLM, LogitsProcessor, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

import perpetual_logits as pl
from perpetual_logits import BackstepConfig, LinearDecay, make_perpetual
from perpetual_logits.backstep import check_cache
from perpetual_logits.protocol import PerCallState


class CountForwards:
    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        model.register_forward_hook(self._hook)

    def _hook(self, *args: object) -> None:
        self.calls += 1


def fresh_logits(model, row: list[int], prompt_length: int) -> torch.Tensor:
    """Logits of a fresh full forward: the prediction for every generated position."""
    with torch.no_grad():
        return model(torch.tensor([row])).logits[0, prompt_length - 1 : -1]


ARCHS = ["llama", "qwen2", "mistral", "gpt2", "gemma"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_rewinds_are_exact_and_cost_no_extra_forward(arch: str, attn: str) -> None:
    model = make_perpetual(tiny_model(arch, attn=attn))
    counter = CountForwards(model)
    prompt = [1, 5, 6, 7, 8]
    torch.manual_seed(1)
    out = model.generate(
        torch.tensor([prompt]),
        do_sample=True,
        top_k=0,
        max_new_tokens=40,
        backstep=BackstepConfig(n_remove=3, max_backsteps=12),
        logits_processor=[BoostEOS(3.0)],
        return_dict_in_generate=True,
        output_logits=True,
        output_scores=True,
    )
    events, stats = out.backstep_events[0], out.backstep_stats
    generated = out.sequences.shape[1] - len(prompt)
    assert generated == 40  # max_new_tokens counts final tokens
    assert len(events) >= 3, "the EOS boost should force several rewinds"
    assert stats.removed_tokens == sum(e.removed for e in events)
    assert stats.deep_rewinds == sum(e.deep for e in events)
    # Every token is fed once, removed ones included, except the run's last token; deep rewinds re-feed one.
    assert stats.decode_forwards == generated + stats.removed_tokens + stats.deep_rewinds - 1
    assert counter.calls == 1 + stats.decode_forwards  # prefill + decode, counted independently
    # Exact: the logits behind every kept token equal a fresh forward over the final sequence.
    recorded = torch.stack(out.logits)[:, 0]
    assert recorded.shape[0] == generated and len(out.scores) == generated
    expected = fresh_logits(model, out.sequences[0].tolist(), len(prompt))
    assert (recorded - expected).abs().max().item() <= 1e-4
    assert not (out.sequences[0, len(prompt) :] == EOS).any()  # on_exhausted="suppress"
    transition = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    assert transition.shape == (1, generated) and torch.isfinite(transition).all()


def test_deep_rewinds_refeed_one_token_and_stay_exact() -> None:
    model = make_perpetual(tiny_model("llama"))
    prompt = [1, 5, 6]
    torch.manual_seed(0)
    out = model.generate(
        torch.tensor([prompt]),
        do_sample=True,
        top_k=0,
        max_new_tokens=30,
        backstep=BackstepConfig(n_remove=4, hold_back=12, logits_buffer=2, max_backsteps=15),
        logits_processor=[BoostEOS(3.0)],
        return_dict_in_generate=True,
        output_logits=True,
    )
    stats = out.backstep_stats
    assert stats.deep_rewinds >= 1
    assert stats.decode_forwards == 30 + stats.removed_tokens + stats.deep_rewinds - 1
    expected = fresh_logits(model, out.sequences[0].tolist(), len(prompt))
    assert (torch.stack(out.logits)[:, 0] - expected).abs().max() <= 1e-4


def test_without_backstep_generation_is_unchanged() -> None:
    original = tiny_model("llama")
    perpetual = make_perpetual(tiny_model("llama"))
    ids = torch.tensor([[1, 5, 6, 7]])
    for kwargs in ({"do_sample": False}, {"do_sample": True, "top_k": 10}):
        torch.manual_seed(5)
        a = original.generate(ids, max_new_tokens=25, **kwargs)
        torch.manual_seed(5)
        b = perpetual.generate(ids, max_new_tokens=25, **kwargs)
        assert torch.equal(a, b)


def test_backstep_without_eos_events_matches_plain_generate() -> None:
    model = make_perpetual(tiny_model("llama"))
    ids = torch.tensor([[1, 5, 6, 7]])
    never_eos = pl.SuppressEOSLogitsProcessor(EOS)
    torch.manual_seed(3)
    plain = model.generate(ids, do_sample=True, top_k=0, max_new_tokens=30, logits_processor=[never_eos])
    torch.manual_seed(3)
    backstep = model.generate(
        ids,
        do_sample=True,
        top_k=0,
        max_new_tokens=30,
        logits_processor=[never_eos],
        backstep=BackstepConfig(),
    )
    assert torch.equal(plain, backstep)


class CountResets(LogitsProcessor, PerCallState):
    """Changes nothing; counts how often it is reset."""

    def __init__(self) -> None:
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores


@pytest.mark.parametrize("backstep", [BackstepConfig(n_remove=2), False])
def test_a_reused_processor_is_reset_once_per_call(backstep) -> None:
    model = make_perpetual(tiny_model("llama"))
    counter = CountResets()
    for call in (1, 2):
        model.generate(torch.tensor([[1, 5]]), max_new_tokens=4, logits_processor=[counter], backstep=backstep)
        assert counter.resets == call


def test_a_processor_with_its_own_reset_is_still_reset_for_one_release_with_a_warning() -> None:
    class OwnReset(LogitsProcessor):
        def __init__(self) -> None:
            self.resets = 0

        def reset(self) -> None:
            self.resets += 1

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            return scores

    model, proc = make_perpetual(tiny_model("llama")), OwnReset()
    with pytest.warns(DeprecationWarning, match="PerCallState"):
        model.generate(torch.tensor([[1, 5]]), max_new_tokens=2, logits_processor=[proc], backstep=False)
    assert proc.resets == 1


def test_make_perpetual_keeps_class_identity_and_is_idempotent(tmp_path) -> None:
    model = tiny_model("llama")
    cls = type(model)
    same = make_perpetual(model)
    assert same is model and isinstance(model, cls) and isinstance(model, pl.PerpetualGenerationMixin)
    assert type(model).__name__ == cls.__name__
    make_perpetual(model)
    assert type(model).__mro__.count(pl.PerpetualGenerationMixin) == 1
    model.save_pretrained(tmp_path)
    import json

    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    with pytest.raises(ValueError, match="`model`"):
        make_perpetual(object())


def test_from_pretrained_on_a_mixin_subclass(tmp_path) -> None:
    tiny_model("llama").save_pretrained(tmp_path)

    class PerpetualLlama(pl.PerpetualGenerationMixin, LlamaForCausalLM):
        pass

    model = PerpetualLlama.from_pretrained(tmp_path).eval()
    original = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), name
    kwargs = {
        "do_sample": False,
        "max_new_tokens": 12,
        "backstep": BackstepConfig(n_remove=2),
        "logits_processor": [BoostEOS(2.0)],
        "return_dict_in_generate": True,
    }
    out = model.generate(torch.tensor([[1, 5]]), **kwargs)
    # The subclass generates exactly what make_perpetual gives the same weights, rewinds included.
    same = make_perpetual(original).generate(torch.tensor([[1, 5]]), **kwargs)
    assert torch.equal(out.sequences, same.sequences)
    assert out.backstep_events == same.backstep_events
    assert len(out.backstep_events) == 1 and out.backstep_events[0]  # the boosted EOS was rewound
    assert all(event.reason == "eos" for event in out.backstep_events[0])


def test_default_config_reaches_a_pipeline() -> None:
    from support import tiny_tokenizer
    from transformers import pipeline

    model = make_perpetual(tiny_model("llama"), backstep=BackstepConfig(n_remove=2, max_backsteps=3))
    tokenizer = tiny_tokenizer()
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    model.last_backstep = None
    generator("a b c", max_new_tokens=10, do_sample=False, logits_processor=[BoostEOS(4.0)])
    assert model.last_backstep is not None, "the pipeline's generate() ran the backstep loop"
    events, _ = model.last_backstep
    assert len(events[0]) >= 1
    model.last_backstep = None
    generator("a b c", max_new_tokens=5, do_sample=False, backstep=False)
    assert model.last_backstep is None


def test_greedy_ban_moves_on_and_without_ban_it_loops_until_the_budget() -> None:
    model = make_perpetual(tiny_model("llama"))
    ids = torch.tensor([[1, 5, 6, 7]])
    boost = BoostEOS(2.0)
    kwargs = {
        "do_sample": False,
        "max_new_tokens": 20,
        "logits_processor": [boost],
        "return_dict_in_generate": True,
    }
    looping = model.generate(
        ids, backstep=BackstepConfig(n_remove=2, max_backsteps=5, ban_rewound_token=False), **kwargs
    )
    positions = [e.position for e in looping.backstep_events[0]]
    assert len(positions) == 5 and len(set(positions)) == 1  # the same rewind, again and again
    moving = model.generate(ids, backstep=BackstepConfig(n_remove=2, max_backsteps=5), **kwargs)  # greedy: bans
    events = moving.backstep_events[0]
    assert all(e.banned_token is not None for e in events if e.removed)
    assert not torch.equal(moving.sequences, looping.sequences)


def test_on_exhausted_stop_lets_the_row_end_and_budget_bounds_work() -> None:
    model = make_perpetual(tiny_model("llama"))
    torch.manual_seed(0)
    out = model.generate(
        torch.tensor([[1, 5, 6, 7]]),
        do_sample=True,
        top_k=0,
        max_new_tokens=200,
        logits_processor=[BoostEOS(4.0)],
        backstep=BackstepConfig(n_remove=3, max_backsteps=4, on_exhausted="stop"),
        return_dict_in_generate=True,
    )
    assert len(out.backstep_events[0]) == 4
    assert out.sequences[0, -1].item() == EOS
    assert out.sequences.shape[1] - 4 < 200


def test_batch_rows_equal_single_runs_with_left_padding() -> None:
    model = make_perpetual(tiny_model("llama", attn="sdpa"))
    prompts = [[1, 5, 6, 7, 8, 9], [1, 9, 3], [1, 4, 4, 11, 12]]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = (ids != PAD).long()
    cfg = BackstepConfig(n_remove=3, max_backsteps=6, on_exhausted="stop")
    kwargs = {"do_sample": False, "max_new_tokens": 30, "logits_processor": [BoostEOS(1.3)]}
    batch = model.generate(ids, attention_mask=mask, backstep=cfg, return_dict_in_generate=True, **kwargs)
    total_events = 0
    for i, prompt in enumerate(prompts):
        single = model.generate(torch.tensor([prompt]), backstep=cfg, return_dict_in_generate=True, **kwargs)
        gen = single.sequences[0, len(prompt) :].tolist()
        row = batch.sequences[i, width:].tolist()
        assert row[: len(gen)] == gen
        assert all(t == PAD for t in row[len(gen) :])  # finished rows are padded like stock generate
        assert [e.position for e in batch.backstep_events[i]] == [e.position for e in single.backstep_events[0]]
        total_events += len(single.backstep_events[0])
    assert total_events >= 3


class RecordingStreamer(BaseStreamer):
    def __init__(self) -> None:
        self.chunks: list[list[int]] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended = True


def test_streamer_receives_exactly_the_final_tokens() -> None:
    model = make_perpetual(tiny_model("llama"))
    streamer = RecordingStreamer()
    prompt = [1, 5, 6, 7]
    torch.manual_seed(2)
    out = model.generate(
        torch.tensor([prompt]),
        do_sample=True,
        top_k=0,
        max_new_tokens=40,
        logits_processor=[BoostEOS(3.0)],
        backstep=BackstepConfig(n_remove=4, max_backsteps=10),
        streamer=streamer,
        return_dict_in_generate=True,
    )
    assert len(out.backstep_events[0]) >= 2
    streamed = [t for chunk in streamer.chunks[1:] for t in chunk]
    assert streamer.chunks[0] == prompt and streamer.ended
    assert streamed == out.sequences[0, len(prompt) :].tolist()


def test_text_iterator_streamer_text_equals_decoded_output() -> None:
    from support import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = make_perpetual(tiny_model("llama"))
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer("a b c").input_ids]])
    torch.manual_seed(4)
    out = model.generate(
        ids,
        do_sample=True,
        top_k=0,
        max_new_tokens=20,
        logits_processor=[BoostEOS(3.0)],
        backstep=BackstepConfig(n_remove=3),
        streamer=streamer,
    )
    text = "".join(streamer)
    assert text == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


class SpyProcessor(LogitsProcessor, pl.RowState):
    """Records what processors see, and follows rewinds through the RowState protocol."""

    def __init__(self) -> None:
        self.seen: list[list[int]] = []
        self.rewinds: list[tuple[int, int]] = []

    def start(self, batch_size: int, prompt_length: int) -> None:
        self.seen, self.rewinds = [], []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.seen.append(input_ids[0].tolist())
        return scores

    def rewind(self, row: int, length: int) -> None:
        self.rewinds.append((row, length))


def test_processors_see_the_truncated_sequence_and_get_the_rewind_hook() -> None:
    model = make_perpetual(tiny_model("llama"))
    spy = SpyProcessor()
    torch.manual_seed(0)
    out = model.generate(
        torch.tensor([[1, 5, 6, 7]]),
        do_sample=True,
        top_k=0,
        max_new_tokens=25,
        logits_processor=[BoostEOS(3.0), spy],
        backstep=BackstepConfig(n_remove=3),
        return_dict_in_generate=True,
    )
    events = out.backstep_events[0]
    assert [(0, e.position + 4) for e in events] == spy.rewinds and events
    for before, after in zip(spy.seen, spy.seen[1:]):
        if len(after) <= len(before):  # right after a rewind: a prefix of what was there
            assert after == before[: len(after)]
    assert spy.seen[-1] == out.sequences[0, :-1].tolist()


def test_method2_processor_state_follows_the_rewind() -> None:
    proc = pl.PostEOSResamplingLogitsProcessor(EOS, schedule=LinearDecay(2.0, 3), trigger="argmax")
    proc.start(1, 4)
    eos_top = torch.tensor([[0.0, 0.0, 9.0, 1.0]])
    plain = torch.tensor([[0.0, 0.0, -9.0, 1.0]])
    ids = torch.ones(1, 4, dtype=torch.long)
    proc(ids, plain)  # position 4
    proc(ids, eos_top)  # position 5: eviction
    proc(ids, plain)  # position 6
    assert proc.evictions == [[1]]
    proc.rewind(0, 5)  # position 5 is removed: so is its eviction
    out = proc(ids, plain)
    assert proc.evictions == [[]]
    assert out[0, 3].item() == pytest.approx(1.0)  # no multiplier any more


def test_method4_schedule_heats_exactly_after_each_rewind() -> None:
    model = make_perpetual(tiny_model("llama"))
    torch.manual_seed(0)
    cfg = BackstepConfig.method4(n_remove=3, peak=2.0)
    out = model.generate(
        torch.tensor([[1, 5, 6, 7]]),
        do_sample=True,
        top_k=0,
        temperature=0.8,
        max_new_tokens=30,
        logits_processor=[BoostEOS(2.5)],
        backstep=cfg,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    events = out.backstep_events[0]
    assert events
    start = None
    for j, (scores, raw) in enumerate(zip(out.scores, out.logits)):
        starts = [e.position for e in events if e.position <= j]
        start = starts[-1] if starts else None
        factor = 1.0 if start is None else LinearDecay(2.0, 3)(j - start)
        expected = raw[0].clone()
        expected[EOS] += 2.5
        expected = expected / (0.8 * factor)
        finite = torch.isfinite(scores[0])
        assert torch.allclose(scores[0][finite], expected[finite], atol=1e-4), j


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_remove": 0}, "n_remove"),
        ({"n_remove": 2.5}, "n_remove"),
        ({"max_backsteps": -1}, "max_backsteps"),
        ({"on_exhausted": "explode"}, "on_exhausted"),
        ({"schedule": 2.0}, "schedule"),
        ({"ban_rewound_token": "yes"}, "ban_rewound_token"),
        ({"n_remove": 5, "hold_back": 3}, "hold_back"),
        ({"logits_buffer": 0}, "logits_buffer"),
    ],
)
def test_invalid_backstep_config(kwargs, name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}`"):
        BackstepConfig(**kwargs)


def test_unsupported_modes_are_refused_clearly() -> None:
    model = make_perpetual(tiny_model("llama"))
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(ValueError, match="supports sampling"):
        model.generate(ids, num_beams=2, max_new_tokens=3, backstep=BackstepConfig())
    with pytest.raises(ValueError, match="assisted decoding"):
        model.generate(ids, assistant_model=tiny_model("llama"), max_new_tokens=3, backstep=BackstepConfig())
    with pytest.raises(ValueError, match="use_cache"):
        model.generate(ids, use_cache=False, max_new_tokens=3, backstep=BackstepConfig())
    with pytest.raises(ValueError, match="`backstep`"):
        model.generate(ids, max_new_tokens=3, backstep="yes")
    assert model.generate(ids, num_beams=2, max_new_tokens=3).shape[1] == 6  # beam search itself still works


def test_uncroppable_caches_are_refused() -> None:
    class QuantizedLayer:
        pass

    class FakeCache:
        layers = (QuantizedLayer(),)

    with pytest.raises(ValueError, match="quantized"):
        check_cache(FakeCache())


def test_static_cache_works_and_is_exact() -> None:
    model = make_perpetual(tiny_model("llama", attn="sdpa"))
    prompt = [1, 5, 6, 7]
    torch.manual_seed(0)
    out = model.generate(
        torch.tensor([prompt]),
        do_sample=True,
        top_k=0,
        max_new_tokens=20,
        cache_implementation="static",
        logits_processor=[BoostEOS(3.0)],
        backstep=BackstepConfig(n_remove=3),
        return_dict_in_generate=True,
        output_logits=True,
    )
    assert out.backstep_events[0]
    expected = fresh_logits(model, out.sequences[0].tolist(), len(prompt))
    assert (torch.stack(out.logits)[:, 0] - expected).abs().max() <= 1e-4


def test_sliding_window_beyond_the_window_is_refused_clearly() -> None:
    model = make_perpetual(tiny_model("mistral", sliding_window=16))
    with pytest.raises(ValueError, match="sliding-window"):
        model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=30, backstep=BackstepConfig(n_remove=2))


@given(
    batch=st.integers(1, 3),
    n_remove=st.integers(1, 5),
    seed=st.integers(0, 1000),
    eos=st.sampled_from([[EOS], [EOS, 3]]),
    static=st.booleans(),
)
@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_batches_never_eos_exact_rewind(
    batch: int, n_remove: int, seed: int, eos: list[int], static: bool
) -> None:
    torch.manual_seed(seed)
    model = make_perpetual(tiny_model("qwen2", seed=seed % 3, eos=eos, attn="sdpa"))
    lengths = [3 + (seed + 2 * i) % 4 for i in range(batch)]
    width = max(lengths)
    prompts = [[1] + [4 + (seed + i + j) % 50 for j in range(n - 1)] for i, n in enumerate(lengths)]
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    out = model.generate(
        ids,
        attention_mask=(ids != PAD).long(),
        do_sample=True,
        top_k=0,
        max_new_tokens=16,
        logits_processor=[BoostEOS(2.5, eos=eos[-1])],
        backstep=BackstepConfig(n_remove=n_remove, max_backsteps=6),
        return_dict_in_generate=True,
        output_logits=True,
        **({"cache_implementation": "static"} if static else {}),
    )
    assert out.sequences.shape == (batch, width + 16)
    assert out.backstep_stats.peak_cache_slots <= width + 16  # never longer than prompt + max_new_tokens
    assert not torch.isin(out.sequences[:, width:], torch.tensor(eos)).any()
    for i, prompt in enumerate(prompts):
        row = prompt + out.sequences[i, width:].tolist()
        expected = fresh_logits(model, row, len(prompt))
        recorded = torch.stack([step[i] for step in out.logits])
        assert not torch.isnan(recorded).any()
        assert (recorded - expected).abs().max() <= 1e-4


@pytest.mark.slow
def test_tinystories_backstep_is_exact_and_keeps_writing(tinystories) -> None:
    model, tokenizer = tinystories
    make_perpetual(model)
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    for cfg in (BackstepConfig(n_remove=10), BackstepConfig.method4(n_remove=10)):
        for attn in ("eager", "sdpa"):
            model.set_attn_implementation(attn)
            torch.manual_seed(0)
            out = model.generate(
                ids,
                do_sample=True,
                max_new_tokens=300,
                backstep=cfg,
                return_dict_in_generate=True,
                output_logits=True,
            )
            generated = out.sequences.shape[1] - ids.shape[1]
            assert generated == 300 and not (out.sequences[0] == 2).any()
            assert len(out.backstep_events[0]) >= 1
            expected = fresh_logits(model, out.sequences[0].tolist(), ids.shape[1])
            assert (torch.stack(out.logits)[:, 0] - expected).abs().max() <= 1e-4


def test_tiny_config_helper_builds_every_architecture() -> None:
    for arch in ARCHS:
        assert tiny_config(arch).vocab_size == 64
