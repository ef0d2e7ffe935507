"""Backstep core v2: batches meet the rest of generate() -- static caches, the returned cache, length-dependent
processors, records, threads, sliding windows, pickling and the warper order (issue 9's eight defects)."""

from __future__ import annotations

import copy
import inspect
import io
import pickle
import threading

import pytest
import torch
from support import EOS, PAD, BoostEOS, tiny_model
from transformers.generation import logits_process as lp

import perpetual_logits as pl
from perpetual_logits import BackstepConfig, _compat, make_perpetual
from perpetual_logits.backstep.temperature import RowTemperature
from perpetual_logits.processor_list import (
    LENGTH_DEPENDENT,
    NOT_APPLICABLE,
    READS_TOKENS,
    WARPERS,
    insert_before_warpers,
)

PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 9, 3], [1, 4, 4, 11, 12]]


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    return ids, (ids != PAD).long()


def fresh_logits(model, row: list[int], prompt_length: int) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([row])).logits[0, prompt_length - 1 : -1]


def test_static_cache_in_a_batch_with_rewinds_equals_the_dynamic_cache() -> None:
    model = make_perpetual(tiny_model("llama", attn="sdpa"))
    ids, mask = left_padded(PROMPTS)
    kwargs = {
        "attention_mask": mask,
        "do_sample": False,
        "max_new_tokens": 24,
        "logits_processor": [BoostEOS(1.5)],
        "backstep": BackstepConfig(n_remove=3, max_backsteps=4),
        "return_dict_in_generate": True,
    }
    dynamic = model.generate(ids, **kwargs)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert sum(map(len, dynamic.backstep_events)) >= 3, "rows must rewind for this test to mean anything"
    assert len({len(e) for e in dynamic.backstep_events}) > 1, "rows rewind at different times"
    assert torch.equal(static.sequences, dynamic.sequences)
    assert static.backstep_stats.peak_cache_slots <= ids.shape[1] + 24


def test_returned_cache_continues_like_a_fresh_prefill_and_has_no_holes() -> None:
    model = make_perpetual(tiny_model("llama", attn="sdpa"))
    ids, mask = left_padded(PROMPTS[:2])
    out = model.generate(
        ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=20,
        logits_processor=[BoostEOS(1.5)],
        backstep=BackstepConfig(n_remove=4, max_backsteps=3),
        return_dict_in_generate=True,
    )
    assert any(out.backstep_events), "rows rewind"
    sequences = out.sequences
    assert sequences.shape[1] == ids.shape[1] + 20
    cache = getattr(out, _compat.output_cache_field())
    assert cache.get_seq_length() == sequences.shape[1] - 1  # one slot per kept token: no holes
    # Never longer than prompt + max_new_tokens (plain generate() peaks one slot lower; a row that reached the
    # limit while a rewound row still writes costs that one slot).
    assert out.backstep_stats.peak_cache_slots <= sequences.shape[1]
    full_mask = torch.cat([mask, torch.ones_like(sequences[:, ids.shape[1] :])], dim=1)
    cache_kwarg = {_compat.output_cache_field(): cache}  # `cache` after transformers 5.18, `past_key_values` before
    cont = model.generate(
        sequences, attention_mask=full_mask, do_sample=False, max_new_tokens=8, backstep=False, **cache_kwarg
    )
    fresh = model.generate(sequences, attention_mask=full_mask, do_sample=False, max_new_tokens=8, backstep=False)
    assert torch.equal(cont, fresh)


