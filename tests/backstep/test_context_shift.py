"""Context shift (issue 17): backstep generation past the model's window with a bounded cache.

The reference for every check is a fresh forward over exactly the text the shifted cache should hold: a row's
head (its first ``keep`` text tokens) followed by its tokens after what the shifts dropped.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from support import EOS, PAD, BoostEOS
from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from perpetual_logits import BackstepConfig, ContextShift, RewindRule, RewindTo, RowView, _compat, make_perpetual

LIMIT = 16
KEEP = 3
DISCARD = 6
NO_EOS = {"max_backsteps": 0}  # EOS forbidden from the start: no rewinds, every token fed once, in order


def window_model(layers: int = 2, limit: int = LIMIT, seed: int = 0) -> LlamaForCausalLM:
    """A tiny random fp32 Llama whose declared window is ``limit`` positions (its logits are O(1))."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=limit,
        initializer_range=0.2,
        eos_token_id=EOS,
        pad_token_id=PAD,
        bos_token_id=1,
        attn_implementation="eager",
    )
    return make_perpetual(LlamaForCausalLM(config).eval())


def contexts(ids: list[int], text_start: int, prompt_length: int, keep: int, discard: int, limit: int):
    """For each generated position ``n`` (no rewinds), the text the model should attend to when predicting it:
    the head plus the tokens after what the shifts dropped, as the shift rule says (feeding token ``i`` at
    position ``i - text_start - dropped >= limit`` first drops ``discard`` more tokens after the head)."""
    dropped = 0
    out = []
    for n in range(prompt_length, len(ids)):
        fed = n - 1  # predicting token n feeds token n - 1
        if n > prompt_length and fed - text_start - dropped >= limit:
            dropped += discard
        head = ids[text_start : min(text_start + keep, n)]
        out.append((head + ids[text_start + keep + dropped : n], dropped))
    return out


def reference_logits(model, context: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([context])).logits[0, -1]


def run(model, ids, shift: ContextShift | None, new: int, mask=None, **kwargs):
    config = BackstepConfig(n_remove=3, window=shift, **{**NO_EOS, **kwargs.pop("backstep", {})})
    return model.generate(
        ids,
        attention_mask=mask if mask is not None else torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new,
        backstep=config,
        return_dict_in_generate=True,
        output_logits=True,
        **kwargs,
    )


@pytest.mark.parametrize("method", ["reprefill", "rerotate"])
def test_every_step_sees_exactly_the_kept_text(method: str) -> None:
    # Re-prefilling is exact for any depth; re-rotating keys is exact when no state depends on other tokens'
    # (one layer: a cached key/value is a function of its token and position only).
    model = window_model(layers=2 if method == "reprefill" else 1)
    prompt = [1, 5, 6, 7]
    out = run(model, torch.tensor([prompt]), ContextShift(keep=KEEP, discard=DISCARD, method=method), 40)
    ids = out.sequences[0].tolist()
    assert len(ids) == len(prompt) + 40 and len(out.logits) == 40, "every token returned, one record each"
    expected = contexts(ids, 0, len(prompt), KEEP, DISCARD, LIMIT)
    assert expected[-1][1] >= 3 * DISCARD, "the run must shift several times"
    assert out.backstep_stats.context_shifts == expected[-1][1] // DISCARD
    for j, (context, _) in enumerate(expected):
        assert len(context) <= LIMIT
        torch.testing.assert_close(out.logits[j][0], reference_logits(model, context), atol=1e-4, rtol=0)
    assert out.backstep_stats.peak_cache_slots <= LIMIT


def test_rerotating_a_deep_model_is_not_exact_and_that_is_measured() -> None:
    model = window_model(layers=2)
    prompt = [1, 5, 6, 7]
    shift = ContextShift(keep=KEEP, discard=DISCARD, method="rerotate")
    out = run(model, torch.tensor([prompt]), shift, 20)
    ids = out.sequences[0].tolist()
    expected = contexts(ids, 0, len(prompt), KEEP, DISCARD, LIMIT)
    first = next(j for j, (_, dropped) in enumerate(expected) if dropped)
    before = (out.logits[first - 1][0] - reference_logits(model, expected[first - 1][0])).abs().max()
    after = (out.logits[first][0] - reference_logits(model, expected[first][0])).abs().max()
    assert before < 1e-4 < after, "kept states above the first layer saw the dropped tokens"


