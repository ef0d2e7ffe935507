"""Per-step cost of the vLLM logits processor's early trigger and widening, side by side in one run.

No engine: the processor is called on random logits of a batch, as vLLM's V1 sampler calls it, for
``--steps`` steps per arm. Arms (every request carries the driver's settings after a rewind):

* ``schedule``: the temperature schedule alone (what the driver sent before early triggers and widening);
* ``early``: + ``EarlyTrigger(8, eos_threshold=0.1)`` (P(EOS) per row per step);
* ``early, entropy``: + ``entropy_slope`` (the entropy too);
* ``widen top-k``: + ``Widening(top_k=200)`` around top-k 50 (the processor truncates; vLLM does not);
* ``widen top-k + top-p``: + ``Widening(top_k=200, top_p=0.99)`` around top-k 50, top-p 0.95 (a sort per step);
* ``vllm top-k`` / ``vllm top-k + top-p`` (with vLLM installed): vLLM's own truncation of the same batch,
  which the widen arms replace (the driver turns it off for their requests).

Ratios are to the ``schedule`` arm, measured in the same run (median of ``--repeats`` rounds). Run on a quiet
machine: ``python benchmarks/vllm_processor_cost.py --batch 32 --vocab 49152 --steps 50``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

import perpetual_logits as pl
import perpetual_logits.vllm as plv

SCHEDULE = pl.LinearDecay(2.0, 10)


def _settings(early: pl.EarlyTrigger | None, widen: pl.Widening | None, configured: pl.Truncation, row: int) -> Any:
    ours: dict[str, Any] = {"eos": [2], "schedule": {**plv.schedule_table(SCHEDULE).to_data(), "started": 0}}
    if early is not None:
        ours["early"] = plv.EarlySettings.of(early, f"row-{row}", 0).to_data()
    if widen is not None:
        ours["widen"] = plv.WideningSettings.of(widen, SCHEDULE, configured).to_data()
    return {plv.EXTRA_ARGS_KEY: ours}


def processor_arm(
    batch: int, early: pl.EarlyTrigger | None, widen: pl.Widening | None, configured: pl.Truncation
) -> Callable[[torch.Tensor], None]:
    """A processor holding ``batch`` requests; returns one step as a callable."""
    proc = plv.PerpetualLogitsProcessor(None, torch.device("cpu"), False)
    outputs: list[list[int]] = []
    for row in range(batch):
        params = SimpleNamespace(extra_args=_settings(early, widen, configured, row), seed=None)
        outputs.append([])
        proc.update_state(SimpleNamespace(removed=[], added=[(row, params, [1], outputs[-1])], moved=[]))

    def step(logits: torch.Tensor) -> None:
        proc.apply(logits)
        for out in outputs:
            out.append(3)

    return step


def vllm_arm(top_k: int, top_p: float | None) -> Callable[[torch.Tensor], None] | None:
    try:
        from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch
    except ImportError:
        return None

    def step(logits: torch.Tensor) -> None:
        k = torch.full((logits.shape[0],), top_k)
        p = None if top_p is None else torch.full((logits.shape[0],), top_p)
        apply_top_k_top_p_pytorch(logits, k, p, allow_cpu_sync=True)

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    top_k = pl.Truncation(top_k=50, temperature=0.8)
    top_kp = pl.Truncation(top_k=50, top_p=0.95, temperature=0.8)
    early = pl.EarlyTrigger(8, eos_threshold=0.1)
    arms: dict[str, Callable[[torch.Tensor], None] | None] = {
        "schedule": processor_arm(args.batch, None, None, top_k),
        "early": processor_arm(args.batch, early, None, top_k),
        "early, entropy": processor_arm(args.batch, pl.EarlyTrigger(8, 0.1, entropy_slope=0.5), None, top_k),
        "widen top-k": processor_arm(args.batch, None, pl.Widening(top_k=200), top_k),
        "widen top-k + top-p": processor_arm(args.batch, None, pl.Widening(top_k=200, top_p=0.99), top_kp),
        "vllm top-k": vllm_arm(50, None),
        "vllm top-k + top-p": vllm_arm(50, 0.95),
    }
    logits = torch.randn(args.batch, args.vocab) * 3
    times: dict[str, list[float]] = {name: [] for name, arm in arms.items() if arm is not None}
    for _ in range(args.repeats):  # rounds interleave the arms, so a busy moment hits them all alike
        for name, arm in arms.items():
            if arm is None:
                continue
            arm(logits.clone())  # warm-up
            start = time.perf_counter()
            for _ in range(args.steps):
                arm(logits.clone())
            times[name].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["schedule"])
    print(f"batch {args.batch}, vocabulary {args.vocab}, {args.steps} steps x {args.repeats} rounds")
    print("| arm | ms per step | ratio to schedule |\n|---|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1e3:.3f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
