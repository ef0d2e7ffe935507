"""The ending catalogue: the texts a model writes to end, as strings and patterns for :class:`PhraseMatcher`.

:data:`ENDING_PHRASES` are story endings ("The End"), :data:`KNOWN_END_MARKERS` the end-of-text markers models
spell as ordinary text, :data:`CHAT_TURN_MARKERS` / :data:`CHAT_END_TOKENS` a chat template's end-of-turn texts and
:data:`CHAT_CLOSING_PHRASES` an assistant's closing lines. :func:`default_end_phrases` builds the default set of
one tokenizer from them. Matching them in decoded text is :mod:`perpetual_logits.text.matcher`'s job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import regex  # a dependency of transformers; `PhraseMatcher` takes its patterns
import torch

from .. import _validation

__all__ = [
    "CHAT_CLOSING_PHRASES",
    "CHAT_END_TOKENS",
    "CHAT_TURN_MARKERS",
    "ENDING_PHRASES",
    "KNOWN_END_MARKERS",
    "default_end_phrases",
]

ENDING_PHRASES: tuple[str, ...] = (
    "The End",
    "THE END",
    "The end.",
    "The end!",
    "End of story.",
    "END OF STORY",
    "To be continued",
    "TO BE CONTINUED",
    "In conclusion,",
    "In Conclusion,",
)
"""Common phrases with which models close a text when they cannot emit EOS (the blog saw "The End").

Matched case-sensitively, with word boundaries and flexible whitespace (see the module notes). Each entry is
chosen so that ordinary prose rarely contains it: "The End" with a capital E, but lower-case "the end" only
as the sentence "The end." or "The end!", never "the end of the day". Extend or replace it freely::

    phrases = default_end_phrases(tokenizer, ending_phrases=False) + ["The end", "Fin."]
"""

KNOWN_END_MARKERS: tuple[str, ...] = (
    "</s>",
    "<eos>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<end_of_utterance>",
    "<|return|>",
    "<|end_story|>",
    "[EOS]",
)
"""Texts of special tokens that end generation in well-known model families (Llama, Qwen, Gemma, GPT-2,
Phi, gpt-oss, TinyStories, ...). :func:`default_end_phrases` bans those that are special tokens of the
tokenizer at hand, in addition to the tokenizer's own EOS token."""


CHAT_TURN_MARKERS: tuple[str, ...] = (
    "<|im_start|>",
    "<start_of_turn>",
    "<|start_header_id|>",
    "<|start|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "[INST]",
    "[/INST]",
)
"""Texts of special tokens that *open* a turn in well-known chat templates (ChatML, Gemma, Llama 3, gpt-oss,
Phi-3/Zephyr, Mistral). An assistant that writes one has ended its own turn and is inventing the next, so
for a chat model they are endings just like the end-of-turn tokens."""

CHAT_END_TOKENS: tuple[str, ...] = (*(m for m in KNOWN_END_MARKERS if m != "<|end_story|>"), *CHAT_TURN_MARKERS)
"""Every chat end-of-turn and turn-opening token text that :func:`default_end_phrases` bans with
``chat=True``, whether or not the tokenizer at hand has it: a small chat model trained on other families'
transcripts spells ``<|eot_id|>`` or ``</s>`` out as text. (``<|end_story|>`` is left out: it is a
TinyStories marker, not a chat one.) These strings do not occur in ordinary prose; the one exception worth
knowing is ``</s>``, an HTML strikethrough tag, which an answer about HTML may legitimately contain."""


def _closing(pattern: str) -> regex.Pattern[str]:
    # Case-insensitive; `\s+` between words matches any whitespace run. (?<!\w) / (?!\w) keep a phrase
    # from matching inside a longer word.
    return regex.compile(r"(?i)(?<!\w)" + pattern.replace(" ", r"\s+") + r"(?!\w)")


