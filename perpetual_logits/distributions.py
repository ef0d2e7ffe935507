"""The per-step distribution maths shared by the processors, the analysis and the triggers: EOS probability,
EOS masking, and the entropy statistics of ``softmax(scores)``. A leaf module: it imports nothing of the package,
so processors -> triggers -> analysis never loops back.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "check_distribution",
    "distribution_stats",
    "eos_on_top",
    "eos_probability",
    "in_bits",
    "mask_eos",
    "mask_eos_",
    "may_hold_lone_eos",
    "raw_stats",
    "restore_lone_eos",
]

LN2 = math.log(2.0)


def eos_probability(scores: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Per-row probability of the EOS set under ``softmax(scores)``, in float32. Shape (batch,)."""
    # One fused softmax is the cheapest form per step (measured against logsumexp differences).
    return torch.softmax(scores.float(), dim=-1).index_select(-1, eos).sum(-1).nan_to_num(0.0)


def eos_on_top(scores: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Per row, whether an EOS id has the highest score (a tie with the best token counts). Shape (batch,)."""
    return scores.index_select(-1, eos).amax(-1) >= scores.amax(-1)


def mask_eos(scores: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Return a copy of ``scores`` with the EOS ids at -inf, except in rows where nothing else is finite.

    A row whose only finite scores are EOS ids (another processor banned everything else, e.g. a forced
    EOS at ``max_length``) is returned unchanged: masking it would leave no token to sample (NaN).
    """
    return mask_eos_(scores.clone(), eos)


def mask_eos_(scores: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """:func:`mask_eos` in place, on a tensor the caller owns (saves a copy per step)."""
    eos_scores = scores.index_select(-1, eos)
    scores.index_fill_(-1, eos, float("-inf"))
    return restore_lone_eos(scores, eos, eos_scores, scores.amax(-1, keepdim=True))


def may_hold_lone_eos(masked: torch.Tensor) -> bool:
    """Whether a row of ``masked`` (EOS ids already at -inf) may have no finite score left, so that
    :func:`restore_lone_eos` must run. On the CPU a value read back costs nothing, so the answer is exact and the
    common case skips the restoring kernels; on an accelerator reading it would be a host synchronisation, so
    the answer is always ``True`` (restore without looking)."""
    if masked.device.type != "cpu":
        return True
    best = masked.max() if masked.shape[0] == 1 else masked.amax(-1).min()
    return not bool(best > float("-inf"))  # NaN also takes the careful path


def restore_lone_eos(
    masked: torch.Tensor, eos: torch.Tensor, eos_scores: torch.Tensor, best_other: torch.Tensor
) -> torch.Tensor:
    """Put the EOS scores back in rows where nothing else is finite (``best_other`` is -inf there).

    Works over the EOS columns only, never the vocabulary, and without a host synchronisation.
    """
    return masked.index_copy_(-1, eos, eos_scores.masked_fill(best_other > float("-inf"), float("-inf")))


def distribution_stats(scores: torch.Tensor, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four statistics of ``softmax(scores)`` per row, as float32 tensors of shape (batch,), in bits.

    Rows must have at least one finite score and no NaN or +inf (checked by the public callers).
    """
    return in_bits(raw_stats(scores, token_ids))


def in_bits(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The four statistics from :func:`raw_stats`' log P(set), entropy and varentropy in nats."""
    log_set = raw["log_set"]
    return {
        "eos_prob": log_set.exp(),
        "info": -log_set / LN2,  # +inf when every id of the set is at -inf
        "entropy": (raw["entropy"] / LN2).clamp_min(0.0),
        "varentropy": (raw["varentropy"] / LN2**2).clamp_min(0.0),
    }


def check_distribution(scores: torch.Tensor, name: str) -> None:
    if torch.isnan(scores).any() or torch.isposinf(scores).any():
        raise ValueError(f"`{name}` must not contain NaN or +inf (they do not define a distribution)")
    if not torch.isfinite(scores).any(-1).all():
        raise ValueError(f"`{name}` has a row with no finite score (every token at -inf): not a distribution")


def raw_stats(scores: torch.Tensor, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`distribution_stats` before its conversions: log P(set), entropy and varentropy in nats."""
    logp = torch.log_softmax(scores.float(), dim=-1)
    p = logp.exp()
    # 0 · log 0 = 0: a token with p = 0 (at -inf, or so far below the rest that exp() underflows) must add
    # nothing. Every token with p > 0 has log p > -104 in float32, so flooring log p at -1e4 changes none of
    # them, and keeps 0 · (log p)² finite for the rest (a score like -1e30 would otherwise give 0 · inf = NaN).
    safe_logp = logp.clamp_min(-1e4)
    entropy = -(p * safe_logp).sum(-1)
    # Varentropy as Σ p (log p + H)^2 rather than E[(log p)^2] - H^2: no cancellation, so it stays >= 0.
    varentropy = (p * (safe_logp + entropy[:, None]).square()).sum(-1)
    return {
        # log P(set) from the log-probabilities, so that tiny probabilities keep an exact information content.
        "log_set": torch.logsumexp(logp.index_select(-1, token_ids), dim=-1),
        "entropy": entropy,
        "varentropy": varentropy,
    }
