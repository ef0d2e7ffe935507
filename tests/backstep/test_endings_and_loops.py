"""Endings rewound like EOS and loops rewound (issue 12): the mechanics on scripted models."""

from __future__ import annotations

import pytest
import torch
from support import EOS, tiny_model
from test_ending_control import DOT, SPELLED_END, THEY_WERE_HAPPY, Script, run_script
from transformers import TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

import perpetual_logits as pl
from perpetual_logits import BackstepConfig, LoopDetection, make_perpetual


def test_an_ending_phrase_rewinds_n_remove_tokens_before_it(scripted_model, story_tokenizer) -> None:
    script = [*THEY_WERE_HAPPY, DOT, *SPELLED_END]
    out, generated = run_script(scripted_model, story_tokenizer, script, n_remove=2, end_phrases="default")
    events = [e for e in out.backstep_events[0] if e.reason == "ending"]
    assert events, "the spelled <|end_story|> must be caught as an ending"
    first = events[0]
    # The phrase began at generated index 4; the rewind goes n_remove = 2 tokens further back.
    assert (first.detail, first.position) == ("<|end_story|>", 2)
    # The two tokens before the phrase and the phrase; its completing token is refused (never fed, not counted).
    assert first.removed == 2 + len(SPELLED_END) - 1
    assert generated[:2] == THEY_WERE_HAPPY[:2]
    assert "<|end_story|>" not in story_tokenizer.decode(generated)


def test_an_ending_never_reaches_into_the_prompt(scripted_model, story_tokenizer) -> None:
    out, _ = run_script(scripted_model, story_tokenizer, [*SPELLED_END], n_remove=6, end_phrases="default")
    first = next(e for e in out.backstep_events[0] if e.reason == "ending")
    assert first.position == 0


def test_ending_rewinds_are_exact_and_forward_counted(scripted_model, story_tokenizer) -> None:
    prompt = story_tokenizer("Once upon a time", return_tensors="pt").input_ids
    script = [*THEY_WERE_HAPPY, DOT, *SPELLED_END]
    torch.manual_seed(0)
    out = scripted_model.generate(
        prompt,
        do_sample=True,
        top_k=0,
        max_new_tokens=20,
        logits_processor=[Script(script, prompt.shape[1])],
        backstep=BackstepConfig.method4(n_remove=3, end_phrases="default"),
        tokenizer=story_tokenizer,
        return_dict_in_generate=True,
        output_logits=True,
    )
    stats, events = out.backstep_stats, out.backstep_events[0]
    non_eos = sum(e.reason != "eos" for e in events)
    assert non_eos >= 1
    assert stats.decode_forwards == 20 + stats.removed_tokens + stats.deep_rewinds - 1  # the README's formula
    with torch.no_grad():
        fresh = scripted_model(out.sequences).logits[0, prompt.shape[1] - 1 : -1]
    assert (torch.stack(out.logits)[:, 0] - fresh).abs().max() <= 1e-4


def test_streamer_never_shows_an_ending_or_the_tokens_it_removes(scripted_model, story_tokenizer) -> None:
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
        backstep=BackstepConfig(n_remove=2, hold_back=2, end_phrases="default"),
        tokenizer=story_tokenizer,
        streamer=streamer,
    )
    text = "".join(streamer)
    assert "<|" not in text
    assert text == story_tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)


class Loop(Script):
    """Scripts a span repeated forever."""

    def __init__(self, span: list[int], prompt_length: int, repeats: int = 12) -> None:
        super().__init__(span * repeats, prompt_length)


