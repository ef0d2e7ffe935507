"""The rules that come with the library, fed one token at a time as the rewind policy feeds them: EOSRule,
PhraseRule (ending and ban modes) and LoopRule. No model: a word-level tokenizer spells the text."""

from __future__ import annotations

import pytest
from support import tiny_tokenizer

from perpetual_logits import LoopDetection, RewindRule, RewindTo, RowView
from perpetual_logits.backstep.rules import EOSRule, LoopRule, PhraseRule
from perpetual_logits.text.matcher import PhraseMatcher

EOS = 2
PROMPT = [1, 30]  # "<s> w0"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def ids(tokenizer, words: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(words.split())


def feed(rule: RewindRule, row_ids: list[int], row: int = 0, start: int = len(PROMPT)) -> list[tuple[int, RewindTo]]:
    """Show the rule the row after each new token from index ``start``; return (index, rewind) of each request."""
    found = []
    for end in range(start + 1, len(row_ids) + 1):
        rewind = rule.check(RowView(row, row_ids[:end], len(PROMPT), 0))
        if rewind is not None:
            found.append((end - 1, rewind))
    return found


@pytest.mark.parametrize("rule_type", [EOSRule, PhraseRule, LoopRule])
def test_every_rule_is_a_rewind_rule(rule_type):
    assert issubclass(rule_type, RewindRule)


def test_eos_rule_cuts_n_remove_before_the_eos_and_bans_eos_there():
    rule = EOSRule(eos=[EOS, 7], n_remove=2)
    rule.start(batch_size=2, prompt_length=2)
    rule.ban_rows[1] = True
    row = [*PROMPT, 31, 32, 33, EOS]
    assert feed(rule, row[:-1]) == []
    ((at, rewind),) = feed(rule, row, start=len(row) - 1)
    assert at == 5
    assert rewind == RewindTo(position=3, ban_here=(EOS, 7), ban_first_removed=False, reason="eos")
    ((_, other),) = feed(rule, row, row=1, start=len(row) - 1)
    assert other.ban_first_removed  # per row


def test_phrase_rule_ban_mode_rewinds_to_where_the_phrase_began(tokenizer):
    rule = PhraseRule(PhraseMatcher(["w5 w6"], tokenizer), mode="ban", n_remove=3, max_rewinds=5, eos=[EOS])
    rule.start(batch_size=1, prompt_length=len(PROMPT))
    row = PROMPT + ids(tokenizer, "w1 w5 w6 w2")
    found = feed(rule, row)
    # "w5 w6" is confirmed once the character after it is known (a word boundary), i.e. at "w2"
    assert found == [(5, RewindTo(position=3, ban_first_removed=True, reason="phrase", detail="w5 w6"))]


def test_phrase_rule_holds_back_a_phrase_that_may_complete(tokenizer):
    rule = PhraseRule(PhraseMatcher(["w5 w6"], tokenizer), mode="ending", n_remove=1, max_rewinds=5, eos=[EOS])
    rule.start(batch_size=1, prompt_length=len(PROMPT))
    row = PROMPT + ids(tokenizer, "w1 w2 w5")
    feed(rule, row)
    assert rule.held(0) == 1 + 1  # "w5" may begin the phrase, and an ending rewinds n_remove more
    feed(rule, row + ids(tokenizer, "w3"), start=len(row))
    assert rule.held(0) == 0  # "w5 w3": no phrase can complete any more


def test_phrase_rule_ending_mode_rewinds_n_remove_before_and_bans_the_first_token(tokenizer):
    rule = PhraseRule(PhraseMatcher(["w5 w6"], tokenizer), mode="ending", n_remove=1, max_rewinds=1, eos=[EOS])
    rule.start(batch_size=1, prompt_length=len(PROMPT))
    row = PROMPT + ids(tokenizer, "w1 w2 w5 w6 w3")
    ((_, rewind),) = feed(rule, row)
    w5 = row[4]
    assert rewind == RewindTo(position=3, bans={4: (w5,)}, ban_here=(EOS,), reason="ending", detail="w5 w6")
    # after the rewind the row writes the phrase again: its one rewind is spent, so the phrase is kept
    rule.rewind(0, rewind.position)
    assert feed(rule, row, start=rewind.position) == []


def test_phrase_rule_after_a_rewind_sees_only_the_new_text(tokenizer):
    rule = PhraseRule(PhraseMatcher(["w5 w6"], tokenizer), mode="ban", n_remove=0, max_rewinds=5, eos=[EOS])
    rule.start(batch_size=1, prompt_length=len(PROMPT))
    row = PROMPT + ids(tokenizer, "w1 w5")
    feed(rule, row)
    rule.rewind(0, 3)  # "w5" is gone
    rewritten = row[:3] + ids(tokenizer, "w6 w2")  # "w1 w6 w2": the phrase never stands in the text
    assert feed(rule, rewritten, start=3) == []


def test_loop_rule_rewinds_to_where_the_repeat_began():
    rule = LoopRule(LoopDetection(min_span=2, max_span=4, min_repeats=3, min_loop_tokens=6, line_repeats=0), None)
    rule.start(batch_size=1, prompt_length=len(PROMPT))
    row = [*PROMPT, 40, 41, 42, 41, 42, 41, 42]  # "41 42" three times from index 3
    ((at, rewind),) = feed(rule, row)
    assert at == len(row) - 1
    assert rewind.position == 5 and rewind.reason == "loop" and rewind.ban_first_removed  # one copy stays
    assert rewind.detail is not None and "span 2" in rewind.detail


def test_loop_rule_spends_its_budget_then_keeps_loops():
    rule = LoopRule(
        LoopDetection(min_span=1, max_span=4, min_repeats=3, min_loop_tokens=3, line_repeats=0, max_rewinds=1), None
    )
    rule.start(batch_size=1, prompt_length=len(PROMPT))
    row = [*PROMPT, 40, 40, 40]
    ((_, rewind),) = feed(rule, row)
    rule.rewind(0, rewind.position)
    assert feed(rule, row, start=rewind.position) == []
