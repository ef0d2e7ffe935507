"""The mixin's call scope: what a backstep generate() call hands the methods transformers calls inside it -- its
settings, its tokenizer, the running loop -- private to the call's thread and gone when the call returns."""

from __future__ import annotations

import threading

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor

from perpetual_logits import BackstepConfig, make_perpetual
from perpetual_logits.backstep import BackstepLoop
from perpetual_logits.mixin import _CallScope


class SeeScope(LogitsProcessor):
    """Changes nothing; notes the call scope it runs in, at every step."""

    def __init__(self) -> None:
        self.seen: list[_CallScope | None] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.seen.append(_CallScope.current())
        return scores


def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return make_perpetual(LlamaForCausalLM(cfg).eval())


def test_a_backstep_call_runs_in_its_scope_and_a_plain_one_in_none():
    model, spy = tiny(), SeeScope()
    config = BackstepConfig(n_remove=2)
    ids = torch.tensor([[1, 5, 6]])
    model.generate(ids, do_sample=False, max_new_tokens=4, logits_processor=[spy], backstep=config)
    scopes = set(map(id, spy.seen))
    assert len(scopes) == 1 and spy.seen  # one scope for the whole call
    scope = spy.seen[0]
    assert scope is not None and scope.config is config and scope.tokenizer is None
    assert scope.loop is None  # the loop ran inside it, and is let go when the call returns
    assert _CallScope.current() is None
    spy.seen.clear()
    model.generate(ids, do_sample=False, max_new_tokens=4, logits_processor=[spy], backstep=False)
    assert spy.seen and all(s is None for s in spy.seen)


def test_the_running_loop_is_visible_during_the_call():
    model = tiny()
    loops: list[object] = []

    class SeeLoop(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            scope = _CallScope.current()
            loops.append(scope.loop if scope is not None else None)
            return scores

    model.generate(torch.tensor([[1, 5]]), max_new_tokens=3, logits_processor=[SeeLoop()], backstep=True)
    assert loops and all(isinstance(loop, BackstepLoop) for loop in loops)


def test_scopes_are_private_to_their_thread_and_nest():
    outer, inner = _CallScope(BackstepConfig(n_remove=1), None), _CallScope(BackstepConfig(n_remove=3), None)
    both_in = threading.Barrier(2)
    seen: dict[str, _CallScope | None] = {}

    def other() -> None:
        with _CallScope.entered(inner):
            both_in.wait()
            seen["other"] = _CallScope.current()

    thread = threading.Thread(target=other)
    with _CallScope.entered(outer):
        thread.start()
        both_in.wait()
        seen["main"] = _CallScope.current()
        with _CallScope.entered(None):  # a plain call inside a backstep one
            seen["nested"] = _CallScope.current()
        seen["after"] = _CallScope.current()
    thread.join()
    assert seen == {"other": inner, "main": outer, "nested": None, "after": outer}
    assert _CallScope.current() is None
