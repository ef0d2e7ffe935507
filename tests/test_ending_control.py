"""Ending control beyond the EOS token, wired into generation: phrase rewinds, early triggers, guards.

Scripted runs use a tiny random Llama with TinyStories-656K's tokenizer (vocab 2048) and a processor that
forces a given token script, so we know exactly which tokens spell a phrase.
"""

from __future__ import annotations

import re

import pytest
import torch
from support import tiny_model
from transformers import LogitsProcessor, TextIteratorStreamer

import perpetual_logits as pl
from perpetual_logits import BackstepConfig, EarlyTrigger, make_perpetual
from perpetual_logits.analysis.metrics import count_end_markers

THEY_WERE_HAPPY = [473, 245, 405]  # "They were happy"
DOT_THE, E, ND, DOT = 152, 30, 389, 10  # ".▁The▁", "E", "nd", "."
LE, SS = 161, 1117  # "le", "ss▁" -> "Endless "
SPELLED_END = [208, 183, 209, 210]  # "<|", "end", "_story", "|>"


class Script(LogitsProcessor):
    """Forces `tokens` as the generated text while the row follows the script and the token is allowed.

    A forced token that arrives banned (-inf) ends the script: the row then samples freely.
    """

    def __init__(self, tokens: list[int], prompt_length: int) -> None:
        self.tokens, self.prompt_length = tokens, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores.clone()
        for row in range(scores.shape[0]):
            generated = input_ids[row, self.prompt_length :].tolist()
            j = len(generated)
            if j < len(self.tokens) and generated == self.tokens[:j] and torch.isfinite(scores[row, self.tokens[j]]):
                out[row] = float("-inf")
                out[row, self.tokens[j]] = 0.0
        return out  # type: ignore[return-value]


def run_script(model, tokenizer, script: list[int], max_new_tokens: int = 14, **config) -> tuple:
    prompt = tokenizer("Once upon a time", return_tensors="pt").input_ids
    torch.manual_seed(0)
    out = model.generate(
        prompt,
        do_sample=True,
        top_k=0,
        max_new_tokens=max_new_tokens,
        logits_processor=[Script(script, prompt.shape[1])],
        backstep=BackstepConfig(**{"n_remove": 4, **config}),
        tokenizer=tokenizer,
        return_dict_in_generate=True,
    )
    return out, out.sequences[0, prompt.shape[1] :].tolist()


def test_spelled_end_marker_rewinds_to_its_first_piece(scripted_model, story_tokenizer) -> None:
    script = [*THEY_WERE_HAPPY, DOT, *SPELLED_END]
    out, generated = run_script(scripted_model, story_tokenizer, script, ban_phrases="default")
    events = [e for e in out.backstep_events[0] if e.reason == "phrase"]
    assert events, "the spelled <|end_story|> must be caught"
    first = events[0]
    assert (first.phrase, first.position, first.removed, first.banned_token) == ("<|end_story|>", 4, 3, 208)
    assert generated[:4] == [*THEY_WERE_HAPPY, DOT] and generated[4] != 208  # banned there
    assert "<|end_story|>" not in story_tokenizer.decode(generated)


def test_multi_token_phrase_starting_inside_a_token(scripted_model, story_tokenizer) -> None:
    # ".▁The▁" holds the period, the space and "The": the phrase "The End" begins inside that token.
    script = [*THEY_WERE_HAPPY, DOT_THE, E, ND, DOT]
    out, generated = run_script(scripted_model, story_tokenizer, script, ban_phrases=["The End"])
    first = out.backstep_events[0][0]
    assert (first.reason, first.phrase, first.position, first.banned_token) == ("phrase", "The End", 3, DOT_THE)
    assert first.removed == 3  # ".▁The▁", "E", "nd"; the "." that confirmed the word ended is refused, not removed
    assert generated[3] != DOT_THE


def test_cross_token_boundary_regex_match(scripted_model, story_tokenizer) -> None:
    script = [*THEY_WERE_HAPPY, DOT, *SPELLED_END]
    out, _ = run_script(scripted_model, story_tokenizer, script, ban_phrases=[re.compile("nd_st")])
    first = out.backstep_events[0][0]
    assert (first.reason, first.position, first.banned_token) == ("phrase", 5, 183)  # starts inside "end"


def test_innocent_word_with_a_phrase_prefix_is_not_hit(scripted_model, story_tokenizer) -> None:
    script = [*THEY_WERE_HAPPY, DOT_THE, E, ND, LE, SS]  # "They were happy. The Endless "
    out, generated = run_script(scripted_model, story_tokenizer, script, ban_phrases=["The End"])
    assert not [e for e in out.backstep_events[0] if e.reason == "phrase" and e.position <= 5]
    assert generated[: len(script)] == script


def test_streamer_never_shows_a_phrase_being_written(scripted_model, story_tokenizer) -> None:
    prompt = story_tokenizer("Once upon a time", return_tensors="pt").input_ids
    script = [*THEY_WERE_HAPPY, DOT, *SPELLED_END]
    streamer = TextIteratorStreamer(story_tokenizer, skip_prompt=True)
    torch.manual_seed(0)
    out = scripted_model.generate(
        prompt,
        do_sample=True,
        top_k=0,
        max_new_tokens=16,
        logits_processor=[Script(script, prompt.shape[1])],
        # hold_back 1 alone would show "<|end" before the phrase is complete: the phrase hold-back covers it
        backstep=BackstepConfig(n_remove=1, ban_phrases="default"),
        tokenizer=story_tokenizer,
        streamer=streamer,
    )
    text = "".join(streamer)
    assert "<|" not in text
    assert text == story_tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)


