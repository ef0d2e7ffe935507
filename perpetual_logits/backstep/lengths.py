"""Processors judged by each row's own length and tokens.

Inside a backstep batch the rows have different lengths: a rewound row is shorter than its neighbours.
Processors receive the rows left-padded to the longest (``generate()``'s own layout), so a processor that reads
``input_ids.shape[-1]`` would judge every row by the longest one, and one that reads the tokens would count a
shorter row's padding as text it wrote (a repetition penalty would penalise the pad id). Each processor listed
here is therefore run per group of rows of equal length, on exactly those rows' tokens -- what it would see if
that row ran alone (with its own prompt padding).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation import logits_process as lp

from ..dry import DRYLogitsProcessor

__all__ = ["LENGTH_DEPENDENT", "NOT_APPLICABLE", "READS_TOKENS", "RowLengths", "per_row_lengths"]

# Processors transformers builds from a generation config whose result depends on the sequence length
# (they read input_ids.shape[-1] or a current length; n-gram bans also must not span a shorter row's padding).
LENGTH_DEPENDENT: tuple[type, ...] = (
    lp.MinLengthLogitsProcessor,
    lp.MinNewTokensLengthLogitsProcessor,
    lp.ExponentialDecayLengthPenalty,
    lp.ForcedEOSTokenLogitsProcessor,
    lp.ForcedBOSTokenLogitsProcessor,
    lp.SuppressTokensAtBeginLogitsProcessor,
    lp.NoRepeatNGramLogitsProcessor,
)

# Processors that read the tokens themselves: the padding before a shorter row is not its text (the penalty
# would count the pad id as written, a sequence or a repeat could match across it, a last-n window would hold
# fewer real tokens).
READS_TOKENS: tuple[type, ...] = (
    lp.RepetitionPenaltyLogitsProcessor,
    lp.SequenceBiasLogitsProcessor,
    lp.NoBadWordsLogitsProcessor,
    DRYLogitsProcessor,
)

# Length-reading processors that never take part in a decoder-only sampling/greedy run (encoder-decoder,
# beam search, model-specific), or whose row index matters (a per-row sub-batch would renumber rows).
NOT_APPLICABLE: tuple[type, ...] = (
    lp.EncoderNoRepeatNGramLogitsProcessor,
    lp.EncoderRepetitionPenaltyLogitsProcessor,
    lp.WhisperTimeStampLogitsProcessor,
    lp.BarkEosPrioritizerLogitsProcessor,
    lp.PrefixConstrainedLogitsProcessor,
    lp.ClassifierFreeGuidanceLogitsProcessor,
    lp.UnbatchedClassifierFreeGuidanceLogitsProcessor,
    lp.AlternatingCodebooksLogitsProcessor,
    lp.SynthIDTextWatermarkLogitsProcessor,
    lp.WatermarkLogitsProcessor,
    lp.WhisperNoSpeechDetection,
    lp.DiaClassifierFreeGuidanceLogitsProcessor,
    lp.DiaEOSChannelFilterLogitsProcessor,
    lp.DiaEOSDelayPatternLogitsProcessor,
)


class RowLengths(LogitsProcessor):
    """Runs ``inner`` once per group of rows that have the same length, on their unpadded-to-the-longest tokens.

    Args:
        inner: the transformers processor.
        lengths: returns each row's current length (prompt included).
    """

    def __init__(self, inner: LogitsProcessor, lengths: Callable[[], list[int]]) -> None:
        self.inner = inner
        self.lengths = lengths

    def __repr__(self) -> str:
        return f"RowLengths({self.inner!r})"

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        lens = self.lengths()
        if len(set(lens)) == 1:
            return self.inner(input_ids, scores)
        out = scores.clone()
        # transformers' repetition penalty skips each row's prompt padding, counted per batch row.
        ignore = getattr(self.inner, "prompt_ignore_length", None)
        per_row_ignore = isinstance(ignore, torch.Tensor) and ignore.dim() == 1 and ignore.shape[0] == len(lens)
        try:
            for length in sorted(set(lens)):
                rows = torch.tensor([b for b, n in enumerate(lens) if n == length], device=scores.device)
                ids = input_ids[rows, input_ids.shape[-1] - length :]
                if per_row_ignore:
                    self.inner.prompt_ignore_length = ignore.to(rows.device)[rows]  # type: ignore[attr-defined,union-attr]
                out[rows] = self.inner(ids, scores[rows])
        finally:
            if per_row_ignore:
                self.inner.prompt_ignore_length = ignore  # type: ignore[attr-defined]
        return out  # type: ignore[return-value]


def per_row_lengths(processors: LogitsProcessorList, lengths: Callable[[], list[int]]) -> LogitsProcessorList:
    """A new list where every length-dependent or token-reading processor is wrapped in :class:`RowLengths`."""
    return LogitsProcessorList(
        # exact types only: a subclass may keep per-row state that a sub-batch would renumber
        [RowLengths(p, lengths) if type(p) in LENGTH_DEPENDENT + READS_TOKENS else p for p in processors]
    )
