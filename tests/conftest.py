"""Shared fixtures: the real models in ../shared/models and a scripted model; helpers live in ``support.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import SMOLLM2, STORIES260K, TINYSTORIES, require_model_dir, tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tinystories_path() -> Path:
    return require_model_dir(TINYSTORIES)


@pytest.fixture(scope="session")
def tinystories(tinystories_path: Path):
    """(model, tokenizer) of TinyStories-656K, loaded through the normal from_pretrained path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tinystories_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tinystories_path)
    return model, tokenizer


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF folder (converted to safetensors once, cached outside the repo)."""
    return require_model_dir(SMOLLM2)


@pytest.fixture(scope="session")
def story_tokenizer(tinystories_path: Path):
    """TinyStories-656K's tokenizer (the scripted ending and loop tests spell its pieces)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tinystories_path)


@pytest.fixture(scope="session")
def scripted_model():
    """A tiny random perpetual Llama with TinyStories-656K's vocabulary size and EOS, for scripted tests."""
    from perpetual_logits import make_perpetual

    return make_perpetual(tiny_model("llama", vocab=2048, eos=2, attn="sdpa"))


@pytest.fixture(scope="session")
def stories260k_path() -> Path:
    return require_model_dir(STORIES260K)
