"""Speed benchmark: perpetual_logits against plain ``generate()`` and against bare model forwards, in one run.

Run ``python benchmarks/speed.py`` (``make bench``), or ``--smoke`` for a seconds-long check (``make test`` runs
it through ``tests/test_benchmarks.py``). Results: ``<out>/speed.json`` and ``<out>/speed.md``, then
``RESULTS.md`` next to ``<out>`` is regenerated (``benchmarks/RESULTS.md`` by default).

Method: every arm runs the same prompt with the same seed in each repeat; repeats are interleaved (each
repeat runs every arm once, starting from a different arm) so that drift of a shared machine hits every arm
alike; each arm is warmed up once, untimed. Times are wall-clock per generated token; ratios are to plain
``generate()`` in the same run (ratio of medians, and the min–max of the per-repeat paired ratios).

Full-length runs without touching the sampler: ``generate()`` gets ``eos_token_id = vocab_size``, an id the
model cannot produce, so no arm stops early and no backstep happens in (b), while the processors are given the
model's real EOS id (2) and do their real work (Method 2 evicts and heats). ``min_new_tokens`` is avoided on
purpose: transformers' own ``MinNewTokensLengthLogitsProcessor`` costs ~0.3 ms per step at vocab 32000, which
would inflate the plain baseline and flatter every ratio. ``top_k=0`` and temperature 1 in every arm.

Clock: with ``--clock cpu`` (default) times are the process's CPU time (``time.process_time``; one torch
thread, so it is the work done), which stays meaningful when other processes compete for the cores; ``--clock
wall`` uses ``time.perf_counter``. Both are recorded in the JSON; the ratios use the chosen one.

Arms:
(a) Method 1, Method 2, the stats recorder, and a ``make_perpetual`` model without ``backstep`` vs plain;
(b) backstep generation with no EOS event vs plain;
(c) cost of a backstep on TinyStories-656K with real EOS events: forward passes and time per backstep;
(d) batch 8 vs batch 1 throughput with backsteps happening (TinyStories-656K);
(e) a loop of bare model forwards over the same tokens (the physical limit); plain and backstep vs it;
plus the peak RSS of each arm and the KV-cache slots that backsteps leave.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import perpetual_logits
from benchmarks import common

PROMPT = "Once upon a time"
NOOP = "no-op LogitsProcessor (transformers' own cost)"
BUILTIN = "built-in suppress_tokens=[eos] (transformers)"
METHOD1 = "Method 1: SuppressEOSLogitsProcessor"
N_REMOVE = 10

TARGETS = {
    # (arm kind, model) -> (comparison, bound)
    "processor_15m": 1.02,
    "processor_656k": 1.10,
    "backstep_no_eos": 1.03,
    "batch8_over_batch1": 4.0,
}


@dataclass
class SpeedSettings:
    """What one run measures; ``--smoke`` shrinks everything to seconds."""

    # Many short interleaved repeats: on a shared VM, more samples tame the median better than longer runs.
    new_tokens: int = 128
    repeats: int = 11
    batch: int = 8
    threads: int = 1
    clock: str = "cpu"
    big_hidden: int = 288
    big_layers: int = 6
    big_heads: int = 6
    big_intermediate: int = 768
    big_vocab: int = 32000
    backstep_tokens: int = 300
    smoke: bool = False

    @classmethod
    def smoke_settings(cls) -> SpeedSettings:
        return cls(
            new_tokens=12,
            repeats=1,
            batch=8,
            big_hidden=64,
            big_layers=2,
            big_heads=4,
            big_intermediate=128,
            big_vocab=1024,
            backstep_tokens=120,
            smoke=True,
        )


def random_llama(settings: SpeedSettings, seed: int = 0) -> Any:
    """The ~15M-parameter random Llama of the issue (hidden 288, 6 layers, 6 heads, ffn 768, vocab 32000)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=settings.big_vocab,
        hidden_size=settings.big_hidden,
        intermediate_size=settings.big_intermediate,
        num_hidden_layers=settings.big_layers,
        num_attention_heads=settings.big_heads,
        num_key_value_heads=settings.big_heads,
        max_position_embeddings=2048,
        # Tied like llama2.c's stories15M, which makes it ~15M parameters (24M untied).
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def clone(model: Any) -> Any:
    """An independent copy with the same weights (``make_perpetual`` changes the class of its argument)."""
    copy = type(model)(model.config)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def has_backstep() -> bool:
    return hasattr(perpetual_logits, "make_perpetual") and hasattr(perpetual_logits, "BackstepConfig")


