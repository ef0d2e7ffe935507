"""Fixtures of the vLLM tests (run by ``make test-vllm`` in ``.venv-vllm``; never collected by ``make test``).

One engine is shared by all tests of a session: vLLM start-up takes tens of seconds on 2 CPU cores. The model
is SmolLM2-135M-Instruct from ``../shared/models`` converted to safetensors (vLLM's CPU attention needs head
sizes >= 32, which rules out the TinyStories models). ``make test-vllm`` converts it with the main venv and
passes the folder as ``PERPETUAL_LOGITS_VLLM_MODEL``. Without the model the tests skip with the reason, or
fail when ``PERPETUAL_LOGITS_REQUIRE_MODELS=1`` (as in CI).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = Path(os.environ.get("PERPETUAL_LOGITS_MODELS", REPO.parent / "shared" / "models")).resolve()
SMOLLM = MODELS_DIR / "smollm2-135m-instruct"
REQUIRE_MODELS = os.environ.get("PERPETUAL_LOGITS_REQUIRE_MODELS") == "1"


def _missing(message: str) -> None:
    if REQUIRE_MODELS:
        pytest.fail(message + "; PERPETUAL_LOGITS_REQUIRE_MODELS=1 requires it")
    pytest.skip(message)


@pytest.fixture(scope="session")
def model_path() -> str:
    """The converted SmolLM2 folder: $PERPETUAL_LOGITS_VLLM_MODEL, else converted (or found) in the cache."""
    given = os.environ.get("PERPETUAL_LOGITS_VLLM_MODEL")
    if given:
        if not (Path(given) / "config.json").exists():
            _missing(f"PERPETUAL_LOGITS_VLLM_MODEL={given} holds no converted model")
        return given
    if not SMOLLM.exists():
        _missing(f"model folder {SMOLLM} is absent (set PERPETUAL_LOGITS_MODELS to the shared/models folder)")
    from perpetual_logits.app.chat_model import converted_checkpoint

    try:
        return str(converted_checkpoint(SMOLLM))
    except ImportError as exc:  # a conversion needs gguf + accelerate, which .venv-vllm does not install
        _missing(f"cannot convert {SMOLLM} here ({exc}); run `make test-vllm`, which converts it with .venv")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def llm(model_path: str):
    """One engine for the session: float32 (so that equal seeds give equal tokens), eager (no 2-minute
    compile), a small KV cache, block size 32 (the smallest the CPU attention accepts), and a batch token
    budget large enough that prompts are not chunked (a per-request seed with chunked prefill crashes the
    CPU engine)."""
    import perpetual_logits.vllm as plv

    engine = plv.LLM(
        model_path,
        dtype="float32",
        enforce_eager=True,
        kv_cache_memory_bytes=256 << 20,
        block_size=32,
        max_model_len=1024,
        max_num_batched_tokens=4096,
        seed=0,
    )
    yield engine
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def prompts(llm) -> list[str]:
    """Four chat prompts; SmolLM2 answers each in a few dozen tokens and then emits EOS."""
    tokenizer = llm.get_tokenizer()
    questions = [
        "What is the capital of France?",
        "Is water wet? Answer briefly.",
        "Give me a synonym for happy.",
        "How many legs does a dog have?",
    ]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
