"""The rewind policy on its own (scripted token streams, a tiny word-level tokenizer, no model), then the HF loop's
use of it: event meanings, the forward-count formula for every kind of rewind, and the edges of user rules."""

from __future__ import annotations

import gc
import json
import statistics
import threading

import pytest
import torch
from support import deadline, tiny_tokenizer
from test_ending_control import DOT, SPELLED_END, THEY_WERE_HAPPY, run_script

from perpetual_logits import BackstepConfig, LoopDetection, RewindRule, RewindTo, make_perpetual
from perpetual_logits.backstep.policy import RewindPlan, RewindPolicy
from perpetual_logits.backstep.rules import PhraseRule
from perpetual_logits.protocol import RowView

VOCAB = 64
EOS = 2
A, B, C, D, E, X, Y, Z = 4, 5, 6, 7, 8, 27, 28, 29  # "a" ... "e", "x", "y", "z" in tiny_tokenizer()
PROMPT = [1, 9, 10]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def feed(policy: RewindPolicy, ids: list[int], tokens: list[int], row: int = 0, prompt: int = len(PROMPT)):
    """Append ``tokens`` one by one to ``ids`` (in place) and ask the policy; stop at the first non-keep."""
    for token in tokens:
        ids.append(token)
        decision = policy.after_token(RowView(row, ids, prompt, 0))
        if decision != "keep":
            return decision
    return "keep"


def cut(policy: RewindPolicy, ids: list[int], plan: RewindPlan, step: int = 0):
    """What a backend does with a plan: cut its tokens and let the policy apply it."""
    del ids[plan.position :]
    return policy.apply(plan, step, eos_prob=float("nan"))


class At(RewindRule):
    """Asks for a rewind to ``position(view)`` whenever the new token is ``token``."""

    reason = "at"

    def __init__(self, token: int, position=lambda view: len(view.ids) - 2, **rewind) -> None:
        self.token, self.position, self.rewind_args = token, position, rewind

    def check(self, view: RowView) -> RewindTo | None:
        if view.ids[-1] != self.token:
            return None
        return RewindTo(position=self.position(view), reason=self.reason, **self.rewind_args)


# -- the policy alone ------------------------------------------------------------------------------------------
def test_eos_rewinds_within_its_budget_then_is_suppressed_or_ends_the_row() -> None:
    for on_exhausted in ("suppress", "stop"):
        policy = RewindPolicy(BackstepConfig(n_remove=3, max_backsteps=2, on_exhausted=on_exhausted), [EOS], VOCAB)
        policy.start(1, len(PROMPT))
        ids = list(PROMPT)
        plan = feed(policy, ids, [A, B, C, D, EOS])
        assert isinstance(plan, RewindPlan)
        # Seven tokens: cut 3 before the EOS; the EOS itself is refused, not counted as removed.
        assert (plan.position, plan.removed, plan.reason, plan.banned_token) == (4, 3, "eos", None)
        assert plan.bans == {4: frozenset({EOS})} and plan.restart_schedule
        event = cut(policy, ids, plan, step=4)
        assert (event.position, event.removed, event.step) == (1, 3, 4)
        assert isinstance(feed(policy, ids, [E, EOS]), RewindPlan)  # the second and last rewind of the budget
        assert policy.eos_suppressed(0) == (on_exhausted == "suppress")
        assert feed(policy, ids, [EOS]) == "finish"  # budget spent: an EOS that gets through ends the row


def test_greedy_rows_ban_the_rewound_token_by_default_sampled_rows_do_not() -> None:
    policy = RewindPolicy(BackstepConfig(n_remove=2), [EOS], VOCAB)
    policy.start_rows([3, 2], greedy=[True, False])
    first = feed(policy, [1, 9, 10], [A, B, C, EOS], row=0, prompt=3)
    second = feed(policy, [1, 9], [A, B, C, EOS], row=1, prompt=2)
    assert isinstance(first, RewindPlan) and isinstance(second, RewindPlan)
    assert (first.position, first.banned_token, first.bans) == (4, B, {4: frozenset({EOS, B})})
    assert (second.position, second.banned_token) == (3, None)
    forced = RewindPolicy(BackstepConfig(n_remove=2, ban_rewound_token=True), [EOS], VOCAB)
    forced.start_rows([3], greedy=[False])
    assert feed(forced, [1, 9, 10], [A, B, C, EOS]).banned_token == B  # type: ignore[union-attr]