class Recording(BaseStreamer):
    def __init__(self) -> None:
        self.tokens: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        self.tokens.extend(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def test_a_token_loop_is_rewound_to_where_the_repeat_began_and_its_first_token_banned() -> None:
    model = make_perpetual(tiny_model("llama"))
    prompt = [1, 5, 6, 7]
    span = [11, 12, 13]
    torch.manual_seed(0)
    out = model.generate(
        torch.tensor([prompt]),
        do_sample=True,
        top_k=0,
        max_new_tokens=24,
        logits_processor=[pl.SuppressEOSLogitsProcessor(EOS), Loop(span, len(prompt))],
        backstep=BackstepConfig(n_remove=3, loops=LoopDetection(min_repeats=3, min_loop_tokens=6)),
        return_dict_in_generate=True,
        output_logits=True,
    )
    first = next(e for e in out.backstep_events[0] if e.reason == "loop")
    # Three copies complete at generated index 9: the rewind keeps one copy (3 tokens) and bans span[0] there.
    assert (first.position, first.banned_token, first.step) == (3, span[0], 8)
    generated = out.sequences[0, len(prompt) :].tolist()
    assert generated[:3] == span and generated[3] != span[0]
    with torch.no_grad():
        fresh = model(out.sequences).logits[0, len(prompt) - 1 : -1]
    assert (torch.stack(out.logits)[:, 0] - fresh).abs().max() <= 1e-4
    stats, events = out.backstep_stats, out.backstep_events[0]
    assert events and stats.decode_forwards == 24 + stats.removed_tokens + stats.deep_rewinds - 1


def test_a_streamer_never_shows_a_loop_that_is_removed() -> None:
    model = make_perpetual(tiny_model("llama"))
    prompt = [1, 5, 6, 7]
    streamer = Recording()
    torch.manual_seed(0)
    out = model.generate(
        torch.tensor([prompt]),
        do_sample=True,
        top_k=0,
        max_new_tokens=30,
        logits_processor=[pl.SuppressEOSLogitsProcessor(EOS), Loop([11, 12], len(prompt))],
        backstep=BackstepConfig(n_remove=2, hold_back=8, loops=LoopDetection(min_repeats=3, min_loop_tokens=6)),
        streamer=streamer,
    )
    assert streamer.tokens == out[0].tolist()


def test_loop_rewind_budget_bounds_the_work() -> None:
    model = make_perpetual(tiny_model("llama"))
    prompt = [1, 5, 6, 7]
    out = model.generate(
        torch.tensor([prompt]),
        do_sample=False,
        max_new_tokens=40,
        logits_processor=[pl.SuppressEOSLogitsProcessor(EOS), Loop([11, 12], len(prompt), repeats=40)],
        backstep=BackstepConfig(n_remove=2, loops=LoopDetection(min_repeats=3, min_loop_tokens=6, max_rewinds=2)),
        return_dict_in_generate=True,
    )
    assert sum(e.reason == "loop" for e in out.backstep_events[0]) == 2
    assert out.sequences.shape[1] == len(prompt) + 40


class EveryThirdIsSeven(pl.RewindRule):
    """A user rule: the token 7 may not stand at a generated index divisible by 3."""

    reason = "seven"

    def check(self, view: pl.RowView) -> pl.RewindTo | None:
        index = len(view.ids) - 1 - view.prompt_length
        if view.ids[-1] == 7 and index % 3 == 0:
            return pl.RewindTo(position=len(view.ids) - 1, ban_here=(7,), reason=self.reason, restart_schedule=False)
        return None


def test_users_write_their_own_rewind_rules() -> None:
    model = make_perpetual(tiny_model("llama"))

    class Sevens(pl.SuppressEOSLogitsProcessor):
        def process(self, input_ids, scores, eos, positions):
            out = super().process(input_ids, scores, eos, positions)
            out[:, 7] += 4.0
            return out

    out = model.generate(
        torch.tensor([[1, 5, 6]]),
        do_sample=False,
        max_new_tokens=12,
        logits_processor=[Sevens(EOS, record=False)],
        backstep=BackstepConfig(rules=[EveryThirdIsSeven()]),
        return_dict_in_generate=True,
    )
    generated = out.sequences[0, 3:].tolist()
    assert all(t != 7 for i, t in enumerate(generated) if i % 3 == 0)
    assert any(e.reason == "seven" for e in out.backstep_events[0])
    with pytest.raises(ValueError, match="rules"):
        BackstepConfig(rules=[object()])