# A conclusion opener counts only at the start of a sentence, a line or a Markdown heading/bold run: "the
# data in summary form" or "jump to conclusions" is prose, "...  In summary, ..." is a wrap-up. (Written
# without an optional group inside the lookbehind: with one, the regex module reports partial matches that
# no text can complete -- "to run" for "to sum up" -- and the streaming hold-back would keep them.)
_SENTENCE_START = r"(?<=(?:[.!?:]|\n|\n\s*#+|\n\s*\*\*)\s*|\*\*)"

CHAT_CLOSING_PHRASES: tuple[regex.Pattern[str], ...] = (
    # Conclusions: the model announces that the answer is ending.
    regex.compile(r"(?i)" + _SENTENCE_START + r"(?:in conclusion|in summary|to summarize|to sum up|in closing)(?!\w)"),
    regex.compile(
        r"(?i)(?<=(?:\n|\n\s*#+|\n\s*\*\*)\s*)(?:conclusion|summary|final thoughts)(?:\*\*)?:?(?:\*\*)?[ \t]*\n"
    ),
    # Offers of further help.
    _closing(r"let me know if (?:you (?:have|need|want|would like)|there(?:'s| is) anything)"),
    _closing(r"(?:please )?(?:feel free|don't hesitate|do not hesitate) to (?:ask|reach out|contact|let me know)"),
    _closing(r"is there anything else (?:i can|you(?:'d| would) like)"),
    _closing(r"if you have any (?:other |more |further |additional )?questions"),
    # Hopes that it helped.
    _closing(
        r"(?:i )?hope (?:this|that|it|my (?:answer|explanation|response)) (?:helps|helped|was helpful|is helpful)"
    ),
    _closing(r"(?:i(?:'m| am) )?glad (?:i|to) (?:could|can|was able to) help"),
    _closing(r"thank you for (?:reading|asking|your question)"),
    _closing(r"thanks for (?:reading|asking)"),
    # Sign-offs.
    _closing(r"(?:best|kind|warm|warmest) regards"),
    _closing(r"happy (?:learning|writing|reading|coding|cooking|exploring|studying)!"),
)
"""Phrases with which chat assistants wrap up an answer, as case-insensitive regular expressions
(``regex`` patterns, accepted by :class:`PhraseMatcher` like strings), in four groups:

* **conclusions** — "In conclusion", "In summary", "To summarize", "To sum up", "In closing", only at the
  start of a sentence, line, heading or bold run; and a heading or bold line "Conclusion" / "Summary" /
  "Final thoughts" on its own line;
* **offers of further help** — "Let me know if you have/need ...", "Let me know if there's anything",
  "Feel free to ask / reach out", "Don't hesitate to ...", "Is there anything else I can ...",
  "If you have any (other) questions";
* **hopes that it helped** — "I hope this helps", "Hope that helped", "I hope my explanation was helpful",
  "Glad I could help", "Thank you for reading/asking", "Thanks for reading";
* **sign-offs** — "Best/Kind/Warm regards", "Happy learning!" (and writing, coding, ...).

Deliberately *not* listed, because assistants use them mid-answer (checked on SmolLM2-135M-Instruct's own
answers, ``tests/text/test_chat_phrases.py``): "Finally,", "Overall,", "Remember,", "In short", "Good luck", "I'd
be happy to help" (an opening), "Sincerely," (the natural end of a letter the user asked for).
"""


class Decoder(Protocol):
    def decode(self, token_ids: Any, *args: Any, **kwargs: Any) -> str: ...