def test_a_rewind_never_reaches_into_the_prompt_or_final_tokens() -> None:
    config = BackstepConfig(n_remove=4, hold_back=4, rules=[At(Z, position=lambda view: 0)])
    policy = RewindPolicy(config, [EOS], VOCAB)
    policy.start(1, len(PROMPT))
    ids = list(PROMPT)
    plan = feed(policy, ids, [A, EOS])  # n_remove reaches past the prompt
    assert isinstance(plan, RewindPlan) and plan.position == len(PROMPT) and plan.removed == 1
    cut(policy, ids, plan)
    for token in [A, B, C, D, E, A, B, C]:
        assert feed(policy, ids, [token]) == "keep"
        policy.settle(0, len(ids), finished=False)
    assert policy.final[0] == len(ids) - 4  # hold_back tokens stay revisable, the rest is final
    plan = feed(policy, ids, [Z])  # the rule asks for position 0
    assert isinstance(plan, RewindPlan) and plan.position == policy.final[0]
    assert policy.settle(0, len(ids), finished=True) == (len(ids) - 5, len(ids))


def test_bans_lapse_once_the_row_is_cut_back_before_them() -> None:
    rule = At(Z, position=lambda view: len(view.ids) - 3, ban_here=(C,), bans={100: (D,)})
    policy = RewindPolicy(BackstepConfig(rules=[rule]), [EOS], VOCAB)
    policy.start(1, len(PROMPT))
    ids = list(PROMPT)
    plan = feed(policy, ids, [A, B, C, D, Z])
    assert isinstance(plan, RewindPlan)
    cut(policy, ids, plan)
    assert policy.bans.at[0] == {plan.position: {C}, 100: {D}}
    again = feed(policy, ids, [E, A, Z])  # cut back to before the first rewind point
    assert isinstance(again, RewindPlan) and again.position == plan.position  # same point: bans accumulate
    cut(policy, ids, again)
    assert policy.bans.at[0] == {plan.position: {C}, 100: {D}}
    policy.rewind(0, plan.position - 1)
    assert policy.bans.at[0] == {}


def test_a_banned_phrase_does_not_forbid_eos_an_ending_does(tokenizer) -> None:
    config = BackstepConfig(n_remove=2, ban_phrases=["c d"], end_phrases=["x y"])
    policy = RewindPolicy(config, [EOS], VOCAB, tokenizer)
    policy.start(1, len(PROMPT))
    ids = list(PROMPT)
    ban = feed(policy, ids, [A, B, C, D, E])
    assert isinstance(ban, RewindPlan) and (ban.reason, ban.detail) == ("phrase", "c d")
    assert (ban.position, ban.banned_token) == (len(PROMPT) + 2, C)
    assert ban.bans == {ban.position: frozenset({C})}  # no EOS: an EOS here is the EOS rule's business
    cut(policy, ids, ban)
    ending = feed(policy, ids, [A, X, Y, E])
    assert isinstance(ending, RewindPlan) and (ending.reason, ending.detail) == ("ending", "x y")
    start = len(PROMPT) + 3  # where "x y" began
    assert ending.position == start - 2 and ending.banned_token is None
    assert ending.bans == {ending.position: frozenset({EOS}), start: frozenset({X})}


