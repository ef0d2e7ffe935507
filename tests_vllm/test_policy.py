"""The rewind policy on vLLM: user rules and loops with the HF backend's semantics, every EOS rewound under
``ignore_eos``, our ``extra_args`` key refused with ``backstep=``, and stop strings dropped from the text."""

from __future__ import annotations

import pytest
from vllm import SamplingParams

import perpetual_logits.vllm as plv
from perpetual_logits import BackstepConfig, LoopDetection, RewindRule, RewindTo
from perpetual_logits.backstep.policy import RewindPlan, RewindPolicy
from perpetual_logits.protocol import RowView

MAX = 40
SEED = 104  # as in test_engine: at temperature 0.7 plain vLLM ends every answer with EOS early


def params(seed: int, **kwargs) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.7, "top_k": 0, "max_tokens": MAX, "seed": seed, **kwargs})


class Twice(RewindRule):
    """Rewinds each row twice: when its generated tokens first reach 6 and then 11, keeping all but 3."""

    reason = "twice"

    def start(self, batch_size: int, prompt_length: int) -> None:
        self.fired = [0] * batch_size

    def check(self, view: RowView) -> RewindTo | None:
        generated = len(view.ids) - view.prompt_length
        if self.fired[view.row] < 2 and generated == 6 + 5 * self.fired[view.row]:
            self.fired[view.row] += 1
            return RewindTo(position=len(view.ids) - 3, ban_first_removed=True, reason=self.reason)
        return None


def test_user_rules_rewind_on_vllm(llm, prompts):
    rule = Twice()
    # EOS masked throughout (no EOS budget): only the user rule rewinds, at the same points as on HF.
    config = BackstepConfig.method4(n_remove=4, max_backsteps=0, rules=[rule])
    outs = plv.generate(llm, prompts, [params(SEED + i) for i in range(len(prompts))], backstep=config)
    for out in outs:
        assert len(out.token_ids) == MAX and out.finish_reason == "length"
        events = out.backstep_events
        assert [(e.reason, e.position, e.removed, e.step) for e in events] == [("twice", 3, 2, 5), ("twice", 8, 2, 13)]
        assert all(e.banned_token is not None for e in events)
        assert out.stats.submissions == 1 + len(events)
    assert not hasattr(rule, "fired")  # the call worked on its own copy


def test_loops_rewind_on_vllm_where_the_policy_rewinds_the_same_tokens(llm):
    tokenizer = llm.get_tokenizer()
    looping = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write the word hello 30 times, separated by spaces."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    # Greedy SmolLM2 writes "Hello, hello, hello.": a two-token span twice back to back is a loop here.
    loops = LoopDetection(min_span=2, max_span=8, min_repeats=2, min_loop_tokens=4, line_repeats=0, max_rewinds=2)
    no_eos = {"n_remove": 4, "max_backsteps": 0}  # EOS masked: only loops rewind
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX)
    plain, backstep = (
        plv.generate(llm, looping, greedy, backstep=config)[0]
        for config in (BackstepConfig(**no_eos), BackstepConfig(**no_eos, loops=loops))
    )
    assert plain.backstep_events == []
    # The same policy, fed the plain run's tokens offline, says where the first loop rewind must happen.
    policy = RewindPolicy(BackstepConfig(**no_eos, loops=loops), plv.eos_token_ids(llm), 10**6, tokenizer)
    prompt = plain.prompt_token_ids
    policy.start_rows([len(prompt)], greedy=[True])
    ids, decision = list(prompt), None
    for token in plain.token_ids:
        ids.append(token)
        decision = policy.after_token(RowView(0, ids, len(prompt), 0))
        if isinstance(decision, RewindPlan):
            break
    assert isinstance(decision, RewindPlan), plain.text  # the premise: the plain run loops
    first = backstep.backstep_events[0]
    assert (first.reason, first.position, first.removed, first.banned_token, first.detail) == (
        "loop",
        decision.position - len(prompt),
        decision.removed,
        decision.banned_token,
        decision.detail,
    )
    assert 1 <= len(backstep.backstep_events) <= 2 and len(backstep.token_ids) == MAX
    assert backstep.token_ids[: first.position] == plain.token_ids[: first.position]


def test_ignore_eos_with_backstep_rewinds_every_eos(llm, prompts):
    eos = set(plv.eos_token_ids(llm))
    outs = plv.generate(
        llm,
        prompts,
        [params(SEED + i, ignore_eos=True) for i in range(len(prompts))],
        backstep=BackstepConfig(n_remove=3),
    )
    for out in outs:
        assert len(out.token_ids) == MAX and not eos & set(out.token_ids), out.token_ids
        assert out.stats.submissions == 1 + len(out.backstep_events)
    assert sum(e.reason == "eos" for out in outs for e in out.backstep_events) >= 1


def test_our_extra_args_key_is_refused_with_backstep_by_name(llm, prompts):
    config = BackstepConfig(n_remove=3, max_backsteps=2)
    for extra in (plv.suppress_eos(5), {plv.EXTRA_ARGS_KEY: 5}):
        with pytest.raises(ValueError, match=r"`params.extra_args\['perpetual_logits'\]` must not be set"):
            plv.generate(llm, prompts[0], params(SEED, extra_args=extra), backstep=config)
    with pytest.raises(ValueError, match=r"`params.extra_args` must be a dict"):
        plv.generate(llm, prompts[0], params(SEED, extra_args=[1]), backstep=config)


def test_stop_strings_leave_the_text_as_plain_vllm_does(llm, prompts):
    stop = params(SEED, temperature=0.0, stop=["."])
    plain = llm.generate(prompts, stop, use_tqdm=False)
    ours = plv.generate(llm, prompts, stop)
    assert any(p.outputs[0].finish_reason == "stop" for p in plain)
    for p, o in zip(plain, ours):
        expected = p.outputs[0]
        assert (o.token_ids, o.text, o.finish_reason) == (
            list(expected.token_ids),
            expected.text,
            expected.finish_reason,
        )
    tokenizer = llm.get_tokenizer()
    for out in plv.generate(llm, prompts, stop, backstep=BackstepConfig(n_remove=3)):
        if out.finish_reason == "stop":
            full = tokenizer.decode(out.token_ids, skip_special_tokens=True)
            assert full.startswith(out.text) and full[len(out.text) :].startswith(".") and "." not in out.text