@pytest.mark.parametrize("method", ["reprefill", "rerotate"])
def test_a_left_padded_batch_whose_rows_shift_at_different_steps(method: str) -> None:
    model = window_model(layers=2 if method == "reprefill" else 1)
    prompts = [[1, 5, 6, 7, 8, 9, 10], [1, 9]]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = (ids != PAD).long()
    out = run(model, ids, ContextShift(keep=KEEP, discard=DISCARD, method=method), 30, mask=mask)
    shifts_at = []
    for b, prompt in enumerate(prompts):
        ids_b = out.sequences[b].tolist()
        start = width - len(prompt)
        expected = contexts(ids_b, start, width, KEEP, DISCARD, LIMIT)
        shifts_at.append(next(j for j, (_, dropped) in enumerate(expected) if dropped))
        for j, (context, _) in enumerate(expected):
            torch.testing.assert_close(out.logits[j][b], reference_logits(model, context), atol=1e-4, rtol=0)
    assert shifts_at[0] != shifts_at[1], "the rows must shift at different steps"
    assert out.backstep_stats.peak_cache_slots <= LIMIT + (width - min(map(len, prompts))) + 1


class StopRowAt(StoppingCriteria):
    """Ends row 0 once it holds ``length`` tokens (the other rows go on)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        done[0] = input_ids.shape[-1] >= self.length
        return done  # type: ignore[return-value]


def test_a_row_that_ends_with_a_full_window_while_another_writes_on() -> None:
    # Row 0 ends holding LIMIT + 1 tokens (LIMIT of them cached); row 1 shifts at that very step and writes on
    # beside it: the layout takes one masked column more than the window, never an overflow.
    model = window_model()
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])
    out = run(model, ids, ContextShift(keep=KEEP, discard=DISCARD), 30, stopping_criteria=[StopRowAt(LIMIT + 1)])
    row0, row1 = out.sequences[0].tolist(), out.sequences[1].tolist()
    assert row0[LIMIT + 1 :] == [PAD] * (len(row0) - LIMIT - 1) and len(row1) == 4 + 30
    for j, (context, _) in enumerate(contexts(row1, 0, 4, KEEP, DISCARD, LIMIT)):
        torch.testing.assert_close(out.logits[j][1], reference_logits(model, context), atol=1e-4, rtol=0)
    assert out.backstep_stats.peak_cache_slots == LIMIT + 1


def test_keep_prompt_keeps_each_rows_whole_prompt() -> None:
    model = window_model()
    prompt = [1, 5, 6, 7, 8]
    out = run(model, torch.tensor([prompt]), ContextShift(discard=4), 24)
    ids = out.sequences[0].tolist()
    for j, (context, _) in enumerate(contexts(ids, 0, len(prompt), len(prompt), 4, LIMIT)):
        assert context[: len(prompt)] == prompt
        torch.testing.assert_close(out.logits[j][0], reference_logits(model, context), atol=1e-4, rtol=0)


class RewindFar(RewindRule):
    """Asks, at given row lengths, to rewind to the prompt's end (much further back than any shift allows)."""

    reason = "far"

    def __init__(self, at: tuple[int, ...]) -> None:
        self.at = at
        self.done: set[int] = set()

    def check(self, view: RowView) -> RewindTo | None:
        length = len(view.ids)
        if length in self.at and length not in self.done:
            self.done.add(length)
            return RewindTo(position=view.prompt_length, reason=self.reason)
        return None