def test_every_rule_has_its_own_budget(tokenizer) -> None:
    config = BackstepConfig(n_remove=1, max_phrase_rewinds=1, ban_phrases=["c d"], end_phrases=["x y"])
    policy = RewindPolicy(config, [EOS], VOCAB, tokenizer)
    policy.start(1, len(PROMPT))
    ids = list(PROMPT)
    cut(policy, ids, feed(policy, ids, [A, C, D, E]))  # type: ignore[arg-type]
    assert feed(policy, ids, [B, C, D, E]) == "keep"  # the banned phrases' budget is spent
    ending = feed(policy, ids, [X, Y, E])  # the endings have a budget of their own
    assert isinstance(ending, RewindPlan) and ending.reason == "ending"


def test_user_rules_keep_all_tokens_at_len_ids_have_a_budget_and_check_ban_ids() -> None:
    keep_all = At(A, position=lambda view: len(view.ids))
    policy = RewindPolicy(BackstepConfig(rules=[keep_all]), [EOS], VOCAB)
    policy.start(1, len(PROMPT))
    ids = list(PROMPT)
    assert feed(policy, ids, [A, A, B]) == "keep" and not policy.events[0]

    always = At(B, position=lambda view: len(view.ids) - 1)
    policy = RewindPolicy(BackstepConfig(rules=[always], max_rule_rewinds=3), [EOS], VOCAB)
    policy.start(1, len(PROMPT))
    ids = list(PROMPT)
    for _ in range(3):
        plan = feed(policy, ids, [A, B])
        assert isinstance(plan, RewindPlan) and plan.removed == 0  # only the new token is refused
        cut(policy, ids, plan)
    assert feed(policy, ids, [B]) == "keep"  # budget spent
    assert [e.reason for e in policy.events[0]] == ["at"] * 3

    outside = RewindPolicy(BackstepConfig(rules=[At(B, ban_here=(10**6,))]), [EOS], VOCAB)
    outside.start(1, len(PROMPT))
    with pytest.raises(ValueError, match=r"At asked to forbid token ids \[1000000\].*ban_here.*\[0, 64\)"):
        feed(outside, list(PROMPT), [A, B])
    with pytest.raises(ValueError, match="`ban_here` must hold token ids"):
        RewindTo(position=3, ban_here=(-1,))
    with pytest.raises(ValueError, match=r"`bans\[4\]` must hold token ids"):
        RewindTo(position=3, bans={4: (-2,)})
    with pytest.raises(TypeError, match="`position` must be an int"):
        RewindTo(position=2.5)  # type: ignore[arg-type]


def test_rules_follow_rewinds(tokenizer) -> None:
    loops = LoopDetection(min_span=2, max_span=4, min_repeats=3, min_loop_tokens=6, line_repeats=0)
    policy = RewindPolicy(BackstepConfig(loops=loops), [EOS], VOCAB, tokenizer)
    policy.start(1, len(PROMPT))
    ids = list(PROMPT)
    plan = feed(policy, ids, [A, B, A, B, A, B])
    assert isinstance(plan, RewindPlan) and plan.reason == "loop"
    assert (plan.position, plan.banned_token) == (len(PROMPT) + 2, A)  # one copy stays
    cut(policy, ids, plan)
    assert feed(policy, ids, [C, A, B]) == "keep"


def test_hold_back_grows_while_an_ending_may_complete(tokenizer) -> None:
    policy = RewindPolicy(BackstepConfig(n_remove=2, hold_back=2, end_phrases=["x y"]), [EOS], VOCAB, tokenizer)
    policy.start(1, len(PROMPT))
    ids = list(PROMPT)
    feed(policy, ids, [A, B, C, D])
    assert policy.held(0) == 2
    feed(policy, ids, [X])  # "x" may begin the ending: it and the n_remove tokens before it stay revisable
    assert policy.held(0) >= 3
    assert policy.settle(0, len(ids), finished=False)[1] <= len(ids) - 3


def test_an_eos_outside_the_vocabulary_with_default_end_phrases(tokenizer) -> None:
    policy = RewindPolicy(BackstepConfig(end_phrases="default"), [10**6], VOCAB, tokenizer)
    policy.start(1, len(PROMPT))
    assert policy.eos == frozenset()  # it can never be sampled
    plan = feed(policy, list(PROMPT), [A, B, EOS])  # the tokenizer's own end marker is still an ending
    assert isinstance(plan, RewindPlan) and (plan.reason, plan.detail, plan.position) == ("ending", "</s>", 3)
    assert plan.bans == {len(PROMPT) + 2: frozenset({EOS})}


