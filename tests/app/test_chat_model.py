"""The chat preset on a real chat model, SmolLM2-135M-Instruct (slow: ~60 ms per token on 2 cores)."""

from __future__ import annotations

import pytest
import torch

import perpetual_logits as pl
from perpetual_logits.analysis.metrics import rep_n
from perpetual_logits.text.boundaries import count_words, ends_sentence
from perpetual_logits.text.endings import CHAT_CLOSING_PHRASES, CHAT_END_TOKENS

PROMPTS = [
    "Explain how rainbows form.",
    "Write a short poem about autumn.",
    "What is the capital of France?",
    "Give me three tips for better sleep.",
]


@pytest.fixture(scope="module")
def chat(smollm2_path):
    from perpetual_logits.app.chat_model import load_chat_model

    model, tokenizer = load_chat_model(smollm2_path)
    tokenizer.padding_side = "left"
    return pl.make_perpetual(model, tokenizer=tokenizer), tokenizer


def chat_batch(tokenizer):
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in PROMPTS
    ]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@pytest.mark.models
@pytest.mark.slow
def test_chat_preset_writes_to_the_landing_without_endings_and_without_more_repetition(chat) -> None:
    torch.set_num_threads(2)
    model, tokenizer = chat
    batch = chat_batch(tokenizer)
    n = batch.input_ids.shape[1]
    sampling = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 200}
    torch.manual_seed(0)
    baseline = model.generate(**batch, backstep=False, **sampling)
    torch.manual_seed(0)
    out = model.generate(**batch, backstep=pl.BackstepConfig.chat(), return_dict_in_generate=True, **sampling)
    eos = model.generation_config.eos_token_id
    base_rows = [[t for t in row[n:].tolist() if t != eos] for row in baseline]
    rows = [row[n:].tolist() for row in out.sequences]
    rows = [row[: row.index(eos)] if eos in row else row for row in rows]
    assert sum(len(r) < 200 for r in base_rows) >= 1, "some answer ends early without the preset"
    for row in rows:
        # to the landing: ended at a sentence end in the last margin (its own end of turn, or cut back at the limit)
        kept = row[: row.index(eos)] if eos in row else row
        assert len(kept) >= 200 - 2 * 64, len(kept)
        assert ends_sentence(tokenizer.decode(kept, skip_special_tokens=True)), tokenizer.decode(kept)
        text = tokenizer.decode(kept, skip_special_tokens=False)
        assert not any(marker in text for marker in CHAT_END_TOKENS), text
        assert not any(pattern.search(text) for pattern in CHAT_CLOSING_PHRASES), text
    base_rep = sum(rep_n(r, 4) for r in base_rows) / len(base_rows)
    rep = sum(rep_n(r, 4) for r in rows) / len(rows)
    assert rep <= base_rep + 0.05, (rep, base_rep)


@pytest.mark.models
@pytest.mark.slow
def test_a_pipeline_over_a_perpetual_chat_model_gets_the_preset(chat) -> None:
    from transformers import pipeline

    model, tokenizer = chat
    model.backstep_config = pl.BackstepConfig.chat(max_backsteps=4)
    try:
        generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
        torch.manual_seed(0)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        result = generator(messages, max_new_tokens=40, do_sample=True, temperature=0.7)
        assert model.last_backstep is not None, "the pipeline's generate() ran the backstep loop"
        reply = result[0]["generated_text"][-1]["content"]
        assert len(tokenizer(reply, add_special_tokens=False).input_ids) >= 35
    finally:
        model.backstep_config = None


@pytest.mark.models
@pytest.mark.slow
def test_chat_preset_with_a_minimum_in_words_writes_it_then_ends_naturally(chat) -> None:
    torch.set_num_threads(2)
    model, tokenizer = chat
    messages = [{"role": "user", "content": "Write about 60 words about the sea."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = tokenizer([text], return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(
        **batch,
        backstep=pl.BackstepConfig.chat(min_words=60),
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
        max_new_tokens=160,
    )
    row = out[0, batch.input_ids.shape[1] :].tolist()
    answer = tokenizer.decode(row, skip_special_tokens=True)
    assert count_words(answer) >= 60, answer
    assert ends_sentence(answer), answer
    assert not any(marker in answer for marker in CHAT_END_TOKENS), answer