def stats_recorder_cls() -> Any:
    try:
        from perpetual_logits.analysis import StepStatsRecorder
    except ImportError:
        return None
    return StepStatsRecorder


class NoOpProcessor(LogitsProcessor):
    """Returns the scores unchanged: what transformers charges for calling a user processor at all."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores


class TimedProcessor(LogitsProcessor):
    """Wraps a processor and accumulates the wall time of its calls inside ``generate()``."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.seconds, self.calls = inner, 0.0, 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        start = time.perf_counter()
        out = self.inner(input_ids, scores)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def processor_call_costs(
    model: Any, prompt: torch.Tensor, eos: int, settings: SpeedSettings, repeats: int = 3
) -> dict[str, float]:
    """Microseconds per call of each processor inside a real ``generate()`` (median of ``repeats`` runs).

    Measured apart from the timed arms: the wrapper's own clock reads would otherwise be part of them.
    """
    makers: dict[str, Callable[[], Any]] = {
        "Method 1: SuppressEOSLogitsProcessor": lambda: perpetual_logits.SuppressEOSLogitsProcessor(eos),
        "Method 1, record=False": lambda: perpetual_logits.SuppressEOSLogitsProcessor(eos, record=False),
        "Method 2: PostEOSResamplingLogitsProcessor": lambda: perpetual_logits.PostEOSResamplingLogitsProcessor(eos),
        NOOP: NoOpProcessor,
    }
    recorder = stats_recorder_cls()
    if recorder is not None:
        makers["StepStatsRecorder"] = lambda: recorder(eos)
    kw = {"do_sample": True, "top_k": 0, "max_new_tokens": settings.new_tokens, "pad_token_id": 0}
    costs: dict[str, float] = {}
    for name, make in makers.items():
        per_call = []
        for r in range(repeats):
            timed = TimedProcessor(make())
            torch.manual_seed(r)
            model.generate(prompt, logits_processor=[timed], eos_token_id=int(model.config.vocab_size), **kw)
            per_call.append(1e6 * timed.seconds / max(timed.calls, 1))
        costs[name] = statistics.median(per_call)
    return costs


@dataclass
class Arm:
    """One timed thing: ``run()`` generates and returns ``(new tokens, extra info)``."""

    name: str
    run: Callable[[], tuple[int, dict[str, Any]]]
    group: str


def _timed(arm: Arm, seed: int) -> tuple[tuple[float, float], int, tuple[float, float], dict[str, Any]]:
    """((CPU s, wall s), new tokens, (peak RSS, peak above the start) in MiB, info) of one run of ``arm``."""
    gc.collect()
    common.reset_peak_rss()
    before = common.rss_mib()
    torch.manual_seed(seed)
    cpu, wall = time.process_time(), time.perf_counter()
    tokens, info = arm.run()
    elapsed = (time.process_time() - cpu, time.perf_counter() - wall)
    peak = common.peak_rss_mib()
    return elapsed, tokens, (peak, peak - before), info


def run_interleaved(
    arms: Sequence[Arm], repeats: int, clock: str = "cpu", seed0: int = 1000
) -> dict[str, dict[str, Any]]:
    """Time every arm ``repeats`` times, interleaved, after one untimed warm-up each.

    ``seconds`` and ``ms_per_token`` use ``clock`` ("cpu" or "wall"); the other clock is kept alongside.
    """
    primary = 0 if clock == "cpu" else 1
    for arm in arms:
        _timed(arm, seed0 - 1)
    raw: dict[str, list[tuple[tuple[float, float], int, tuple[float, float], dict[str, Any]]]] = {
        a.name: [] for a in arms
    }
    for r in range(repeats):
        k = r % len(arms)
        for arm in [*arms[k:], *arms[:k]]:  # rotate the start so no arm always runs first
            raw[arm.name].append(_timed(arm, seed0 + r))
    results: dict[str, dict[str, Any]] = {}
    for arm in arms:
        runs = raw[arm.name]
        results[arm.name] = {
            "group": arm.group,
            "clock": clock,
            "seconds": [t[primary] for t, _, _, _ in runs],
            "seconds_other_clock": [t[1 - primary] for t, _, _, _ in runs],
            "new_tokens": [n for _, n, _, _ in runs],
            "ms_per_token": common.summary([1000 * t[primary] / max(n, 1) for t, n, _, _ in runs]),
            "ms_per_token_other_clock": common.summary([1000 * t[1 - primary] / max(n, 1) for t, n, _, _ in runs]),
            "peak_rss_mib": max(m[0] for _, _, m, _ in runs),
            "peak_rss_above_start_mib": max(m[1] for _, _, m, _ in runs),
            "info": [i for _, _, _, i in runs],
        }
    return results