class Locked(RewindRule):
    """A rule that holds a lock (cannot be deep-copied)."""

    def __init__(self, lock: threading.Lock | None = None) -> None:
        self.lock = lock or threading.Lock()
        self.seen = 0

    def check(self, view: RowView) -> RewindTo | None:
        with self.lock:
            self.seen += 1
        return None


class SharesItsLock(Locked):
    def fresh(self) -> RewindRule:
        return SharesItsLock(self.lock)


def test_a_rule_holding_a_lock_gets_a_clear_error_or_shares_it_through_fresh() -> None:
    with pytest.raises(TypeError, match=r"Locked cannot be deep-copied.*override `fresh\(\)`"):
        RewindPolicy(BackstepConfig(rules=[Locked()]), [EOS], VOCAB)
    rule = SharesItsLock()
    policy = RewindPolicy(BackstepConfig(rules=[rule]), [EOS], VOCAB)
    policy.start(1, len(PROMPT))
    feed(policy, list(PROMPT), [A, B])
    copy = policy.rules[-1]
    assert isinstance(copy, SharesItsLock) and copy is not rule and copy.lock is rule.lock and copy.seen == 2


# -- the HF loop asks the policy -------------------------------------------------------------------------------
class Twice(RewindRule):
    """Rewinds each row twice: when its generated tokens first reach 6 and 11, cutting 3 of them."""

    reason = "twice"

    def start(self, batch_size: int, prompt_length: int) -> None:
        self.fired = [0] * batch_size

    def check(self, view: RowView) -> RewindTo | None:
        generated = len(view.ids) - view.prompt_length
        if self.fired[view.row] < 2 and generated == 6 + 5 * self.fired[view.row]:
            self.fired[view.row] += 1
            return RewindTo(position=len(view.ids) - 3, ban_first_removed=True, reason=self.reason)
        return None


def generate(model, config: BackstepConfig, max_new_tokens: int = 20, seed: int = 0, **kwargs):
    prompt = torch.tensor([[1, 473, 245]])
    torch.manual_seed(seed)
    out = model.generate(
        prompt,
        do_sample=True,
        top_k=0,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,  # no EOS rewinds: only the rules under test
        backstep=config,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out, prompt


def test_forward_count_formula_holds_for_user_rule_rewinds(scripted_model) -> None:
    out, _ = generate(scripted_model, BackstepConfig(n_remove=3, rules=[Twice()]), max_new_tokens=20)
    stats, events = out.backstep_stats, out.backstep_events[0]
    assert [e.reason for e in events] == ["twice", "twice"] and [e.removed for e in events] == [2, 2]
    assert [e.step for e in events] == [5, 13]  # tokens sampled before the trigger: 5; then 6 + 7
    # The README: decode forwards = final new tokens + removed tokens + deep rewinds - 1, whatever the reason.
    assert stats.decode_forwards == 20 + stats.removed_tokens + stats.deep_rewinds - 1


def test_rewind_to_len_ids_keeps_every_token(scripted_model) -> None:
    plain, _ = generate(scripted_model, BackstepConfig(n_remove=3), max_new_tokens=12)
    token = plain.sequences[0, 6].item()  # a token the run writes
    keep_all = At(token, position=lambda view: len(view.ids))
    out, _ = generate(scripted_model, BackstepConfig(n_remove=3, rules=[keep_all]), max_new_tokens=12)
    assert torch.equal(out.sequences, plain.sequences) and out.backstep_events == [[]]


def test_an_always_rewinding_user_rule_stops_at_its_budget(scripted_model) -> None:
    always = At(None, position=lambda view: len(view.ids) - 1)  # type: ignore[arg-type]
    always.check = lambda view: RewindTo(position=len(view.ids) - 1, reason="always")  # type: ignore[method-assign]
    with deadline(60):
        out, _ = generate(scripted_model, BackstepConfig(n_remove=2, rules=[always]), max_new_tokens=8)
    assert len(out.backstep_events[0]) == 50  # max_rule_rewinds' default
    assert out.sequences.shape[1] == 3 + 8


def test_a_rule_banning_an_id_outside_the_vocabulary_fails_clearly(scripted_model) -> None:
    rule = At(None, ban_here=(10**6,))  # type: ignore[arg-type]
    rule.check = lambda view: RewindTo(position=len(view.ids) - 1, ban_here=(10**6,))  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"asked to forbid token ids \[1000000\]"):
        generate(scripted_model, BackstepConfig(rules=[rule]), max_new_tokens=4)


