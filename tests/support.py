"""What the tests share besides fixtures: model folders, tiny random models, the one tiny tokenizer, helpers.

Test files import it as a module (``from support import tiny_model``; ``pyproject.toml`` puts ``tests/`` on the
path); ``conftest.py`` holds only fixtures and hooks. Tests that need the real models skip with a visible reason
when the folder is absent, unless ``PERPETUAL_LOGITS_REQUIRE_MODELS=1`` (set by ``.ci/run``), where they fail
instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import LogitsProcessor

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
MODELS_DIR = Path(os.environ.get("PERPETUAL_LOGITS_MODELS", REPO.parent / "shared" / "models")).resolve()
TINYSTORIES = MODELS_DIR / "tinystories-656k"
STORIES260K = MODELS_DIR / "stories260K"
SMOLLM2 = MODELS_DIR / "smollm2-135m-instruct"
REQUIRE_MODELS = os.environ.get("PERPETUAL_LOGITS_REQUIRE_MODELS") == "1"


def require_model_dir(path: Path) -> Path:
    """Return ``path`` if it exists; otherwise skip (or fail when models are required)."""
    if path.exists():
        return path
    message = f"model folder {path} is absent (set PERPETUAL_LOGITS_MODELS to the shared/models folder)"
    if REQUIRE_MODELS:
        pytest.fail(message + "; PERPETUAL_LOGITS_REQUIRE_MODELS=1 requires it")
    pytest.skip(message)


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging) when the block runs longer than ``seconds``."""

    def expire(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


VOCAB = 64
EOS = 2
PAD = 0


class BoostEOS(LogitsProcessor):
    """A LogitsProcessor that makes EOS likely: it changes scores, never the raw logits exactness is checked on."""

    def __init__(self, amount: float, eos: int = EOS) -> None:
        self.amount, self.eos = amount, eos

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores.clone()
        out[:, self.eos] += self.amount
        return out  # type: ignore[return-value]


def tiny_config(arch: str, vocab: int = VOCAB, eos: int | list[int] = EOS, attn: str = "eager", **extra: object):
    """A tiny random config of ``arch`` with logits of order 1 (initializer_range 0.2)."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common: dict[str, object] = {
        "vocab_size": vocab,
        "eos_token_id": eos,
        "pad_token_id": PAD,
        "bos_token_id": 1,
        "initializer_range": 0.2,
        "attn_implementation": attn,
    }
    common.update(extra)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **common)
    sizes = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    }
    if arch == "llama":
        return LlamaConfig(**sizes, **common)
    if arch == "qwen2":
        return Qwen2Config(**sizes, **common)
    if arch == "mistral":
        common.setdefault("sliding_window", 4096)
        return MistralConfig(**sizes, **common)
    if arch == "gemma":
        from transformers import GemmaConfig

        return GemmaConfig(**sizes, head_dim=8, **common)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0, **kwargs: object):
    """A tiny random causal LM in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kwargs))  # type: ignore[arg-type]
    return model.eval()


def tiny_tokenizer():
    """The tests' one tokenizer: word-level over the tiny models' 64 ids, adding no special tokens.

    Words: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2 (EOS), ``"\\n"`` 3 (a line end: generated text has line boundaries,
    where the landing cuts back), the letters ``a`` ... ``z`` 4 ... 29, ``w0`` ... ``w32`` 30 ... 62, ``<unk>`` 63.
    Text splits on whitespace and punctuation (a newline in the input only separates words); decoding joins words
    with spaces.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "\n"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words += [f"w{i}" for i in range(VOCAB - len(words) - 1)] + ["<unk>"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def save_tiny_model(folder: Path, arch: str = "llama", **config: object) -> Path:
    """Save a tiny random model of ``arch`` and :func:`tiny_tokenizer` into ``folder`` (a model the CLI can load)."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer().save_pretrained(folder)
    tiny_model(arch, **config).save_pretrained(folder)
    return folder


def source_module(name: str) -> ModuleType:
    """A fresh copy of the package module ``name`` run from its ``.py`` source, under a private name, whether or
    not the package imported a compiled build of it (``perpetual_logits/_native.py``): for tests that replace a
    method or a table to watch or disable it, which a compiled class does not allow. Its relative imports are the
    package's own modules."""
    path = REPO.joinpath(*name.split(".")).with_suffix(".py")
    private = f"{name.rpartition('.')[0]}._source_{name.rpartition('.')[2]}"
    if private not in sys.modules:
        spec = importlib.util.spec_from_file_location(private, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[private] = module
        spec.loader.exec_module(module)
    return sys.modules[private]