@pytest.mark.parametrize(
    "length_kwargs",
    [
        {"min_new_tokens": 12},
        {"min_length": 17},
        {"exponential_decay_length_penalty": (4, 0.5)},
        {"min_new_tokens": 9, "no_repeat_ngram_size": 3, "repetition_penalty": 1.3},
    ],
)
def test_length_dependent_processors_judge_each_row_by_its_own_length(length_kwargs: dict) -> None:
    model = make_perpetual(tiny_model("llama", attn="sdpa"))
    ids, mask = left_padded(PROMPTS)
    cfg = BackstepConfig(n_remove=3, max_backsteps=3, on_exhausted="stop")
    kwargs = {"do_sample": False, "max_new_tokens": 30, "logits_processor": [BoostEOS(1.6)], **length_kwargs}
    batch = model.generate(ids, attention_mask=mask, backstep=cfg, return_dict_in_generate=True, **kwargs)
    rewound_at = set()
    for i, prompt in enumerate(PROMPTS):
        pad = ids.shape[1] - len(prompt)
        single = model.generate(
            ids[i : i + 1], attention_mask=mask[i : i + 1], backstep=cfg, return_dict_in_generate=True, **kwargs
        )
        gen = single.sequences[0, ids.shape[1] :].tolist()
        row = batch.sequences[i, ids.shape[1] :].tolist()
        assert row[: len(gen)] == gen, f"row {i} (left padding {pad}) differs from its solo run"
        assert all(t == PAD for t in row[len(gen) :])
        rewound_at.update(e.step for e in batch.backstep_events[i])
    assert len(rewound_at) >= 2, "rows rewind at different steps"


def test_every_length_reading_processor_is_handled_or_listed_as_not_applicable() -> None:
    """Fails when transformers adds a processor that reads the sequence length and we do not handle it."""
    handled = set(LENGTH_DEPENDENT) | set(NOT_APPLICABLE) | set(READS_TOKENS)
    missing = []
    for name, cls in vars(lp).items():
        if not (isinstance(cls, type) and issubclass(cls, lp.LogitsProcessor)) or cls in handled:
            continue
        if cls.__module__ != lp.__name__ or name.endswith("Warper"):
            continue
        source = inspect.getsource(cls.__call__)
        if any(marker in source for marker in ("input_ids.shape", "cur_len", "input_ids.size")):
            missing.append(name)
    assert missing == [], f"length-reading processors not handled: {missing}"


def test_records_hold_one_entry_per_returned_token_in_batches() -> None:
    model = make_perpetual(tiny_model("llama", attn="sdpa"))
    ids, mask = left_padded(PROMPTS)
    recorder = pl.StepStatsRecorder(EOS)
    method1 = pl.SuppressEOSLogitsProcessor(EOS)
    out = model.generate(
        ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=25,
        logits_processor=[BoostEOS(1.6), recorder, method1],
        backstep=BackstepConfig(n_remove=3, max_backsteps=2, on_exhausted="stop"),
        return_dict_in_generate=True,
    )
    lengths = [int((row != PAD).sum()) for row in out.sequences[:, ids.shape[1] :]]
    # Method 1 masks EOS after BoostEOS, so no row ends by EOS; make one row end early through the recorder check
    assert lengths == [25, 25, 25]
    stats = recorder.stats
    assert [len(s) for s in stats] == lengths
    assert [len(r) for r in method1.eos_probabilities] == lengths


def test_records_stop_at_a_row_that_finished_early() -> None:
    model = make_perpetual(tiny_model("llama", attn="sdpa"))
    ids, mask = left_padded(PROMPTS)
    recorder = pl.StepStatsRecorder(EOS)
    out = model.generate(
        ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=40,
        logits_processor=[BoostEOS(2.0), recorder],
        backstep=BackstepConfig(n_remove=2, max_backsteps=1, on_exhausted="stop"),
        return_dict_in_generate=True,
    )
    generated = out.sequences[:, ids.shape[1] :]
    ends = [int((row == EOS).nonzero()[0]) + 1 if (row == EOS).any() else len(row) for row in generated]
    assert min(ends) < max(ends), "a row must finish before the others for this test to mean anything"
    assert [len(s) for s in recorder.stats] == ends


