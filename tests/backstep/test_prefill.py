"""prefill: the prompt forward as generate() runs it, and what it leaves for the loop -- the first logits, a cache
layout over the filled cache, a decode step that continues it exactly, the context shift when asked. A tiny random
Llama built from a config; no files."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, GenerationConfig, LlamaConfig, LlamaForCausalLM, StaticCache

from perpetual_logits import ContextShift
from perpetual_logits.backstep.prefill import prefill

CONFIG = LlamaConfig(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    eos_token_id=2,
    pad_token_id=0,
)
PROMPT = torch.tensor([[1, 5, 6, 7], [0, 1, 5, 9]])  # row 1 is left-padded
MASK = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
MAX_LENGTH = 12


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG).eval()


def kwargs(cache: object) -> dict[str, object]:
    """The model kwargs generate() hands _sample: the mask, positions numbered after the left padding, an empty
    cache."""
    positions = (MASK.cumsum(-1) - 1).masked_fill(MASK == 0, 0)
    return {"attention_mask": MASK, "position_ids": positions, "use_cache": True, "cache": cache}


@torch.no_grad()
def test_first_logits_are_the_prompts_last_and_the_layout_covers_the_prompt(model):
    done = prefill(
        model, PROMPT, GenerationConfig(max_length=MAX_LENGTH), kwargs(DynamicCache(config=CONFIG)), 12, [0, 1]
    )
    expected = model(PROMPT, attention_mask=MASK, position_ids=(MASK.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    assert done.logits.dtype == torch.float32
    assert torch.allclose(done.logits, expected, atol=1e-6)
    assert done.cache.width == PROMPT.shape[1] and done.cache.capacity == MAX_LENGTH
    assert done.window is None


@torch.no_grad()
def test_the_decode_step_continues_the_prompt_exactly(model):
    done = prefill(
        model, PROMPT, GenerationConfig(max_length=MAX_LENGTH), kwargs(DynamicCache(config=CONFIG)), 12, [0, 1]
    )
    layout = done.cache
    layout.start(2, PROMPT.shape[1])
    tokens = [11, 12]
    positions = [layout.position(b, PROMPT.shape[1]) for b in range(2)]
    assert positions == [4, 3]  # row 1's padding holds no position
    logits = done.decode(tokens, layout.append_column([True, True]), positions)
    whole = torch.cat([PROMPT, torch.tensor(tokens)[:, None]], dim=1)
    mask = torch.cat([MASK, torch.ones(2, 1, dtype=torch.long)], dim=1)
    expected = model(whole, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    assert torch.allclose(logits, expected, atol=1e-5)


@torch.no_grad()
def test_a_context_shift_is_built_with_the_cache_and_bounds_its_layout(model):
    done = prefill(
        model,
        PROMPT,
        GenerationConfig(max_length=MAX_LENGTH),
        kwargs(DynamicCache(config=CONFIG)),
        MAX_LENGTH,
        [0, 1],
        ContextShift(limit=8),
    )
    assert done.window is not None and done.window.limit == 8
    assert done.cache.capacity == 8 + 1 + 1  # the limit, row 1's padding, one column for a finished row


@torch.no_grad()
def test_a_static_cache_the_run_could_outgrow_is_refused(model):
    small = StaticCache(config=CONFIG, max_cache_len=8)
    with pytest.raises(ValueError, match="max_cache_len >= 12"):
        prefill(model, PROMPT, GenerationConfig(max_length=MAX_LENGTH), kwargs(small), MAX_LENGTH, [0, 1])


def test_the_loop_is_whole_before_it_runs(model, monkeypatch):
    """Every field of a built BackstepLoop is set before run(): only the optional units (no schedule, no context
    shift asked) are None."""
    from perpetual_logits import BackstepConfig, make_perpetual
    from perpetual_logits.backstep import BackstepLoop

    before_run: dict[str, object] = {}
    run = BackstepLoop.run

    def record(self: BackstepLoop) -> object:
        before_run.update(vars(self))
        return run(self)

    monkeypatch.setattr(BackstepLoop, "run", record)
    make_perpetual(model).generate(
        PROMPT, attention_mask=MASK, do_sample=False, max_new_tokens=3, backstep=BackstepConfig(n_remove=1)
    )
    assert {name for name, value in before_run.items() if value is None} == {"temperature", "window"}
    assert before_run["first_logits"].shape == (2, CONFIG.vocab_size)  # type: ignore[attr-defined]
    assert before_run["stats"].prefill_forwards == 1  # type: ignore[attr-defined]
