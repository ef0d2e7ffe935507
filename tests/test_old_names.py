"""Names renamed for one word per idea still work for one release, with a DeprecationWarning naming the new name."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from support import BoostEOS, tiny_model

import perpetual_logits as pl

# (module, old name, new name): the old name is handed on by the module's __getattr__.
RENAMED = [
    ("perpetual_logits", "BackstepEvent", "RewindEvent"),
    ("perpetual_logits", "Rewind", "RewindTo"),
    ("perpetual_logits", "LoopRewinds", "LoopDetection"),
    ("perpetual_logits", "Widen", "Widening"),
    ("perpetual_logits.backstep", "BackstepEvent", "RewindEvent"),
    ("perpetual_logits.backstep", "LoopRewinds", "LoopDetection"),
    ("perpetual_logits.backstep.events", "BackstepEvent", "RewindEvent"),
    ("perpetual_logits.backstep.config", "LoopRewinds", "LoopDetection"),
    ("perpetual_logits.protocol", "Rewind", "RewindTo"),
    ("perpetual_logits.truncation", "Widen", "Widening"),
    ("perpetual_logits.vllm", "KEY", "EXTRA_ARGS_KEY"),
    ("perpetual_logits.vllm.settings", "KEY", "EXTRA_ARGS_KEY"),
    ("perpetual_logits.vllm", "WidenSettings", "WideningSettings"),
    ("perpetual_logits.vllm.settings", "WidenSettings", "WideningSettings"),
]


@pytest.mark.parametrize(("module", "old", "new"), RENAMED)
def test_an_old_name_warns_naming_the_new_one_and_is_the_same_object(module, old, new):
    namespace = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=f"`{module}.{old}` was renamed `.*{new}`") as caught:
        value = getattr(namespace, old)
    assert value is getattr(namespace, new)
    assert [w.filename for w in caught] == [__file__]  # the warning points at the line that used the old name
    assert old not in namespace.__all__ and new in namespace.__all__


def test_from_import_of_an_old_name_warns_and_the_star_import_holds_only_new_names():
    with pytest.warns(DeprecationWarning, match="Widening"):
        from perpetual_logits import Widen
    assert Widen is pl.Widening
    namespace: dict[str, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # a star import touches no old name
        exec("from perpetual_logits import *", namespace)
    assert {"RewindEvent", "RewindTo", "LoopDetection", "Widening"} <= set(namespace)
    assert not {"BackstepEvent", "Rewind", "LoopRewinds", "Widen"} & set(namespace)


def test_old_names_still_build_what_they_built():
    with pytest.warns(DeprecationWarning):
        request = pl.Rewind(position=3, ban_here=(7,), reason="digit")
    assert request == pl.RewindTo(position=3, ban_here=(7,), reason="digit")
    with pytest.warns(DeprecationWarning):
        loops = pl.LoopRewinds(max_span=4)
    with pytest.warns(DeprecationWarning):
        widening = pl.Widen(top_k=200)
    with pytest.warns(DeprecationWarning, match="`BackstepConfig.dynamic` was renamed `BackstepConfig.method4`"):
        old = pl.BackstepConfig.dynamic(6, peak=1.5, loops=loops, widen=widening)
    assert old == pl.BackstepConfig.method4(6, peak=1.5, loops=pl.LoopDetection(max_span=4), widen=pl.Widening(200))
    assert old.schedule == pl.LinearDecay(1.5, 6)
    with pytest.warns(DeprecationWarning):
        key = pytest.importorskip("perpetual_logits.vllm").KEY
    assert key == "perpetual_logits" and list(pl.vllm.suppress_eos(2)) == [key]


def test_the_old_stats_counter_reads_the_rewinds_of_a_real_run():
    model = pl.make_perpetual(tiny_model("llama"))
    torch.manual_seed(0)
    out = model.generate(
        torch.tensor([[1, 5, 6, 7]]),
        do_sample=True,
        max_new_tokens=20,
        backstep=pl.BackstepConfig(n_remove=2, max_backsteps=5),
        logits_processor=[BoostEOS(3.0)],
        return_dict_in_generate=True,
    )
    stats, events = out.backstep_stats, out.backstep_events[0]
    assert stats.rewinds == len(events) > 0, "the EOS boost should force rewinds"
    with pytest.warns(DeprecationWarning, match="`BackstepStats.backsteps` was renamed `BackstepStats.rewinds`"):
        assert stats.backsteps == stats.rewinds
    with pytest.warns(DeprecationWarning):
        old_event = pl.BackstepEvent
    assert all(isinstance(event, old_event) for event in events)
    with pytest.raises(AttributeError):
        stats.backsteps = 1  # read-only: the counter has one name to write to