def test_concurrent_calls_with_different_settings_each_get_their_own() -> None:
    model = make_perpetual(tiny_model("llama"))
    ids = torch.tensor([[1, 5, 6, 7]])
    kwargs = {"do_sample": False, "max_new_tokens": 40, "logits_processor": [BoostEOS(2.0)]}
    cfg = BackstepConfig(n_remove=3, max_backsteps=5)
    expected_backstep = model.generate(ids, backstep=cfg, **kwargs)
    expected_plain = model.generate(ids, backstep=False, **kwargs)
    assert not torch.equal(expected_backstep[:, :10], expected_plain[:, :10]) or expected_plain.shape[1] < 44
    failures: list[str] = []
    barrier = threading.Barrier(2)

    def run(use_backstep: bool) -> None:
        for _ in range(8):
            barrier.wait()
            out = model.generate(ids, backstep=cfg if use_backstep else False, **kwargs)
            want = expected_backstep if use_backstep else expected_plain
            if not torch.equal(out, want):
                failures.append("backstep" if use_backstep else "plain")

    threads = [threading.Thread(target=run, args=(flag,)) for flag in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    call_state = {k for k in vars(model) if "perpetual" in k or "backstep" in k}
    assert call_state == set(), f"call-scoped state left on the model: {call_state}"


def test_last_backstep_is_per_thread() -> None:
    model = make_perpetual(tiny_model("llama"))
    ids = torch.tensor([[1, 5, 6, 7]])
    model.generate(ids, max_new_tokens=5, backstep=BackstepConfig(n_remove=2))
    events, stats = model.last_backstep
    assert len(events) == 1 and stats.prefill_forwards == 1  # this thread's call, one row
    seen: list[object] = []
    thread = threading.Thread(target=lambda: seen.append(model.last_backstep))
    thread.start()
    thread.join()
    assert seen == [None]


def test_sliding_window_batch_with_phrase_rewinds_works_when_the_run_fits_the_window() -> None:
    from support import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = make_perpetual(tiny_model("mistral", sliding_window=32, attn="sdpa"))
    ids, mask = left_padded([[1, 5, 6], [1, 9, 10, 11]])
    torch.manual_seed(0)
    out = model.generate(
        ids,
        attention_mask=mask,
        do_sample=True,
        top_k=0,
        max_new_tokens=24,
        logits_processor=[BoostEOS(2.5)],
        backstep=BackstepConfig(n_remove=2, max_backsteps=30, ban_phrases=["w10", "w11", "w12"]),
        tokenizer=tokenizer,
        return_dict_in_generate=True,
        output_logits=True,
    )
    assert sum(map(len, out.backstep_events)) >= 6
    width = ids.shape[1]
    for i in range(2):
        prompt = ids[i][mask[i].bool()].tolist()
        row = prompt + out.sequences[i, width:].tolist()
        recorded = torch.stack([step[i] for step in out.logits])
        assert (recorded - fresh_logits(model, row, len(prompt))).abs().max() <= 1e-4


def test_sliding_window_batch_one_allows_many_rewinds_inside_the_window() -> None:
    model = make_perpetual(tiny_model("mistral", sliding_window=32))
    torch.manual_seed(1)
    out = model.generate(
        torch.tensor([[1, 5, 6, 7]]),
        do_sample=True,
        top_k=0,
        max_new_tokens=20,
        logits_processor=[BoostEOS(3.0)],
        backstep=BackstepConfig(n_remove=3, max_backsteps=50),
        return_dict_in_generate=True,
    )
    assert out.sequences.shape[1] == 24 and len(out.backstep_events[0]) >= 3


@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
def test_perpetual_models_pickle_and_load_back_perpetual(how: str) -> None:
    cfg = BackstepConfig(n_remove=2)
    model = make_perpetual(tiny_model("llama"), backstep=cfg)
    cls_name = type(model).__name__
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(model))
    elif how == "torch.save":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    else:
        loaded = copy.deepcopy(model)
    assert isinstance(loaded, pl.PerpetualGenerationMixin) and type(loaded).__name__ == cls_name
    assert type(loaded) is type(model)
    assert loaded.backstep_config == cfg
    ids = torch.tensor([[1, 5, 6, 7]])
    kwargs = {"do_sample": False, "max_new_tokens": 12, "logits_processor": [BoostEOS(2.0)]}
    assert torch.equal(loaded.generate(ids, **kwargs), model.generate(ids, **kwargs))


def test_every_sampling_warper_comes_after_the_row_temperature() -> None:
    """Fails when transformers adds a warper class the list does not handle."""
    warpers = {cls for name, cls in vars(lp).items() if name.endswith("LogitsWarper") and isinstance(cls, type)}
    assert warpers <= set(WARPERS), f"unhandled warpers: {warpers - set(WARPERS)}"
    model = tiny_model("llama")
    from transformers import GenerationConfig

    gc = GenerationConfig(
        do_sample=True,
        temperature=0.7,
        top_k=20,
        top_p=0.9,
        min_p=0.05,
        typical_p=0.9,
        epsilon_cutoff=3e-4,
        eta_cutoff=3e-4,
        top_h=0.5,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    gc._eos_token_tensor = torch.tensor([EOS])  # what generate() prepares before building the processors
    built = model._get_logits_processor(gc, input_ids_seq_length=4, encoder_input_ids=torch.tensor([[1]]))
    row_temp = RowTemperature()
    items = list(insert_before_warpers(built, row_temp))
    index = items.index(row_temp)
    assert all(not isinstance(p, WARPERS) for p in items[:index])
    assert {type(p) for p in items[index + 1 :]} >= {lp.EpsilonLogitsWarper, lp.EtaLogitsWarper, lp.TopHLogitsWarper}


def test_eos_id_outside_the_vocabulary_is_ignored_like_stock_generate() -> None:
    model = make_perpetual(tiny_model("llama", eos=[EOS, 100]))
    ids = torch.tensor([[1, 5, 6, 7]])
    out = model.generate(
        ids, do_sample=False, max_new_tokens=15, logits_processor=[BoostEOS(2.0)], backstep=BackstepConfig(n_remove=2)
    )
    assert out.shape[1] == 19 and not (out[0, 4:] == EOS).any()


def test_inputs_embeds_prompt_works_with_backstep() -> None:
    model = make_perpetual(tiny_model("llama"))
    prompt = torch.tensor([[1, 5, 6, 7]])
    embeds = model.get_input_embeddings()(prompt)
    kwargs = {"do_sample": False, "max_new_tokens": 15, "logits_processor": [BoostEOS(3.5)]}
    cfg = BackstepConfig(n_remove=3, logits_buffer=32)  # no deep rewinds: an embedded prompt has no token to re-feed
    from_ids = model.generate(prompt, backstep=cfg, return_dict_in_generate=True, **kwargs)
    from_embeds = model.generate(inputs_embeds=embeds, backstep=cfg, return_dict_in_generate=True, **kwargs)
    assert from_ids.backstep_events[0], "rewinds happen"
    assert from_embeds.sequences.tolist() == [from_ids.sequences[0, 4:].tolist()]


@pytest.mark.parametrize("length_kwargs", [{"min_new_tokens": 10}, {"min_length": 16}])
def test_a_rewound_row_is_held_to_its_own_minimum_length(length_kwargs: dict) -> None:
    from support import tiny_tokenizer

    model = make_perpetual(tiny_model("llama", attn="sdpa"))
    ids, mask = left_padded(PROMPTS)
    out = model.generate(
        ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=20,
        logits_processor=[BoostEOS(2.0)],
        backstep=BackstepConfig(n_remove=3, ban_phrases=["a", "b", "c", "d", "e"]),
        tokenizer=tiny_tokenizer(),
        return_dict_in_generate=True,
        output_scores=True,
        **length_kwargs,
    )
    steps = {tuple(e.step for e in events) for events in out.backstep_events}
    assert len(steps) > 1 and any(out.backstep_events), "rows rewind at different steps"
    for b in range(len(PROMPTS)):
        floor = 10 if "min_new_tokens" in length_kwargs else 16 - ids.shape[1]  # min_length counts the padding too
        for j in range(min(floor, 20)):
            assert out.scores[j][b, EOS] == float("-inf"), f"row {b} could end after {j} new tokens"
