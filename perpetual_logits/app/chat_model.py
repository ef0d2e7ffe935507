"""Load a GGUF chat model (e.g. SmolLM2-135M-Instruct) through ``from_pretrained``, once, and reuse it.

transformers dequantizes a GGUF file on every load (about 30 s for SmolLM2-135M on 2 CPU cores) and refuses
``save_pretrained`` on the model it returns ("quantized with gguf and is not serializable"). The weights it
returns are ordinary float tensors, though: copying them into a model built from the same config (without
the ``quantization_config``) gives a model that saves as safetensors. :func:`converted_checkpoint` does that
once and caches the folder, which then loads in under a second with identical logits -- and is the form
vLLM reads.

Needs the ``gguf`` and ``accelerate`` packages (the ``chat`` extra).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

__all__ = ["cache_root", "converted_checkpoint", "find_gguf", "load_chat_model"]

_DONE = ".perpetual-logits-converted"


def cache_root() -> Path:
    """Where converted checkpoints live: ``$PERPETUAL_LOGITS_CACHE``, else ``~/.cache/perpetual_logits``."""
    env = os.environ.get("PERPETUAL_LOGITS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "perpetual_logits"


def find_gguf(path: str | os.PathLike[str]) -> Path:
    """The GGUF file at ``path``: the file itself, or the only ``*.gguf`` in a folder.

    Raises:
        ValueError: ``path`` does not exist, or a folder holds no ``.gguf`` file or more than one.
    """
    p = Path(path)
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"`path` must be a .gguf file or a folder holding one, got {str(p)!r}")
        return p
    if not p.is_dir():
        raise ValueError(f"`path` does not exist: {str(p)!r}")
    found = sorted(p.glob("*.gguf"))
    if len(found) != 1:
        raise ValueError(f"`path` must hold exactly one .gguf file, found {len(found)} in {str(p)!r}")
    return found[0]


def _fingerprint(gguf: Path) -> str:
    """Identifies a GGUF file by name, size and the hash of its first and last MiB (hashing 100 MB each time
    would cost more than the check saves)."""
    size = gguf.stat().st_size
    digest = hashlib.sha256(f"{gguf.name}:{size}".encode())
    with gguf.open("rb") as fh:
        digest.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]


def converted_checkpoint(path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A safetensors folder (model + tokenizer) converted from the GGUF at ``path``; built on first use.

    Args:
        path: a ``.gguf`` file, or a folder that holds exactly one.
        cache_dir: where to keep the converted folder (defaults to :func:`cache_root`).

    Returns:
        The folder, loadable with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    gguf = find_gguf(path)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / f"{gguf.stem}-{_fingerprint(gguf)}"
    if (target / _DONE).exists():
        return target

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config.__class__.from_dict(
        {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    )
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    # Write into a temporary sibling and rename, so that an interrupted conversion never looks finished.
    partial = target.with_name(target.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / _DONE).write_text(f"converted from {gguf}\n")
    if target.exists():  # a concurrent conversion finished first
        return target
    partial.rename(target)
    return target


def load_chat_model(
    path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None, **kwargs: Any
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a GGUF file or a folder holding one (converted once, see
    :func:`converted_checkpoint`), or for an ordinary transformers folder. ``kwargs`` go to the model's
    ``from_pretrained``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if p.is_dir() and (p / "config.json").exists():
        folder = p
    else:
        folder = converted_checkpoint(p, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer
