"""Chat end phrases: every listed closing and end token is caught, in its case and punctuation variants, and
nothing in SmolLM2-135M-Instruct's own natural answers or in ordinary mid-answer prose is."""

from __future__ import annotations

import json

import pytest
from support import DATA, tiny_tokenizer

from perpetual_logits.text.endings import (
    CHAT_CLOSING_PHRASES,
    CHAT_END_TOKENS,
    CHAT_TURN_MARKERS,
    ENDING_PHRASES,
    default_end_phrases,
)
from perpetual_logits.text.matcher import PhraseMatcher

NATURAL = json.loads((DATA / "smollm2_natural_answers.json").read_text())["answers"]


def closings(text: str) -> list[str]:
    return [m.group() for p in CHAT_CLOSING_PHRASES for m in p.finditer(text)]


@pytest.mark.parametrize(
    "text",
    [
        "...and that is all.\n\nIn conclusion, rainbows are light.",
        "It is simple. In summary: light bends.",
        "It bends. To summarize, light bends.",
        "Light bends.\nTo sum up, it is pretty.",
        "Done.\n\n## Conclusion\nLight bends.",
        "Done.\n\n**Conclusion:**\nLight bends.",
        "Done.\n**In conclusion**, light bends.",
        "Let me know if you have any other questions!",
        "let me know if you need more help.",
        "Let me know if there's anything else I can do.",
        "Feel free to ask if you want more.",
        "Please don't hesitate to reach out.",
        "Do not hesitate to contact me.",
        "Is there anything else I can help you with?",
        "If you have any further questions, ask.",
        "I hope this helps!",
        "Hope that helped.",
        "I HOPE THIS HELPS",
        "I hope my explanation was helpful.",
        "Glad I could help!",
        "I'm glad I was able to help.",
        "Thank you for reading.",
        "Thanks for asking!",
        "Best regards,\nSmolLM",
        "Kind  regards",
        "Happy learning!",
    ],
)
def test_closings_are_caught_in_their_variants(text):
    assert closings(text), text


@pytest.mark.parametrize(
    "text",
    [
        "Finally, the light reflects back to your eye.",
        "Overall, the process takes minutes.",
        "Remember, the key is to have fun.",
        "In short, light bends.",
        "Good luck with your studies.",
        "I'd be happy to help you with that!",
        "Scientists drew conclusions in summary form.",  # not at the start of a sentence
        "Don't jump to conclusions.",
        "The summary of the book is short.",
        "She hoped this would work.",
        "Let me know your name.",
        "If you have any doubts, measure twice.",
        "He writes code; happy coding sessions are rare.",
    ],
)
def test_ordinary_prose_is_not_a_closing(text):
    assert closings(text) == [], text


@pytest.mark.parametrize("answer", NATURAL, ids=lambda a: a["prompt"])
def test_smollm2_natural_answers_hold_no_ending(answer):
    # Recorded answers of the model itself (tests/data): none of them wraps up with a listed phrase, and
    # none contains a chat end token as text, so a chat preset would never rewind inside them.
    text = answer["answer"]
    assert closings(text) == []
    assert not [t for t in CHAT_END_TOKENS if t in text]
    assert not [p for p in ENDING_PHRASES if p in text]


def test_default_end_phrases_for_chat():
    tok = tiny_tokenizer()
    plain = default_end_phrases(tok)
    chat = default_end_phrases(tok, chat=True)
    assert all(isinstance(p, str) for p in plain)
    assert set(CHAT_END_TOKENS) <= {p for p in chat if isinstance(p, str)}
    assert set(CHAT_TURN_MARKERS) <= set(chat)
    assert chat[-len(CHAT_CLOSING_PHRASES) :] == list(CHAT_CLOSING_PHRASES)
    assert default_end_phrases(tok, ending_phrases=False, chat=True)[-1] == CHAT_END_TOKENS[-1]
    assert len(chat) == len(set(map(str, chat)))  # no duplicates
    with pytest.raises(ValueError, match="`chat`"):
        default_end_phrases(tok, chat="yes")  # type: ignore[arg-type]


def test_phrase_matcher_takes_the_chat_set():
    tok = tiny_tokenizer()
    matcher = PhraseMatcher(default_end_phrases(tok, chat=True), tok)
    # The word-level test tokenizer spells "<|im_end|>" as unknown pieces, so use closings it can write.
    ids = tok("a b c", add_special_tokens=False).input_ids
    assert matcher.scan(ids, new_tokens=None).match is None
