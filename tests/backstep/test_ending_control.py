"""Ending control beyond the EOS token in backstep generation: phrase rewinds (early triggers wired into
generation are tested in test_triggers.py, the stopping guards in test_criteria.py).

Scripted runs use a tiny random Llama with TinyStories-656K's tokenizer (vocab 2048) and a processor that
forces a given token script, so we know exactly which tokens spell a phrase.
"""

from __future__ import annotations

import re

import pytest
import torch
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