def test_rewinds_stop_at_the_shift_and_the_cache_stays_a_fresh_prefill_of_the_kept_text() -> None:
    model = window_model()
    prompt = [1, 5, 6, 7]
    rule = RewindFar(at=(30, 45))
    shift = ContextShift(keep=KEEP, discard=DISCARD)
    out = model.generate(
        torch.tensor([prompt]),
        do_sample=True,
        top_k=0,
        max_new_tokens=60,
        logits_processor=[BoostEOS(2.0)],
        backstep=BackstepConfig(n_remove=3, hold_back=100, max_backsteps=20, rules=[rule], window=shift),
        return_dict_in_generate=True,
        output_scores=True,
    )
    ids = out.sequences[0].tolist()
    events = out.backstep_events[0]
    assert {e.reason for e in events} >= {"far", "eos"}, "both kinds of rewinds must happen after shifts"
    assert len(ids) == len(prompt) + 60 and len(out.scores) == 60
    for event in events:
        if event.reason == "far":
            # The rule asked for position 0 (the prompt's end); a shift had dropped the middle, so the rewind
            # stopped one token after the first kept recent token.
            assert event.position > KEEP
    # The returned cache holds the head and the newest tokens (all but the last, never fed), exactly as a fresh
    # prefill of that text computes them.
    cache = getattr(out, _compat.output_cache_field())
    slots = cache.get_seq_length()
    assert slots <= LIMIT
    kept = ids[:KEEP] + ids[len(ids) - 1 - (slots - KEEP) : len(ids) - 1]
    with torch.no_grad():
        prefilled = model(torch.tensor([kept]), use_cache=True)
    fresh = getattr(prefilled, "cache", None) or prefilled.past_key_values
    for got, want in zip(_compat.cache_layers(cache), _compat.cache_layers(fresh)):
        torch.testing.assert_close(got.keys, want.keys, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.values, want.values, atol=1e-4, rtol=0)


class Recording(BaseStreamer):
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.tokens += value.reshape(-1).tolist()

    def end(self) -> None:
        self.ended = True


def test_streaming_carries_on_across_shifts() -> None:
    model = window_model()
    streamer = Recording()
    out = model.generate(
        torch.tensor([[1, 5, 6]]),
        do_sample=True,
        max_new_tokens=50,
        logits_processor=[BoostEOS(2.0)],
        streamer=streamer,
        backstep=BackstepConfig(n_remove=3, window=ContextShift(keep=2, discard=5)),
    )
    assert model.last_backstep[1].context_shifts >= 3
    assert streamer.ended and streamer.tokens == out[0].tolist()


def test_past_the_window_without_a_shift_is_warned_about_in_one_line() -> None:
    model = window_model()
    ids = torch.tensor([[1, 5, 6]])
    with pytest.warns(UserWarning, match=r"past the model's window of 16 .*ContextShift") as caught:
        model.generate(ids, do_sample=False, max_new_tokens=20, backstep=BackstepConfig(**NO_EOS))
    assert len([w for w in caught if "window" in str(w.message)]) == 1
    assert "\n" not in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(ids, do_sample=False, max_new_tokens=13, backstep=BackstepConfig(**NO_EOS))
        model.generate(ids, do_sample=False, max_new_tokens=20, backstep=BackstepConfig(window=ContextShift()))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep": -1}, "`keep` must be 'prompt' or an int >= 0"),
        ({"keep": "all"}, "`keep` must be 'prompt' or an int >= 0"),
        ({"discard": 0}, "`discard` must be an int >= 1"),
        ({"limit": 2}, "`limit` must be an int >= 4"),
        ({"method": "roll"}, "`method` must be 'reprefill' or 'rerotate'"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ContextShift(**kwargs)


def test_settings_that_do_not_fit_the_model_are_refused() -> None:
    model = window_model()
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(ValueError, match="`window` must be None or a ContextShift"):
        BackstepConfig(window=16)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`limit` \(32\) must not exceed the model's window"):
        run(model, ids, ContextShift(limit=32), 20)
    with pytest.raises(ValueError, match=r"`discard` must be in \[1, 11\]"):
        run(model, ids, ContextShift(keep=3, discard=12), 20)
    with pytest.raises(ValueError, match="left-padded attention_mask"):
        run(model, torch.tensor([[1, 5, 6]]), ContextShift(keep=1), 20, mask=torch.tensor([[1, 0, 1]]))


@pytest.mark.models
def test_tinystories_writes_on_past_its_window(tinystories) -> None:
    model, tokenizer = tinystories
    model = make_perpetual(model)
    prompt = tokenizer("Once upon a time", return_tensors="pt").input_ids
    keep = prompt.shape[1]
    out = run(model, prompt, ContextShift(), 560, backstep={"max_backsteps": 0})
    ids = out.sequences[0].tolist()
    discard = (512 - keep) // 2
    expected = contexts(ids, 0, keep, keep, discard, 512)
    first = next(j for j, (_, dropped) in enumerate(expected) if dropped)
    assert out.backstep_stats.context_shifts == 1 and out.backstep_stats.peak_cache_slots <= 512
    for j in (first - 1, first, len(expected) - 1):
        torch.testing.assert_close(out.logits[j][0], reference_logits(model, expected[j][0]), atol=1e-4, rtol=0)
