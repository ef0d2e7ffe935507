"""The stories260K judge: a llama2.c-format checkpoint loaded into transformers, its tokenizer, and bits/char.

stories260K (Karpathy's tinyllamas, trained on TinyStories, 260,032 parameters, vocab 512, context 512) is the
*independent judge* of the quality benchmark: it never generates the texts it scores, and its tokenizer differs
from TinyStories-656K's, so the score is reported in **bits per character**, which does not depend on the
tokenizer.

* :func:`load_llama2c_model` reads the legacy (version 0) ``.bin`` format into a ``LlamaForCausalLM``. The
  layout and the mapping are in ``shared/models/README.md``; the one non-obvious step is that llama2.c's
  ``wq``/``wk`` rows use the *interleaved* rotary layout (pairs ``(2i, 2i+1)``) while transformers rotates
  halves (``(i, i + head_size/2)``), so their rows are permuted per head.
* :class:`Llama2cTokenizer` reads ``tok512.bin`` and encodes exactly like llama2.c's ``encode()`` (SentencePiece
  BPE): BOS, a dummy-prefix space, one piece per character (UTF-8 byte pieces for characters outside the
  vocabulary), then repeatedly merge the adjacent pair whose concatenation is in the vocabulary with the
  highest score (the leftmost pair on ties). A heap with lazy invalidation makes it O(n log n) rather than
  llama2.c's O(n²), with the same result.
* :class:`Judge` scores texts: see :meth:`Judge.nll` for the window and boundary rules.

Run ``python benchmarks/llama2c.py`` to print the greedy sample from "Once upon a time".
"""

from __future__ import annotations

import heapq
import math
import os
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perpetual_logits.analysis.metrics import bits_per_character

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "Judge",
    "Llama2cTokenizer",
    "default_models_dir",
    "judge_bits_per_char",
    "load_judge",
    "load_llama2c_model",
]

BOS_ID = 1  # <s>; in llama2.c the model *ends* a story by emitting it (it starts the next one)
EOS_ID = 2  # </s>; never emitted in practice
_BYTE_OFFSET = 3  # ids 3..258 are the byte pieces <0x00>..<0xFF>


def default_models_dir() -> Path:
    """``$PERPETUAL_LOGITS_MODELS`` if set, else ``../shared/models`` next to the repository."""
    env = os.environ.get("PERPETUAL_LOGITS_MODELS")
    if env:
        return Path(env).resolve()
    return (Path(__file__).resolve().parents[2] / "shared" / "models").resolve()