def add_ratios(results: dict[str, dict[str, Any]], reference: str, key: str = "ratio_to_plain") -> None:
    """Per arm: median time per token / the reference's, and the min–max of per-repeat paired ratios."""
    ref = results[reference]
    ref_per_token = [t / max(n, 1) for t, n in zip(ref["seconds"], ref["new_tokens"])]
    for res in results.values():
        per_token = [t / max(n, 1) for t, n in zip(res["seconds"], res["new_tokens"])]
        paired = [a / b for a, b in zip(per_token, ref_per_token)]
        res[key] = {
            "of_medians": res["ms_per_token"]["median"] / ref["ms_per_token"]["median"],
            "paired": common.summary(paired),
        }


# -- arms (a), (b), (e) -----------------------------------------------------------------------------------------
def processor_arms(model: Any, prompt: torch.Tensor, eos: int, settings: SpeedSettings) -> list[Arm]:
    """Plain, Methods 1-2, stats recorder, perpetual-off, backstep-no-EOS and bare forwards on one model.

    The processors act on ``eos``; ``generate()`` stops on an id outside the vocabulary (full-length runs).
    """
    n = settings.new_tokens
    kw: dict[str, Any] = {
        "do_sample": True,
        "top_k": 0,
        "temperature": 1.0,
        "max_new_tokens": n,
        "eos_token_id": int(model.config.vocab_size),  # never produced: no early stop, no backstep
        "pad_token_id": 0,
    }
    last: dict[str, torch.Tensor] = {}
    # transformers 5.2x renamed forward's `past_key_values` to `cache`; use whichever this version takes.
    cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def plain() -> tuple[int, dict[str, Any]]:
        out = model.generate(prompt, **kw)
        last["sequence"] = out
        return out.shape[1] - prompt.shape[1], {}

    def with_processor(make: Callable[[], Any]) -> Callable[[], tuple[int, dict[str, Any]]]:
        def run() -> tuple[int, dict[str, Any]]:
            out = model.generate(prompt, logits_processor=[make()], **kw)
            return out.shape[1] - prompt.shape[1], {}

        return run

    def builtin_suppress() -> tuple[int, dict[str, Any]]:
        out = model.generate(prompt, suppress_tokens=[eos], **kw)
        return out.shape[1] - prompt.shape[1], {}

    arms = [
        Arm("plain generate()", plain, "a"),
        # transformers' own price for any user processor (list dispatch, signature inspection per step).
        Arm(NOOP, with_processor(NoOpProcessor), "a"),
        # transformers' built-in masking of the EOS id: the same masking as Method 1, the bar it must meet.
        Arm(BUILTIN, builtin_suppress, "a"),
        Arm(
            METHOD1,
            with_processor(lambda: perpetual_logits.SuppressEOSLogitsProcessor(eos)),
            "a",
        ),
        Arm(
            "Method 2: PostEOSResamplingLogitsProcessor",
            with_processor(lambda: perpetual_logits.PostEOSResamplingLogitsProcessor(eos)),
            "a",
        ),
    ]
    recorder = stats_recorder_cls()
    if recorder is not None:
        arms.append(Arm("StepStatsRecorder", with_processor(lambda: recorder(eos)), "a"))
    else:
        print("  note: perpetual_logits.analysis.StepStatsRecorder is not available; its arm is skipped")
    if has_backstep():
        perpetual = perpetual_logits.make_perpetual(clone(model))

        def perpetual_off() -> tuple[int, dict[str, Any]]:
            out = perpetual.generate(prompt, **kw)
            return out.shape[1] - prompt.shape[1], {}

        def backstep_no_eos() -> tuple[int, dict[str, Any]]:
            out = perpetual.generate(
                prompt,
                backstep=perpetual_logits.BackstepConfig(n_remove=N_REMOVE),
                return_dict_in_generate=True,
                **kw,
            )
            stats = out.backstep_stats
            return out.sequences.shape[1] - prompt.shape[1], {
                "backsteps": stats.rewinds,
                "decode_forwards": stats.decode_forwards,
            }

        arms.append(Arm("make_perpetual, no backstep", perpetual_off, "a"))
        arms.append(Arm("backstep, no EOS event", backstep_no_eos, "b"))
    else:
        print("  note: perpetual_logits.make_perpetual is not available yet; backstep arms (b)-(d) skipped")

    def bare() -> tuple[int, dict[str, Any]]:
        from transformers import DynamicCache

        sequence = last.get("sequence")
        if sequence is None:  # warm-up order: plain runs first, but be safe
            sequence = model.generate(prompt, **kw)
            last["sequence"] = sequence
        p = prompt.shape[1]
        with torch.inference_mode():
            cache = {cache_kwarg: DynamicCache(config=model.config)}
            model(input_ids=sequence[:, :p], use_cache=True, **cache)
            # The same number of forwards as generate(): the prefill, then every new token but the last.
            for t in range(p, sequence.shape[1] - 1):
                model(input_ids=sequence[:, t : t + 1], use_cache=True, **cache)
        return sequence.shape[1] - p, {}

    arms.append(Arm("bare forward loop", bare, "e"))
    return arms


