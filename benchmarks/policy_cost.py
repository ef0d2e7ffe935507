"""What the rewind policy costs when no rewind happens: phrases and loops checked on every token.

TinyStories-656K, batches 1 and 32 (``--batches``), ``min_new_tokens = max_new_tokens`` so EOS is masked and no
rewind happens; per decoding step, in one run with the arms interleaved (each repeat runs every arm once, from a
rotating start; one untimed warm-up each), on the process's CPU time (one torch thread):

* ``dynamic`` -- ``BackstepConfig.dynamic(10)`` (the reference: EOS rule only);
* ``chat`` -- ``BackstepConfig.chat()`` (chat endings and regexes, loop rewinds);
* ``ban_N`` -- ``BackstepConfig.dynamic(10, ban_phrases=<N random 2-3-word phrases>)`` (``--phrases``, default
  10,000; words drawn with a fixed seed from the tokenizer's alphabetic pieces).

Reported: ms per step (median over repeats), the ratio of medians to ``dynamic`` and the min-max of the
per-repeat paired ratios (goal: <= 1.10 for ``chat`` and ``ban_N``, issue 21), and the time to build the
policy from scratch (its phrase matchers) per arm -- built once, then reused by every ``generate()`` call with the
same phrases and tokenizer, so the timed runs do not include it.

    python benchmarks/policy_cost.py                         # the measurement (quiet machine)
    python benchmarks/policy_cost.py --smoke                 # seconds: tiny sizes, results to a temp folder
    python benchmarks/policy_cost.py --tokens 64 --repeats 5 --phrases 10000 --batches 1,32
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common
from perpetual_logits import BackstepConfig, make_perpetual
from perpetual_logits.backstep import policy as policy_module
from perpetual_logits.backstep.policy import RewindPolicy


def random_phrases(tokenizer: Any, count: int, seed: int = 0) -> list[str]:
    """``count`` distinct phrases of 2-3 words drawn from the tokenizer's alphabetic pieces (the leading-space
    marker stripped; word pieces like "amaz" are words here too, which only makes matches rarer)."""
    words = sorted(
        {p.lstrip("▁Ġ") for p in tokenizer.get_vocab() if p.lstrip("▁Ġ").isalpha() and len(p.lstrip("▁Ġ")) > 2}
    )
    if len(words) ** 2 < 2 * count:
        raise ValueError(f"the tokenizer has {len(words)} usable words: too few for {count} distinct phrases")
    rng = random.Random(seed)
    phrases: set[str] = set()
    while len(phrases) < count:
        phrases.add(" ".join(rng.choice(words) for _ in range(rng.choice((2, 3)))))
    return sorted(phrases)


def configs(tokenizer: Any, phrases: int) -> dict[str, BackstepConfig]:
    return {
        "dynamic": BackstepConfig.dynamic(10),
        "chat": BackstepConfig.chat(),
        f"ban_{phrases}": BackstepConfig.dynamic(10, ban_phrases=random_phrases(tokenizer, phrases)),
    }


def build_seconds(config: BackstepConfig, tokenizer: Any, vocab: int) -> float:
    """Time to build the policy from scratch (its phrase matchers; later calls reuse them)."""
    policy_module._MATCHERS.pop(tokenizer, None)
    start = time.perf_counter()
    RewindPolicy(config, [2], vocab, tokenizer)
    return time.perf_counter() - start


def measure(batch: int, tokens: int, repeats: int, phrases: int, model: Any, tokenizer: Any) -> dict[str, Any]:
    prompt = tokenizer(["Once upon a time"] * batch, return_tensors="pt")
    arms = configs(tokenizer, phrases)
    vocab = int(model.config.vocab_size)

    rewinds: dict[str, int] = {name: 0 for name in arms}

    def run(config: BackstepConfig, seed: int, name: str = "") -> float:
        torch.manual_seed(seed)
        start = time.process_time()
        out = model.generate(
            **prompt,
            do_sample=True,
            top_k=0,
            max_new_tokens=tokens,
            min_new_tokens=tokens,  # EOS masked: no rewind happens, only the checks run
            backstep=config,
            tokenizer=tokenizer,
            return_dict_in_generate=True,
        )
        seconds = time.process_time() - start
        if name:
            rewinds[name] += out.backstep_stats.backsteps  # a loop or a random phrase may still rewind: reported
        return seconds / tokens  # per step

    built = {name: build_seconds(config, tokenizer, vocab) for name, config in arms.items()}
    for config in arms.values():
        run(config, 0)  # warm-up, untimed (and the phrase matchers are built: generate() calls reuse them)
    per_step: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for r in range(repeats):
        k = r % len(names)
        for name in [*names[k:], *names[:k]]:
            per_step[name].append(run(arms[name], 1000 + r, name))
    ref = per_step["dynamic"]
    result: dict[str, Any] = {}
    for name, times in per_step.items():
        paired = [a / b for a, b in zip(times, ref)]
        result[name] = {
            "ms_per_step": 1000 * statistics.median(times),
            "ratio_of_medians": statistics.median(times) / statistics.median(ref),
            "paired_ratio_min": min(paired),
            "paired_ratio_max": max(paired),
            "build_seconds": built[name],
            "rewinds_in_timed_runs": rewinds[name],
        }
    return result


def markdown(out: dict[str, Any]) -> str:
    lines = [
        f"Policy cost, TinyStories-656K, {out['tokens']} tokens, {out['repeats']} repeats, CPU time per step "
        "(no rewind: EOS masked by min_new_tokens). Ratios to `BackstepConfig.dynamic(10)` in the same run.",
        "",
        "| batch | arm | ms/step | ratio (of medians) | paired min-max | policy build s | rewinds |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch, arms in out["batches"].items():
        for name, r in arms.items():
            lines.append(
                f"| {batch} | {name} | {r['ms_per_step']:.2f} | {r['ratio_of_medians']:.2f} | "
                f"{r['paired_ratio_min']:.2f}-{r['paired_ratio_max']:.2f} | {r['build_seconds']:.2f} | "
                f"{r['rewinds_in_timed_runs']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=96, help="new tokens per run (default 96)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per arm (default 5)")
    parser.add_argument("--phrases", type=int, default=10_000, help="random banned phrases (default 10,000)")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default 1,32)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, results to a temporary folder")
    parser.add_argument("--out", help="results folder (default benchmarks/results; a temp folder with --smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tokens, args.repeats, args.phrases, args.batches = 4, 1, 20, "1,2"
    torch.set_num_threads(1)
    model, tokenizer = common.load_tinystories()
    model = make_perpetual(model, tokenizer=tokenizer)
    batches = [int(b) for b in args.batches.split(",")]
    out: dict[str, Any] = {
        "tokens": args.tokens,
        "repeats": args.repeats,
        "phrases": args.phrases,
        "environment": common.environment(),
        "batches": {str(b): measure(b, args.tokens, args.repeats, args.phrases, model, tokenizer) for b in batches},
    }
    folder = common.out_dir(args.out, args.smoke)
    common.write_json(folder / "policy_cost.json", out)
    (folder / "policy_cost.md").write_text(markdown(out))
    print(markdown(out))
    print(f"results: {folder / 'policy_cost.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