def test_a_rule_holding_a_lock_in_generate(scripted_model) -> None:
    with pytest.raises(TypeError, match=r"override `fresh\(\)`"):
        generate(scripted_model, BackstepConfig(rules=[Locked()]), max_new_tokens=3)
    out, _ = generate(scripted_model, BackstepConfig(rules=[SharesItsLock()]), max_new_tokens=3)
    assert out.sequences.shape[1] == 6


def test_eos_prob_is_the_raw_eos_probability_where_the_refused_token_was_drawn(scripted_model, story_tokenizer) -> None:
    """One meaning for every reason: the model's own EOS probability (before processors, temperature and
    bans) in the distribution the token that triggered the rewind was drawn from."""
    for script, config in (
        ([*THEY_WERE_HAPPY, EOS], {"n_remove": 2, "max_backsteps": 1}),  # a (forced) EOS
        ([*THEY_WERE_HAPPY, DOT, *SPELLED_END], {"n_remove": 2, "ban_phrases": "default"}),  # a phrase
    ):
        out, _ = run_script(scripted_model, story_tokenizer, script, **config)
        first = out.backstep_events[0][0]
        prompt = story_tokenizer("Once upon a time", return_tensors="pt").input_ids
        refused_at = len(script) - 1  # the script's last token triggers the rewind
        prefix = torch.cat([prompt, torch.tensor([script[:refused_at]])], dim=1)
        with torch.no_grad():
            raw = torch.softmax(scripted_model(prefix).logits[0, -1].float(), -1)[EOS].item()
        assert first.eos_prob == pytest.approx(raw, rel=1e-4, abs=1e-9), first


def test_an_eos_id_outside_the_vocabulary_with_default_end_phrases(scripted_model, story_tokenizer) -> None:
    prompt = story_tokenizer("Once upon a time", return_tensors="pt").input_ids
    out = scripted_model.generate(
        prompt,
        max_new_tokens=5,
        do_sample=False,
        eos_token_id=5000,
        pad_token_id=0,
        backstep=BackstepConfig(end_phrases="default"),
        tokenizer=story_tokenizer,
    )
    assert out.shape[1] == prompt.shape[1] + 5


def test_policy_cost_benchmark_smoke(tmp_path, tinystories_path) -> None:
    from benchmarks import policy_cost

    assert policy_cost.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert "| 1 | chat |" in (tmp_path / "policy_cost.md").read_text()
    out = json.loads((tmp_path / "policy_cost.json").read_text())
    for batch in out["batches"].values():
        for name, arm in batch.items():
            if name.startswith("_"):
                continue
            # every repeat's step is kept, and the median the ratios are built from is theirs
            assert len(arm["ms_per_step_by_repeat"]) == out["repeats"]
            assert arm["ms_per_step"] == pytest.approx(statistics.median(arm["ms_per_step_by_repeat"]))
            reference = batch["dynamic"]["ms_per_step_by_repeat"]
            paired = [a / b for a, b in zip(arm["ms_per_step_by_repeat"], reference)]
            assert arm["paired_ratio_median"] == pytest.approx(statistics.median(paired))
            # Every arm wrote the same tokens, the chat preset's rows cut back by the landing included (in a run of
            # 4 tokens the few respelled ones may be all of a row's; they were once counted as a difference).
            assert arm["same_tokens"], name