# -- arms (c), (d) ----------------------------------------------------------------------------------------------
def backstep_arms(model: Any, prompt: torch.Tensor, eos: int, settings: SpeedSettings) -> list[Arm]:
    """Backsteps with real EOS events (656K): batch 1 and batch ``settings.batch``; plain batch 1 for scale."""
    perpetual = perpetual_logits.make_perpetual(clone(model))
    n = settings.backstep_tokens
    kw: dict[str, Any] = {
        "do_sample": True,
        "top_k": 0,
        "temperature": 1.0,
        "max_new_tokens": n,
        "eos_token_id": eos,
        "pad_token_id": 0,
    }
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    slot_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # K and V, float32

    def plain_full() -> tuple[int, dict[str, Any]]:
        out = model.generate(prompt, **{**kw, "eos_token_id": int(config.vocab_size)})
        return out.shape[1] - prompt.shape[1], {}

    def backstep(batch: int) -> Callable[[], tuple[int, dict[str, Any]]]:
        ids = prompt.expand(batch, -1).contiguous()

        def run() -> tuple[int, dict[str, Any]]:
            out = perpetual.generate(
                ids,
                backstep=perpetual_logits.BackstepConfig(n_remove=N_REMOVE),
                return_dict_in_generate=True,
                **kw,
            )
            stats = out.backstep_stats
            seqs = out.sequences
            # Final new tokens per row: everything before the first pad after the prompt is kept text. The
            # default on_exhausted="suppress" runs every row to max_new_tokens, so this is batch * n.
            new = int((seqs[:, prompt.shape[1] :] != kw["pad_token_id"]).sum())
            final_length = seqs.shape[1]
            return new, {
                "backsteps": stats.rewinds,
                "removed_tokens": stats.removed_tokens,
                "deep_rewinds": stats.deep_rewinds,
                "decode_forwards": stats.decode_forwards,
                "cache_slots": stats.cache_slots,
                "final_length": final_length,
                "extra_cache_slots": stats.cache_slots - (final_length - 1),
                "extra_cache_mib": (stats.cache_slots - (final_length - 1)) * slot_bytes * batch / 2**20,
                "batch": batch,
            }

        return run

    return [
        Arm("plain generate(), batch 1, full length", plain_full, "c"),
        Arm("backstep, batch 1", backstep(1), "c"),
        Arm(f"backstep, batch {settings.batch}", backstep(settings.batch), "d"),
    ]