def default_end_phrases(
    tokenizer: Any,
    eos_token_id: int | Sequence[int] | torch.Tensor | None = None,
    ending_phrases: bool = True,
    chat: bool = False,
) -> list[str | regex.Pattern[str]]:
    r"""The default banned phrases of a tokenizer: its end markers' text, then :data:`ENDING_PHRASES`.

    The end markers are, in this order and without duplicates:

    1. the text of ``tokenizer.eos_token`` and of every id in ``eos_token_id`` (pass
       ``model.generation_config.eos_token_id``, which may list several ids, e.g. Llama 3's ``<|eot_id|>``);
    2. every special token of the tokenizer whose text is in :data:`KNOWN_END_MARKERS` (``</s>``,
       ``<|eot_id|>``, ``<|im_end|>``, ``<|end_story|>``, ...), even if the model does not list it as EOS.

    Only *special* (added) tokens count: an EOS id that is an ordinary vocabulary piece (a newline, a period)
    is left out, because banning its text would ban ordinary prose. Texts shorter than two characters or
    made of whitespace are left out for the same reason. Other special tokens (BOS, ``<unk>``,
    ``<|start_header_id|>``, ``</think>``) are never included: they do not end generation.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer.
        eos_token_id (`int` or `list[int]`, *optional*): further ids that end generation.
        ending_phrases (`bool`, defaults to `True`): append :data:`ENDING_PHRASES`.
        chat (`bool`, defaults to `False`): for a chat model: also every text in :data:`CHAT_END_TOKENS`
            (end-of-turn and turn-opening tokens of all well-known templates, spelled out, and the
            tokenizer's own special tokens among them) and, with ``ending_phrases``, the regular expressions
            of :data:`CHAT_CLOSING_PHRASES`.

    Returns:
        `list[str | regex.Pattern]`: the phrases, ready for :class:`PhraseMatcher` (strings only unless
        ``chat=True``).

    Example:

    ```python
    >>> from tokenizers import Tokenizer, models
    >>> from transformers import PreTrainedTokenizerFast
    >>> vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_end|>": 3, "hello": 4}
    >>> tok = PreTrainedTokenizerFast(
    ...     tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
    ...     bos_token="<s>", eos_token="</s>", unk_token="<unk>", additional_special_tokens=["<|im_end|>"])
    >>> default_end_phrases(tok, ending_phrases=False)
    ['</s>', '<|im_end|>']
    >>> default_end_phrases(tok)[2:4]
    ['The End', 'THE END']
    >>> chat = default_end_phrases(tok, chat=True)
    >>> "<|eot_id|>" in chat and "<end_of_turn>" in chat and "<|im_start|>" in chat
    True
    >>> closings = [p for p in chat if not isinstance(p, str)]
    >>> [bool(p.search("Hope this helps! Let me know if you need more.")) for p in closings].count(True)
    2

    ```
    """
    if not callable(getattr(tokenizer, "convert_ids_to_tokens", None)):
        raise ValueError(
            f"`tokenizer` must be a transformers tokenizer (with convert_ids_to_tokens), got {type(tokenizer).__name__}"
        )
    if not isinstance(ending_phrases, bool):
        raise ValueError(f"`ending_phrases` must be a bool, got {ending_phrases!r}")
    if not isinstance(chat, bool):
        raise ValueError(f"`chat` must be a bool, got {chat!r}")
    ids: list[int] = []
    own = getattr(tokenizer, "eos_token_id", None)
    if isinstance(own, int) and not isinstance(own, bool):
        ids.append(own)
    if eos_token_id is not None:
        ids.extend(_validation.eos_ids(eos_token_id))

    added: dict[int, Any] = dict(getattr(tokenizer, "added_tokens_decoder", None) or {})
    special_ids = {int(i) for i in getattr(tokenizer, "all_special_ids", None) or []}
    special_ids.update(i for i, token in added.items() if getattr(token, "special", False))

    found: list[str] = []

    def keep(text: object) -> None:
        if isinstance(text, str) and len(text.strip()) >= 2 and text not in found:
            found.append(text)

    eos_text = getattr(tokenizer, "eos_token", None)
    if eos_text is not None:
        keep(str(eos_text))
    for token_id in ids:
        if token_id in special_ids or token_id in added:
            keep(tokenizer.convert_ids_to_tokens(token_id))
    known = KNOWN_END_MARKERS + (CHAT_TURN_MARKERS if chat else ())
    for token_id in sorted(special_ids | set(added)):
        text = tokenizer.convert_ids_to_tokens(token_id)
        if text in known:
            keep(text)
    if chat:
        for text in CHAT_END_TOKENS:
            keep(text)
    result: list[str | regex.Pattern[str]] = list(found)
    if ending_phrases:
        result.extend(p for p in ENDING_PHRASES if p not in found)
        if chat:
            result.extend(CHAT_CLOSING_PHRASES)
    return result