# -- model ----------------------------------------------------------------------------------------------------
def _permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from llama2.c's interleaved rotary layout to transformers' rotate-half layout."""
    rows, dim = w.shape
    head_size = rows // n_heads
    return w.view(n_heads, head_size // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def load_llama2c_model(path: str | os.PathLike[str]) -> Any:
    """Load a llama2.c legacy (version 0) ``.bin`` checkpoint into a ``LlamaForCausalLM`` in eval mode.

    Args:
        path (`str` or `PathLike`): the ``.bin`` file (e.g. ``stories260K.bin``).

    Returns:
        `LlamaForCausalLM`: float32, eval mode; ``bos_token_id = eos_token_id = 1`` because in llama2.c a story
        ends when the model emits BOS.

    Raises:
        ValueError: the file is not a llama2.c version-0 checkpoint (header or size mismatch).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"`path` must be an existing llama2.c .bin file, got {str(path)!r}")
    raw = path.read_bytes()
    if len(raw) < 28:
        raise ValueError(f"`path` {str(path)!r} is too short for a llama2.c header")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack("<7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) <= 0 or dim % n_heads:
        raise ValueError(f"`path` {str(path)!r} has an implausible llama2.c header {raw[:28]!r}")
    head_size = dim // n_heads
    kv_dim = n_kv_heads * head_size
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("tok", (vocab, dim)),
        ("rms_att", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("rms_ffn", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("rms_final", (dim,)),
        ("freq_real", (seq_len, head_size // 2)),
        ("freq_imag", (seq_len, head_size // 2)),
    ]
    if not shared:
        shapes.append(("wcls", (vocab, dim)))
    n_floats = sum(math.prod(shape) for _, shape in shapes)
    if len(raw) != 28 + 4 * n_floats:
        raise ValueError(f"`path` {str(path)!r}: {len(raw)} bytes, expected {28 + 4 * n_floats} for the header's sizes")
    flat = torch.frombuffer(bytearray(raw[28:]), dtype=torch.float32)
    weights: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in shapes:
        count = math.prod(shape)
        weights[name] = flat[offset : offset + count].view(shape)
        offset += count

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_size,
        max_position_embeddings=seq_len,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=shared,
        bos_token_id=BOS_ID,
        eos_token_id=BOS_ID,
        pad_token_id=0,
    )
    state: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": weights["tok"],
        "model.norm.weight": weights["rms_final"],
        "lm_head.weight": weights["tok"] if shared else weights["wcls"],
    }
    for i in range(n_layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = weights["rms_att"][i]
        state[p + "self_attn.q_proj.weight"] = _permute_rotary(weights["wq"][i], n_heads)
        state[p + "self_attn.k_proj.weight"] = _permute_rotary(weights["wk"][i], n_kv_heads)
        state[p + "self_attn.v_proj.weight"] = weights["wv"][i]
        state[p + "self_attn.o_proj.weight"] = weights["wo"][i]
        state[p + "post_attention_layernorm.weight"] = weights["rms_ffn"][i]
        state[p + "mlp.gate_proj.weight"] = weights["w1"][i]
        state[p + "mlp.down_proj.weight"] = weights["w2"][i]
        state[p + "mlp.up_proj.weight"] = weights["w3"][i]
    model = LlamaForCausalLM(config)
    # strict: every parameter of the HF model must come from the file (the tied lm_head is listed once more).
    missing, unexpected = model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not (shared and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    if shared:
        model.tie_weights()
    return model.eval()


# -- tokenizer ------------------------------------------------------------------------------------------------
class Llama2cTokenizer:
    """llama2.c's ``tokenizer.bin`` format (e.g. ``tok512.bin``): encoding and decoding.

    Args:
        path (`str` or `PathLike`): the tokenizer file.
        vocab_size (`int`, *optional*): the number of records; by default read records until the end of file.

    Example (with the shared models folder present)::

        tok = Llama2cTokenizer("stories260K/tok512.bin")
        ids = tok.encode("Once upon a time")      # [1, <" Once">, <" upon">, ...]
        tok.decode(ids) == "Once upon a time"
    """

    def __init__(self, path: str | os.PathLike[str], vocab_size: int | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"`path` must be an existing llama2.c tokenizer file, got {str(path)!r}")
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)):
            raise ValueError(f"`vocab_size` must be an int >= 1 or None, got {vocab_size!r}")
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"`vocab_size` must be an int >= 1 or None, got {vocab_size!r}")
        raw = path.read_bytes()
        (self.max_token_length,) = struct.unpack_from("<I", raw, 0)
        offset = 4
        self.pieces: list[bytes] = []
        self.scores: list[float] = []
        while offset < len(raw) and (vocab_size is None or len(self.pieces) < vocab_size):
            score, length = struct.unpack_from("<fI", raw, offset)
            offset += 8
            self.pieces.append(raw[offset : offset + length])
            self.scores.append(score)
            offset += length
        if vocab_size is not None and len(self.pieces) != vocab_size:
            raise ValueError(f"`path` {str(path)!r} holds {len(self.pieces)} records, not {vocab_size}")
        # The first occurrence wins when a string appears twice (llama2.c's sorted lookup has the same effect
        # for the strings that matter: byte pieces are written as "<0xNN>" and never collide with text).
        self._ids: dict[bytes, int] = {}
        for i, piece in enumerate(self.pieces):
            self._ids.setdefault(piece, i)

    @property
    def vocab_size(self) -> int:
        """Number of pieces."""
        return len(self.pieces)

    def encode_with_offsets(self, text: str, bos: bool = True) -> tuple[list[int], list[int]]:
        """Ids of ``text`` and, for each id, the offset in ``text`` of the first character it covers.

        The dummy-prefix space gets offset -1 before merging; a piece that starts with it (``" Once"``) is
        reported at offset 0, and BOS at -1.
        """
        if not isinstance(text, str):
            raise ValueError(f"`text` must be a str, got {type(text).__name__}")
        if not isinstance(bos, bool):
            raise ValueError(f"`bos` must be a bool, got {bos!r}")
        symbols: list[int] = []
        starts: list[int] = []
        if text:
            symbols.append(self._ids[b" "])
            starts.append(-1)
        for pos, char in enumerate(text):
            encoded = char.encode("utf-8")
            piece = self._ids.get(encoded)
            if piece is not None:
                symbols.append(piece)
                starts.append(pos)
            else:  # byte fallback: one id per UTF-8 byte
                for byte in encoded:
                    symbols.append(byte + _BYTE_OFFSET)
                    starts.append(pos)
        groups = self._merge(symbols)
        ids = [groups[i] for i in range(len(groups)) if groups[i] >= 0]
        offsets = [max(starts[i], 0) for i in range(len(groups)) if groups[i] >= 0]
        if bos:
            return [BOS_ID, *ids], [-1, *offsets]
        return ids, offsets

    def _merge(self, symbols: list[int]) -> list[int]:
        """SentencePiece-BPE merging of ``symbols`` (ids): best score first, leftmost pair on ties.

        Returns, per original index, the id of the merged group that starts there, or -1 where the symbol was
        merged into a group on its left (so offsets of the survivors are those of their first symbol).
        """
        n = len(symbols)
        ids = list(symbols)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        alive = [True] * n
        version = [0] * n  # bumped when a symbol changes, so stale heap entries are skipped
        heap: list[tuple[float, int, int, int, int]] = []

        def push(left: int) -> None:
            right = nxt[left]
            if right >= n:
                return
            merged = self._ids.get(self.pieces[ids[left]] + self.pieces[ids[right]])
            if merged is not None:
                # Symbols never move, so ordering ties by the left symbol's index is the leftmost rule.
                heapq.heappush(heap, (-self.scores[merged], left, version[left], version[right], merged))

        for i in range(n - 1):
            push(i)
        while heap:
            _, left, v_left, v_right, merged = heapq.heappop(heap)
            if not alive[left] or version[left] != v_left:
                continue
            right = nxt[left]
            if right >= n or not alive[right] or version[right] != v_right:
                continue
            ids[left] = merged
            version[left] += 1
            alive[right] = False
            nxt[left] = nxt[right]
            if nxt[right] < n:
                prev[nxt[right]] = left
            if prev[left] >= 0:
                push(prev[left])
            push(left)
        return [ids[i] if alive[i] else -1 for i in range(n)]

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Ids of ``text``, starting with BOS (1) unless ``bos=False``; exactly llama2.c's ``encode``."""
        return self.encode_with_offsets(text, bos)[0]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``: byte pieces become raw bytes, BOS/EOS are dropped, and the space that follows BOS
        (the dummy prefix) is removed, as llama2.c's ``decode`` does."""
        out = bytearray()
        previous = -1
        for token in ids:
            token = int(token)
            if not 0 <= token < len(self.pieces):
                raise ValueError(f"`ids` holds {token}, outside the vocabulary of size {len(self.pieces)}")
            if token in (BOS_ID, EOS_ID):
                previous = token
                continue
            if _BYTE_OFFSET <= token < _BYTE_OFFSET + 256:
                out.append(token - _BYTE_OFFSET)
            else:
                piece = self.pieces[token]
                if (previous == BOS_ID or previous == -1) and piece.startswith(b" "):
                    piece = piece[1:]
                out += piece
            previous = token
        return out.decode("utf-8", errors="replace")


# -- judge ----------------------------------------------------------------------------------------------------
@dataclass
class Judge:
    """A causal LM and its tokenizer, used to score texts (stories260K by default, see :func:`load_judge`).

    Attributes:
        model: the ``LlamaForCausalLM``.
        tokenizer: the :class:`Llama2cTokenizer`.
        window (`int`): tokens per forward pass, at most the judge's training context (512).
        stride (`int`): new tokens scored per window after the first; every scored token past the first window
            sees at least ``window - stride`` tokens of context.
    """

    model: Any
    tokenizer: Llama2cTokenizer
    window: int = 512
    stride: int = 256

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2:
            raise ValueError(f"`window` must be an int >= 2, got {self.window!r}")
        if isinstance(self.stride, bool) or not isinstance(self.stride, int):
            raise ValueError(f"`stride` must be an int in [1, window - 1], got {self.stride!r}")
        if not 1 <= self.stride < self.window:
            raise ValueError(f"`stride` must be an int in [1, window - 1], got {self.stride!r}")

    @torch.inference_mode()
    def token_nll(self, ids: Sequence[int]) -> torch.Tensor:
        """``-log p(ids[t] | ids[:t])`` in nats for t = 1 .. len(ids)-1 (float64, length ``len(ids) - 1``).

        Sequences longer than :attr:`window` are scored with a strided window: the first window scores its
        tokens 1..window-1; each next window is shifted by :attr:`stride` tokens and scores only the tokens not
        scored before (the last ``stride``), conditioned on the ``window - stride`` tokens before them. Each
        window restarts positions at 0, which is how the judge saw text in training.
        """
        tokens = torch.tensor([int(t) for t in ids], dtype=torch.long)
        n = tokens.numel()
        out = torch.empty(max(n - 1, 0), dtype=torch.float64)
        if n < 2:
            return out
        scored = 1  # next token index that still needs a score
        start = 0
        while scored < n:
            end = min(start + self.window, n)
            chunk = tokens[start:end][None]
            logits = self.model(input_ids=chunk).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            targets = chunk[0, 1:]
            nll = -logp.gather(-1, targets[:, None])[:, 0]  # nll[j] scores token start + j + 1
            first = scored - start - 1
            out[scored - 1 : end - 1] = nll[first:]
            scored = end
            if end == n:
                break
            start = end - (self.window - self.stride)
        return out

    def nll(self, text: str, start_char: int = 0) -> tuple[float, int]:
        """Total NLL (nats) of the characters ``text[start_char:]`` conditioned on all of ``text`` before them.

        Boundary rule: the text is tokenized whole by the judge's tokenizer; a judge token counts when the
        first character it covers is at or after ``start_char`` (a token straddling the boundary belongs to the
        part where it starts). BOS is never scored.

        Returns:
            `(float, int)`: total NLL in nats and the number of characters ``len(text) - start_char``.
        """
        if not isinstance(text, str):
            raise ValueError(f"`text` must be a str, got {type(text).__name__}")
        if isinstance(start_char, bool) or not isinstance(start_char, int) or not 0 <= start_char <= len(text):
            raise ValueError(f"`start_char` must be an int in [0, len(text)], got {start_char!r}")
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        nll = self.token_nll(ids)
        mask = torch.tensor([off >= start_char for off in offsets[1:]], dtype=torch.bool)
        return float(nll[mask].sum()) if mask.any() else 0.0, len(text) - start_char

    def bits_per_char(self, texts: Sequence[str], start_chars: Sequence[int] | None = None) -> float:
        """Pooled bits per character of ``texts`` (each from its ``start_chars`` entry on): total NLL / total
        characters, so long texts weigh more. ``nan`` when there are no characters to score."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise ValueError(f"`texts` must be a sequence of str, got {type(texts).__name__}")
        if start_chars is None:
            start_chars = [0] * len(texts)
        if isinstance(start_chars, str) or not isinstance(start_chars, Sequence):
            raise ValueError(f"`start_chars` must be a sequence of ints, got {type(start_chars).__name__}")
        if len(start_chars) != len(texts):
            raise ValueError(f"`start_chars` has {len(start_chars)} entries for {len(texts)} texts")
        total, chars = 0.0, 0
        for text, start in zip(texts, start_chars):
            nll, n = self.nll(text, start)
            total += nll
            chars += n
        return bits_per_character(total, chars) if chars else math.nan


_JUDGE_CACHE: dict[Path, Judge] = {}


def load_judge(models_dir: str | os.PathLike[str] | None = None) -> Judge:
    """The stories260K judge from ``models_dir/stories260K`` (default :func:`default_models_dir`), cached."""
    folder = (Path(models_dir) if models_dir is not None else default_models_dir()).resolve() / "stories260K"
    judge = _JUDGE_CACHE.get(folder)
    if judge is None:
        model = load_llama2c_model(folder / "stories260K.bin")
        tokenizer = Llama2cTokenizer(folder / "tok512.bin", vocab_size=model.config.vocab_size)
        judge = Judge(model, tokenizer, window=int(model.config.max_position_embeddings))
        _JUDGE_CACHE[folder] = judge
    return judge


def judge_bits_per_char(
    texts: Sequence[str],
    start_chars: Sequence[int] | None = None,
    models_dir: str | os.PathLike[str] | None = None,
) -> float:
    """Bits per character of ``texts`` under the stories260K judge (pooled; see :meth:`Judge.bits_per_char`).

    Args:
        texts (`Sequence[str]`): texts to score.
        start_chars (`Sequence[int]`, *optional*): per text, the character from which to score (the text before
            it is context only). Default: score whole texts.
        models_dir: the shared models folder (default :func:`default_models_dir`).
    """
    return load_judge(models_dir).bits_per_char(texts, start_chars)


@torch.inference_mode()
def greedy(judge: Judge, prompt: str, max_new_tokens: int = 60) -> str:
    """Greedy continuation of ``prompt`` under the judge, decoded (stops at BOS, llama2.c's story end)."""
    ids = torch.tensor([judge.tokenizer.encode(prompt)])
    out = judge.model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=BOS_ID, pad_token_id=0)
    return judge.tokenizer.decode(out[0].tolist())


if __name__ == "__main__":
    print(greedy(load_judge(), "Once upon a time", max_new_tokens=100))