def test_phrase_rewinds_stay_exact_and_cost_no_extra_forward(scripted_model, story_tokenizer) -> None:
    prompt = story_tokenizer("Once upon a time", return_tensors="pt").input_ids
    script = [*THEY_WERE_HAPPY, DOT, *SPELLED_END]
    torch.manual_seed(0)
    out = scripted_model.generate(
        prompt,
        do_sample=True,
        top_k=0,
        max_new_tokens=20,
        logits_processor=[Script(script, prompt.shape[1])],
        backstep=BackstepConfig(n_remove=4, ban_phrases="default"),
        tokenizer=story_tokenizer,
        return_dict_in_generate=True,
        output_logits=True,
    )
    stats = out.backstep_stats
    assert stats.rewinds >= 1
    phrase_rewinds = sum(e.reason == "phrase" for e in out.backstep_events[0])
    # The token that completes a phrase is refused before it is ever fed, and not counted as removed.
    assert phrase_rewinds and stats.decode_forwards == 20 + stats.removed_tokens + stats.deep_rewinds - 1
    with torch.no_grad():
        fresh = scripted_model(out.sequences).logits[0, prompt.shape[1] - 1 : -1]
    assert (torch.stack(out.logits)[:, 0] - fresh).abs().max() <= 1e-4


def test_phrase_budget_guarantees_termination(scripted_model, story_tokenizer) -> None:
    script = [*THEY_WERE_HAPPY, DOT, *SPELLED_END]
    out, _ = run_script(scripted_model, story_tokenizer, script, ban_phrases=["<|"], max_phrase_rewinds=3)
    phrase_events = [e for e in out.backstep_events[0] if e.reason == "phrase"]
    assert len(phrase_events) <= 3


def test_ban_phrases_needs_the_tokenizer(scripted_model) -> None:
    with pytest.raises(ValueError, match="tokenizer"):
        scripted_model.generate(
            torch.tensor([[1, 5]]), max_new_tokens=3, backstep=BackstepConfig(ban_phrases=["The End"])
        )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"ban_phrases": "The End"}, "ban_phrases"),
        ({"ban_phrases": []}, "ban_phrases"),
        ({"ban_phrases": [3]}, "ban_phrases"),
        ({"max_phrase_rewinds": -1}, "max_phrase_rewinds"),
        ({"early_trigger": EarlyTrigger()}, "early_trigger"),  # needs a schedule
        ({"early_trigger": "soon", "schedule": pl.LinearDecay(2.0, 3)}, "early_trigger"),
    ],
)
def test_invalid_ending_control_config(kwargs, name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}`"):
        BackstepConfig(**kwargs)


# --- early triggers ---------------------------------------------------------------------------------------


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


# --- guards ------------------------------------------------------------------------------------------------


def test_budget_criterion_reads_live_backstep_counts() -> None:
    model = make_perpetual(tiny_model("llama"))

    class Boost(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            out = scores.clone()
            out[:, 2] += 4.0
            return out  # type: ignore[return-value]

    torch.manual_seed(0)
    out = model.generate(
        torch.tensor([[1, 5, 6]]),
        do_sample=True,
        top_k=0,
        max_new_tokens=200,
        logits_processor=[Boost()],
        stopping_criteria=[pl.EvictionBudgetCriteria(model, max_events=3)],
        backstep=BackstepConfig(n_remove=2),
        return_dict_in_generate=True,
    )
    assert len(out.backstep_events[0]) == 3
    assert out.sequences.shape[1] - 3 < 200  # stopped by the budget, not by max_new_tokens


# --- TinyStories-656K --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tinystories_methods_3_and_4_with_default_phrases_write_no_end_marker(tinystories) -> None:
    model, tokenizer = tinystories
    make_perpetual(model)
    phrases = pl.default_end_phrases(tokenizer, model.generation_config.eos_token_id)
    enc = tokenizer(["Once upon a time"] * 20, return_tensors="pt")
    for cfg in (BackstepConfig(n_remove=10, ban_phrases="default"), BackstepConfig.method4(10, ban_phrases="default")):
        torch.manual_seed(0)
        out = model.generate(
            **enc, do_sample=True, max_new_tokens=400, backstep=cfg, tokenizer=tokenizer, return_dict_in_generate=True
        )
        # Rows that reach the limit with part of a marker held back end without it (shorter, padded with the EOS
        # id, a special token): the spelled markers are text pieces, still counted.
        texts = tokenizer.batch_decode(out.sequences[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        assert out.sequences.shape[1] - enc.input_ids.shape[1] == 400
        assert all(count_end_markers(t, phrases) == 0 for t in texts), "20 runs x 400 tokens"
        assert any(e.reason == "phrase" for row in out.backstep_events for e in row)
    # and without the phrase bans the same runs do spell the marker out
    torch.manual_seed(0)
    out = model.generate(**enc, do_sample=True, max_new_tokens=400, backstep=BackstepConfig(n_remove=10))
    texts = tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :])
    assert sum(t.count("<|end_story|>") for t in texts) > 0


@pytest.mark.slow
def test_tinystories_loop_criterion_leaves_a_story_alone(tinystories) -> None:
    model, tokenizer = tinystories
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    criterion = pl.RepetitionLoopCriteria(min_span=2, max_span=16, repeats=3, prompt_length=ids.shape[1])
    for seed in range(3):
        torch.manual_seed(seed)
        plain = model.generate(ids, do_sample=True, max_new_tokens=300)
        torch.manual_seed(seed)
        guarded = model.generate(ids, do_sample=True, max_new_tokens=300, stopping_criteria=[criterion])
        assert torch.equal(plain, guarded)