def test_policy_cost_benchmark_runs_a_random_llama_with_the_tinystories_vocabulary(tmp_path, tinystories_path) -> None:
    """The path of ``--gpu`` (a random Llama of 1B parameters on CUDA), with a tiny random Llama on the CPU: the
    random model writes the rows TinyStories-656K wrote for a seed (a seed without rows: its own), the arms run,
    write the same tokens and name the model; without CUDA, ``--gpu`` refuses by name."""
    from benchmarks import policy_cost

    model, tokenizer, writer = policy_cost.load_model("random-tiny", "cpu")
    model, writer = make_perpetual(model, tokenizer=tokenizer), make_perpetual(writer, tokenizer=tokenizer)
    rows = policy_cost.Runner(writer, tokenizer, 2, 8, None)(BackstepConfig.method4(10), 5)[1].sequences
    run = policy_cost.Runner(model, tokenizer, 2, 8, None)
    run.script = {5: rows}
    assert torch.equal(run(BackstepConfig.chat(landing=False), 5)[1].sequences, rows)
    assert not torch.equal(run(BackstepConfig.chat(landing=False), 6)[1].sequences, rows)

    assert policy_cost.main(["--smoke", "--model", "random-tiny", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "policy_cost.json").read_text())
    assert out["model"] == "a random-tiny Llama (random weights) on cpu" and out["clock"] == "CPU time"
    assert all(arm["same_tokens"] for batch in out["batches"].values() for name, arm in batch.items() if name[0] != "_")
    assert (tmp_path / "policy_cost.md").read_text().startswith("Policy cost, a random-tiny Llama (random weights)")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            policy_cost.main(["--smoke", "--gpu", "--out", str(tmp_path)])


def test_policy_cost_times_the_build_without_garbage_left_by_earlier_work(tokenizer, monkeypatch) -> None:
    """The build's clock starts with nothing left for the garbage collector: a full collection that earlier work
    left due once took 0.19 s of a 0.23 s build of 10,000 phrases (the old code started the clock with the
    collector's counts as earlier work had left them)."""
    import time as real_time

    from benchmarks import policy_cost

    counts: list[tuple[int, int, int]] = []

    class Clock:
        @staticmethod
        def perf_counter() -> float:
            counts.append(gc.get_count())
            return real_time.perf_counter()

    monkeypatch.setattr(policy_cost, "time", Clock)
    earlier_work = [[i] for i in range(5000)]  # containers the collector has not looked at since
    seconds = policy_cost.build_seconds(BackstepConfig(ban_phrases=["c d"]), tokenizer, VOCAB)
    assert seconds > 0 and len(earlier_work) == 5000
    # right after a full collection (a weakref callback it runs may allocate a few containers)
    assert counts[0][1:] == (0, 0) and counts[0][0] < 50


def test_phrase_matchers_are_built_once_per_tokenizer_and_phrase_list(tokenizer) -> None:
    first = RewindPolicy(BackstepConfig(ban_phrases=["c d"], end_phrases="default"), [EOS], VOCAB, tokenizer)
    again = RewindPolicy(BackstepConfig(ban_phrases=["c d"], end_phrases="default"), [EOS], VOCAB, tokenizer)
    other = RewindPolicy(BackstepConfig(ban_phrases=["c e"]), [EOS], VOCAB, tokenizer)
    matchers = [[r.matcher for r in p.rules if isinstance(r, PhraseRule)] for p in (first, again, other)]
    assert len(matchers[0]) == 2 and all(a is b for a, b in zip(matchers[0], matchers[1]))
    assert matchers[2][0] is not matchers[0][1]
    # Each policy's rules keep their own per-row state: running one leaves the other's untouched.
    first.start(1, len(PROMPT))
    again.start(1, len(PROMPT))
    ids = list(PROMPT)
    cut(first, ids, feed(first, ids, [A, C, D, E]))  # type: ignore[arg-type]
    assert feed(again, list(PROMPT), [A, C, D, E]) != "keep"