def backstep_cost(results: dict[str, dict[str, Any]], batch: int) -> dict[str, Any]:
    """Forward passes and time per backstep (batch 1), and the batch-vs-1 throughput ratio."""
    plain = results["plain generate(), batch 1, full length"]
    b1 = results["backstep, batch 1"]
    bn = results[f"backstep, batch {batch}"]
    plain_s_per_token = plain["ms_per_token"]["median"] / 1000
    forwards_per_backstep, seconds_per_backstep, time_in_forwards = [], [], []
    for t, new, info in zip(b1["seconds"], b1["new_tokens"], b1["info"]):
        if info["backsteps"]:
            extra = info["decode_forwards"] - (new - 1)
            forwards_per_backstep.append(extra / info["backsteps"])
            extra_s = t - new * plain_s_per_token
            seconds_per_backstep.append(extra_s / info["backsteps"])
            time_in_forwards.append(extra_s / info["backsteps"] / plain_s_per_token)
    # The loop's contract: decode forwards = final new tokens - 1 + removed tokens + deep rewinds, exactly.
    exact = [
        i["decode_forwards"] - (new - 1) == i["removed_tokens"] + i["deep_rewinds"]
        for new, i in zip(b1["new_tokens"], b1["info"])
    ]
    removed = [i["removed_tokens"] / i["backsteps"] for i in b1["info"] if i["backsteps"]]
    deep = [i["deep_rewinds"] / i["backsteps"] for i in b1["info"] if i["backsteps"]]
    tput1 = [n / t for t, n in zip(b1["seconds"], b1["new_tokens"])]
    tputn = [n / t for t, n in zip(bn["seconds"], bn["new_tokens"])]
    return {
        "backsteps_per_run_batch1": common.summary([i["backsteps"] for i in b1["info"]]),
        "backsteps_per_row_batchN": common.summary([i["backsteps"] / batch for i in bn["info"]]),
        "forwards_per_backstep": common.summary(forwards_per_backstep),
        "forwards_exact_runs": sum(exact),
        "runs": len(exact),
        "removed_per_backstep": common.summary(removed),
        "deep_per_backstep": common.summary(deep),
        "ms_per_backstep": common.summary([1000 * s for s in seconds_per_backstep]),
        "backstep_in_plain_tokens": common.summary(time_in_forwards),
        "tokens_per_s_batch1": common.summary(tput1),
        "tokens_per_s_batchN": common.summary(tputn),
        "batchN_over_batch1": common.summary([a / b for a, b in zip(tputn, tput1)]),
        "batchN_over_batch1_of_medians": common.summary(tputn)["median"] / common.summary(tput1)["median"],
        "cache_batch1": {
            "extra_slots": common.summary([i["extra_cache_slots"] for i in b1["info"]]),
            "extra_mib": common.summary([i["extra_cache_mib"] for i in b1["info"]]),
        },
        "cache_batchN": {
            "extra_slots": common.summary([i["extra_cache_slots"] for i in bn["info"]]),
            "extra_mib": common.summary([i["extra_cache_mib"] for i in bn["info"]]),
        },
    }


# -- driver -----------------------------------------------------------------------------------------------------
def _strip(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Results without the bulky per-run info lists of arms that have none."""
    return {k: {kk: vv for kk, vv in v.items() if kk != "info" or any(vv)} for k, v in results.items()}


def measure(settings: SpeedSettings) -> dict[str, Any]:
    """Run every arm; return the JSON-ready result."""
    torch.set_num_threads(settings.threads)
    common.quiet_transformers()
    model656, tokenizer = common.load_tinystories()
    prompt656 = tokenizer(PROMPT, return_tensors="pt").input_ids
    big = random_llama(settings)
    # A fixed 8-token prompt for the random model (the notes' 256-token / prompt-8 set-up).
    prompt_big = torch.arange(3, 11, dtype=torch.long)[None]
    eos656 = int(model656.config.eos_token_id)
    big_name = "random-15m" if not settings.smoke else "random-small (smoke)"

    out: dict[str, Any] = {
        "settings": asdict(settings),
        "environment": common.environment(),
        "models": {},
        "notes": [],
    }
    for name, model, prompt in (
        ("tinystories-656k", model656, prompt656),
        (big_name, big, prompt_big),
    ):
        print(f"[speed] {name}: {n_params(model):,} parameters, arms (a), (b), (e)")
        arms = processor_arms(model, prompt, eos656 if name == "tinystories-656k" else 2, settings)
        results = run_interleaved(arms, settings.repeats, settings.clock)
        add_ratios(results, "plain generate()")
        add_ratios(results, "bare forward loop", key="ratio_to_bare")
        add_ratios(results, NOOP, key="ratio_to_noop")
        out["models"][name] = {
            "parameters": n_params(model),
            "prompt_tokens": int(prompt.shape[1]),
            "new_tokens": settings.new_tokens,
            "arms": _strip(results),
            "vocab": int(model.config.vocab_size),
            "processor_us_per_call": processor_call_costs(
                model, prompt, eos656 if name == "tinystories-656k" else 2, settings
            ),
        }
        for arm, res in results.items():
            print(
                f"  {arm:45s} {res['ms_per_token']['median']:7.3f} ms/token  "
                f"x{res['ratio_to_plain']['of_medians']:.3f} plain  x{res['ratio_to_bare']['of_medians']:.3f} bare"
            )
    if has_backstep():
        print(f"[speed] tinystories-656k: backsteps with EOS events, arms (c), (d); {settings.batch=}")
        arms = backstep_arms(model656, prompt656, eos656, settings)
        results = run_interleaved(arms, settings.repeats, settings.clock, seed0=2000)
        out["backstep"] = {
            "model": "tinystories-656k",
            "new_tokens": settings.backstep_tokens,
            "n_remove": N_REMOVE,
            "batch": settings.batch,
            "arms": _strip(results),
            "cost": backstep_cost(results, settings.batch),
        }
        cost = out["backstep"]["cost"]
        print(
            f"  forwards/backstep {cost['forwards_per_backstep']['median']:.2f}, "
            f"ms/backstep {cost['ms_per_backstep']['median']:.2f}, "
            f"batch {settings.batch}/1 throughput x{cost['batchN_over_batch1_of_medians']:.2f}"
        )
    else:
        out["notes"].append("perpetual_logits.make_perpetual is not available: arms (b)-(d) were skipped")
    out["targets"] = evaluate_targets(out)
    return out


def evaluate_targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value (ratio of medians) and whether it is met."""
    rows: list[dict[str, Any]] = []
    for model_name, bound_key in (("tinystories-656k", "processor_656k"), ("random-15m", "processor_15m")):
        model = out["models"].get(model_name)
        if model is None:
            continue
        for arm, res in model["arms"].items():
            if arm == METHOD1 and BUILTIN in model["arms"]:
                # Method 1 does the built-in's masking (plus its records): it must cost no more.
                value = res["ms_per_token"]["median"] / model["arms"][BUILTIN]["ms_per_token"]["median"]
                rows.append({"what": f"(a) {arm} / {BUILTIN}, {model_name}", "value": value, "target": "<= 1.0"})
                rows[-1]["met"] = value <= 1.0
            if res["group"] == "a" and arm not in ("plain generate()", BUILTIN) and not arm.startswith("no-op"):
                value = res["ratio_to_plain"]["of_medians"]
                bound = TARGETS[bound_key]
                rows.append({"what": f"(a) {arm}, {model_name}", "value": value, "target": f"<= {bound}"})
                rows[-1]["met"] = value <= bound
            if res["group"] == "b":
                value = res["ratio_to_plain"]["of_medians"]
                bound = TARGETS["backstep_no_eos"]
                rows.append({"what": f"(b) {arm}, {model_name}", "value": value, "target": f"<= {bound}"})
                rows[-1]["met"] = value <= bound
    if "backstep" in out:
        cost = out["backstep"]["cost"]
        rows.append(
            {
                "what": "(c) runs whose extra forwards = removed tokens + deep re-feeds, batch 1",
                "value": cost["forwards_exact_runs"],
                "target": f"all {cost['runs']} runs",
                "met": cost["forwards_exact_runs"] == cost["runs"],
            }
        )
        value = cost["batchN_over_batch1_of_medians"]
        bound = TARGETS["batch8_over_batch1"]
        rows.append(
            {
                "what": f"(d) batch {out['backstep']['batch']} / batch 1 throughput, tinystories-656k",
                "value": value,
                "target": f">= {bound}",
                "met": value >= bound,
            }
        )
    return rows


def markdown(out: dict[str, Any]) -> str:
    """The speed section of RESULTS.md."""
    s = out["settings"]
    clock_name = "process CPU time" if s.get("clock", "cpu") == "cpu" else "wall-clock time"
    other_label = "wall" if s.get("clock", "cpu") == "cpu" else "CPU"
    lines = [
        "## Speed",
        "",
        f"CPU, {s['threads']} torch thread(s), batch 1 unless stated, {s['repeats']} interleaved repeats after one "
        f"warm-up per arm, `do_sample=True, top_k=0, temperature=1`. Arms (a), (b), (e): {s['new_tokens']} new "
        "tokens; `generate()` is given an EOS id outside the vocabulary (full-length runs, no EOS event, no "
        "backstep) while the processors act on the model's real EOS id 2. "
        f"Clock: **{clock_name}** (the other clock in the JSON). ms/token: median [min–max]; ratio: median ms/token "
        "over plain `generate()`'s in the same run, [min–max of the per-repeat paired ratios]. "
        "× no-op processor: the same against `generate()` with a processor that returns its scores unchanged, "
        "i.e. our processors' own cost once transformers' price for calling any user processor is paid.",
        "",
    ]
    for name, model in out["models"].items():
        lines += [
            f"### {name} ({model['parameters']:,} parameters, prompt {model['prompt_tokens']} tokens)",
            "",
            f"| arm | ms/token | {other_label} ms/token | × plain generate() | × no-op processor "
            "| × bare forwards | peak RSS (MiB) | peak RSS above start (MiB) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for arm, res in model["arms"].items():
            ms = res["ms_per_token"]
            rp, rb = res["ratio_to_plain"], res["ratio_to_bare"]
            other = res["ms_per_token_other_clock"]
            lines.append(
                f"| ({res['group']}) {arm} | {ms['median']:.3f} [{ms['min']:.3f}–{ms['max']:.3f}] "
                f"| {other['median']:.3f} "
                f"| {rp['of_medians']:.3f} [{rp['paired']['min']:.3f}–{rp['paired']['max']:.3f}] "
                f"| {res['ratio_to_noop']['of_medians']:.3f} "
                f"| {rb['of_medians']:.3f} | {res['peak_rss_mib']:.0f} | {res['peak_rss_above_start_mib']:.1f} |"
            )
        lines.append("")
        costs = model.get("processor_us_per_call")
        if costs:
            plain_ms = model["arms"]["plain generate()"]["ms_per_token"]["median"]
            lines += [
                f"Processor cost per call inside `generate()` (wall µs, median of 3 runs; vocab "
                f"{model.get('vocab', '?')}), and as a share of plain `generate()`'s {plain_ms:.3f} ms/token:",
                "",
                "| processor | µs per call | share of a token |",
                "|---|---:|---:|",
            ]
            for proc, us in costs.items():
                lines.append(f"| {proc} | {us:.1f} | {100 * us / 1000 / plain_ms:.1f} % |")
            lines.append("")
    if "backstep" in out:
        bs = out["backstep"]
        cost = bs["cost"]

        def fmt(summary: dict[str, float], digits: int = 2) -> str:
            return f"{summary['median']:.{digits}f} [{summary['min']:.{digits}f}–{summary['max']:.{digits}f}]"

        lines += [
            f"### Backsteps with EOS events ({bs['model']}, {bs['new_tokens']} new tokens, "
            f"`n_remove={bs['n_remove']}`, default `max_backsteps`)",
            "",
            "| quantity | median [min–max] |",
            "|---|---|",
            f"| backsteps per run, batch 1 | {fmt(cost['backsteps_per_run_batch1'], 1)} |",
            f"| backsteps per row, batch {bs['batch']} | {fmt(cost['backsteps_per_row_batchN'], 1)} |",
            f"| (c) extra forward passes per backstep | {fmt(cost['forwards_per_backstep'])} |",
            f"| (c) tokens removed per backstep | {fmt(cost['removed_per_backstep'])} |",
            f"| (c) deep rewinds (one re-fed token) per backstep | {fmt(cost['deep_per_backstep'])} |",
            f"| (c) time per backstep (ms) | {fmt(cost['ms_per_backstep'])} |",
            f"| (c) time per backstep, in plain-generate tokens | {fmt(cost['backstep_in_plain_tokens'])} |",
            f"| (d) tokens/s, batch 1 | {fmt(cost['tokens_per_s_batch1'], 0)} |",
            f"| (d) tokens/s, batch {bs['batch']} | {fmt(cost['tokens_per_s_batchN'], 0)} |",
            f"| (d) batch {bs['batch']} / batch 1 throughput | {fmt(cost['batchN_over_batch1'])} |",
            f"| extra KV-cache slots at the end, batch 1 | {fmt(cost['cache_batch1']['extra_slots'], 0)} |",
            f"| extra KV-cache slots at the end, batch {bs['batch']} | {fmt(cost['cache_batchN']['extra_slots'], 0)} |",
            f"| extra KV-cache MiB, batch {bs['batch']} | {fmt(cost['cache_batchN']['extra_mib'], 3)} |",
            "",
            "Extra forward passes per backstep = (decode forwards − (new tokens − 1)) / backsteps: the tokens the "
            "rewind removed, which must be generated again, plus one re-fed token for a *deep* rewind (deeper than "
            "the logits buffer). Time per backstep = (run time − new tokens × plain ms/token) / backsteps. Extra "
            "KV-cache slots = cache slots at the end − (final length − 1): slots of removed tokens that stay "
            "masked in a batch (at batch 1 they are cropped). In a batch every row waits for the slowest one: "
            "the run takes as many steps as the row with the most regenerated tokens, and attention runs over "
            "the masked slots too, so (d) falls as backsteps become more uneven across rows.",
            "",
        ]
    if out.get("targets"):
        lines += ["### Targets", "", "| target | measured | bound | met |", "|---|---|---|---|"]
        for row in out["targets"]:
            value = row["value"]
            shown = str(value) if isinstance(value, int) else f"{value:.3f}"
            lines.append(f"| {row['what']} | {shown} | {row['target']} | {'yes' if row['met'] else 'NO'} |")
        lines.append("")
    for note in out.get("notes", []):
        lines.append(f"Note: {note}")
    return "\n".join(lines) + "\n"


def _command(argv: Sequence[str] | None) -> str:
    return " ".join(["python benchmarks/speed.py", *(argv if argv is not None else sys.argv[1:])]).strip()


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: measure, write ``speed.json`` and ``speed.md``, regenerate RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="seconds-long run with tiny settings")
    parser.add_argument("--out", help="results folder (default benchmarks/results; a temp folder with --smoke)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats per arm")
    parser.add_argument("--new-tokens", type=int, help="new tokens per run for arms (a), (b), (e)")
    parser.add_argument("--threads", type=int, help="torch threads (default 1)")
    parser.add_argument(
        "--clock", choices=("cpu", "wall"), default="cpu", help="time ratios by process CPU time or wall clock"
    )
    parser.add_argument("--no-report", action="store_true", help="do not regenerate RESULTS.md")
    parser.add_argument("--recorded-command", help=argparse.SUPPRESS)  # run_all.py records its own command
    args = parser.parse_args(argv)
    settings = SpeedSettings.smoke_settings() if args.smoke else SpeedSettings()
    for field in ("repeats", "new_tokens", "threads"):
        value = getattr(args, field)
        if value is not None:
            if value < 1:
                parser.error(f"--{field.replace('_', '-')} must be >= 1, got {value}")
            setattr(settings, field, value)
    settings.clock = args.clock
    out_dir = common.out_dir(args.out, args.smoke)
    result = measure(settings)
    result["command"] = args.recorded_command or _command(argv)
    common.write_json(out_dir / "speed.json", result)
    (out_dir / "speed.md").write_text(markdown(result))
    print(f"[speed] wrote {out_dir / 'speed.json'} and {out_dir / 'speed.md'}")
    if not args.no_report:
        from benchmarks import report

        report.write_report(out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
