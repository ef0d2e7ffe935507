"""Length following on SmolLM2-135M-Instruct: chat prompts that ask for N words, and what each method writes.

Run (the full measurement; SmolLM2 is ~60 ms/token on 2 cores, so this is long)::

    python benchmarks/length_following.py --targets 80 150 250 400 --topics 6 --seeds 2 --threads 2

or ``--smoke`` (one target, one topic, a few tokens). Results: ``<out>/length_following.json``, ``.md`` and
``.png``.

Every prompt is "Write about N words about <topic>." through the chat template (assistant turn opened); the
prompts of one target run as one left-padded batch, ``torch.manual_seed(seed)`` before each arm, sampling at T 0.7,
top-p 0.9. The limit is ``max_new_tokens = 2 * TOKENS_PER_WORD * N`` (twice the target). Arms (:data:`ARMS`):

* baseline -- plain ``generate()``;
* min_new_tokens -- transformers' ``min_new_tokens = TOKENS_PER_WORD * N`` (EOS masked until then);
* Method 4 -- ``BackstepConfig.method4(10, 2.0)``: rewinds every end, to the limit;
* length mode -- ``BackstepConfig.chat(min_words=N)``: rewinds ends before N words, accepts the model's own end
  after, lands before the limit;
* length mode + DRY -- the same with :class:`~perpetual_logits.DRYLogitsProcessor` (non-adjacent repeats).

Per arm: words written (LongBench-Write count), the LongBench-Write length score S_l, the share of answers that end
naturally (the model's end of turn right after a complete sentence, not a cut at the limit), chat closing phrases
and spelled end tokens per 1k tokens, rep-4 and distinct-2 over the first ``W`` tokens of every answer (``W`` = the
shortest answer of that prompt across arms, so all arms are judged on equal windows), and the judge of
``quality_chat.py`` (the model's own bits per character) on each answer's last ``--window`` tokens -- its ending.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import perpetual_logits as pl
from benchmarks import common
from benchmarks.quality_chat import CHAT_CLOSING_PHRASES, CHAT_END_TOKENS, _count, _literal, load, token_nll
from perpetual_logits.analysis.metrics import ngrams, per_thousand, rep_n
from perpetual_logits.dry import DRYLogitsProcessor
from perpetual_logits.text.boundaries import count_words, ends_sentence
from perpetual_logits.text.endings import ENDING_PHRASES

TOPICS = (
    "the sea",
    "how bread is made",
    "a day in a small village",
    "why people keep pets",
    "the history of the bicycle",
    "autumn in the mountains",
    "learning to play the piano",
    "a city at night",
)
TOKENS_PER_WORD = 1.3  # SmolLM2 tokens per English word, roughly: sets min_new_tokens and the limit
N_REMOVE = 10
PEAK = 2.0


@dataclass
class Context:
    model: Any
    tokenizer: Any
    eos: int
    words: int


Arm = Callable[[Context], dict[str, Any]]

ARMS: dict[str, Arm] = {
    "baseline": lambda ctx: {"backstep": False},
    "min_new_tokens": lambda ctx: {"backstep": False, "min_new_tokens": round(TOKENS_PER_WORD * ctx.words)},
    "Method 4 (to the limit)": lambda ctx: {"backstep": pl.BackstepConfig.method4(N_REMOVE, PEAK)},
    "length mode": lambda ctx: {"backstep": pl.BackstepConfig.chat(min_words=ctx.words), "tokenizer": ctx.tokenizer},
    "length mode + DRY": lambda ctx: {
        "backstep": pl.BackstepConfig.chat(min_words=ctx.words),
        "tokenizer": ctx.tokenizer,
        "logits_processor": [DRYLogitsProcessor.from_tokenizer(ctx.tokenizer)],
    },
}


@dataclass
class Settings:
    targets: tuple[int, ...] = (80, 150, 250, 400)
    topics: int = 6
    seeds: int = 1
    temperature: float = 0.7
    top_p: float = 0.9
    window: int = 48
    threads: int = 1
    smoke: bool = False
    arms: tuple[str, ...] = tuple(ARMS)


@dataclass
class Answer:
    arm: str
    target: int
    topic: str
    seed: int
    prompt_ids: list[int]
    new_ids: list[int]
    ended: bool  # the model's own end of turn (not the limit)
    events: int


def length_score(requested: int, written: int) -> float:
    """LongBench-Write's S_l: 100 at the requested length, falling off faster for too short than too long."""
    if written <= 0:
        return 0.0
    if written > requested:
        return 100 * max(0.0, 1 - (written / requested - 1) / 3)
    return 100 * max(0.0, 1 - (requested / written - 1) / 2)


def prompt_ids(tokenizer: Any, topic: str, words: int) -> list[int]:
    messages = [{"role": "user", "content": f"Write about {words} words about {topic}."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def generate(name: str, ctx: Context, topics: Sequence[str], seed: int, settings: Settings, limit: int) -> list[Answer]:
    tokenizer = ctx.tokenizer
    prompts = [prompt_ids(tokenizer, t, ctx.words) for t in topics]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ctx.eos
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    out = ctx.model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        do_sample=True,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=0,
        max_new_tokens=limit,
        pad_token_id=pad,
        eos_token_id=ctx.eos,
        return_dict_in_generate=True,
        **ARMS[name](ctx),
    )
    events = getattr(out, "backstep_events", None)
    answers = []
    for row, (topic, prompt) in enumerate(zip(topics, prompts)):
        new = out.sequences[row, width:].tolist()
        ended = ctx.eos in new
        new = new[: new.index(ctx.eos)] if ended else new
        while new and new[-1] == pad:
            new.pop()
        answers.append(Answer(name, ctx.words, topic, seed, prompt, new, ended, len(events[row]) if events else 0))
    return answers


def evaluate(answers: list[Answer], model: Any, tokenizer: Any, window: int) -> dict[str, Any]:
    closings = [*CHAT_CLOSING_PHRASES, *_literal(ENDING_PHRASES)]
    end_tokens = _literal(CHAT_END_TOKENS)
    special = set(tokenizer.all_special_ids)
    # equal windows: per (target, topic, seed), the shortest answer across arms
    shortest: dict[tuple[int, str, int], int] = {}
    for a in answers:
        key = (a.target, a.topic, a.seed)
        shortest[key] = min(shortest.get(key, len(a.new_ids)), len(a.new_ids))
    arms: dict[str, Any] = {}
    for name in dict.fromkeys(a.arm for a in answers):
        arm = [a for a in answers if a.arm == name]
        texts = [tokenizer.decode(a.new_ids, skip_special_tokens=True) for a in arm]
        words = [count_words(t) for t in texts]
        total = max(1, sum(len(a.new_ids) for a in arm))
        windows = [a.new_ids[: shortest[(a.target, a.topic, a.seed)]] for a in arm]
        bigrams = [g for w in windows for g in ngrams(w, 2)]
        natural = [a.ended and ends_sentence(t) for a, t in zip(arm, texts)]
        nats = chars = 0.0
        rows = [a for a in arm if len(a.new_ids) >= 2]
        for a, nll in zip(rows, token_nll(model, [a.prompt_ids + a.new_ids for a in rows], tokenizer.pad_token_id)):
            p, n = len(a.prompt_ids), len(a.new_ids)
            first = max(0, n - window)
            nats += sum(nll[p + first - 1 : p + n - 1])
            chars += len(tokenizer.decode(a.new_ids, skip_special_tokens=True)) - len(
                tokenizer.decode(a.new_ids[:first], skip_special_tokens=True)
            )
        arms[name] = {
            "answers": len(arm),
            "words": common.summary(words),
            "S_l": sum(length_score(a.target, w) for a, w in zip(arm, words)) / len(arm),
            "natural_endings": sum(natural) / len(arm),
            "closings_per_1k": per_thousand(sum(_count(closings, t) for t in texts), total),
            "end_tokens_per_1k": per_thousand(
                sum(_count(end_tokens, t) for t in texts) + sum(i in special for a in arm for i in a.new_ids), total
            ),
            "rep4_equal_window": sum(rep_n(w, 4) for w in windows) / len(arm),
            "distinct2_equal_window": len(set(bigrams)) / len(bigrams) if bigrams else 1.0,
            "ending_bpc": nats / (chars * math.log(2)) if chars else None,
            "rewinds_per_answer": sum(a.events for a in arm) / len(arm),
            "per_target": {
                str(n): sum(length_score(n, w) for a, w in zip(arm, words) if a.target == n)
                / max(1, sum(a.target == n for a in arm))
                for n in sorted({a.target for a in arm})
            },
            "samples": [t[-300:] for t in texts[:3]],
        }
    return arms


def markdown(out: dict[str, Any]) -> str:
    s = out["settings"]
    lines = [
        "# Length following (SmolLM2-135M-Instruct)",
        "",
        f"Targets {s['targets']} words, {s['topics']} topics, {s['seeds']} seed(s), T {s['temperature']}, top-p "
        f"{s['top_p']}, limit 2 x {TOKENS_PER_WORD} x N tokens. `{out['command']}`"
        + (" (SMOKE: not evidence)" if s["smoke"] else ""),
        "",
        "| arm | words mean (min–max) | S_l | natural endings | closings /1k | end tokens /1k | rep-4 (eq. window) "
        "| distinct-2 (eq. window) | ending bits/char | rewinds / answer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in out["arms"].items():
        w = r["words"]
        bpc = f"{r['ending_bpc']:.3f}" if r["ending_bpc"] is not None else "–"
        lines.append(
            f"| {name} | {w['mean']:.0f} ({w['min']:.0f}–{w['max']:.0f}) | {r['S_l']:.1f} | "
            f"{100 * r['natural_endings']:.0f}% | {r['closings_per_1k']:.2f} | {r['end_tokens_per_1k']:.2f} | "
            f"{r['rep4_equal_window']:.3f} | {r['distinct2_equal_window']:.3f} | {bpc} | "
            f"{r['rewinds_per_answer']:.1f} |"
        )
    lines += ["", "S_l per target:", ""]
    for name, r in out["arms"].items():
        lines.append(f"- {name}: " + ", ".join(f"N={n}: {v:.1f}" for n, v in r["per_target"].items()))
    return "\n".join(lines) + "\n"


def figure(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(out["arms"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [
        ("S_l", "LongBench-Write S_l", 1.0),
        ("natural_endings", "natural endings (%)", 100.0),
        ("rep4_equal_window", "rep-4 at equal windows", 1.0),
    ]
    for ax, (key, title, scale) in zip(axes, panels):
        ax.barh(names, [out["arms"][n][key] * scale for n in names], color="#4c72b0")
        ax.set_title(title)
        ax.invert_yaxis()
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def combine(outs: Sequence[dict[str, Any]]) -> str:
    """One report for runs made one target at a time (each target is an independent batch: runs split by target
    give the same answers as one run with every target)."""
    outs = sorted(outs, key=lambda o: o["settings"]["targets"][0])
    names = list(outs[0]["arms"])
    lines = [
        "# Length following (SmolLM2-135M-Instruct), per target",
        "",
        "Commands: " + "; ".join(f"`{o['command']}`" for o in outs),
        "",
        "| N | arm | words mean (min–max) | S_l | natural endings | end tokens /1k | rep-4 (eq. window) "
        "| distinct-2 | ending bits/char | rewinds / answer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outs:
        n = o["settings"]["targets"][0]
        for name in names:
            r = o["arms"][name]
            w = r["words"]
            bpc = f"{r['ending_bpc']:.3f}" if r["ending_bpc"] is not None else "–"
            lines.append(
                f"| {n} | {name} | {w['mean']:.0f} ({w['min']:.0f}–{w['max']:.0f}) | {r['S_l']:.1f} | "
                f"{100 * r['natural_endings']:.0f}% | {r['end_tokens_per_1k']:.2f} | {r['rep4_equal_window']:.3f} | "
                f"{r['distinct2_equal_window']:.3f} | {bpc} | {r['rewinds_per_answer']:.1f} |"
            )
    lines += ["", "Means over the targets (each target weighs the same):", ""]
    lines += ["| arm | S_l | natural endings | rep-4 (eq. window) |", "|---|---|---|---|"]
    for name in names:
        rs = [o["arms"][name] for o in outs]
        lines.append(
            f"| {name} | {sum(r['S_l'] for r in rs) / len(rs):.1f} | "
            f"{100 * sum(r['natural_endings'] for r in rs) / len(rs):.0f}% | "
            f"{sum(r['rep4_equal_window'] for r in rs) / len(rs):.3f} |"
        )
    return "\n".join(lines) + "\n"


def combined_figure(outs: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outs = sorted(outs, key=lambda o: o["settings"]["targets"][0])
    targets = [o["settings"]["targets"][0] for o in outs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [("S_l", "LongBench-Write S_l", 1.0), ("natural_endings", "natural endings (%)", 100.0)]
    panels.append(("rep4_equal_window", "rep-4 at equal windows", 1.0))
    for ax, (key, title, scale) in zip(axes, panels):
        for name in outs[0]["arms"]:
            ax.plot(targets, [o["arms"][name][key] * scale for o in outs], marker="o", label=name)
        ax.set_title(title)
        ax.set_xlabel("requested words N")
        ax.set_xticks(targets)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(settings: Settings) -> dict[str, Any]:
    torch.set_num_threads(settings.threads)
    model, tokenizer = load()
    tokenizer.padding_side = "left"
    model = pl.make_perpetual(model, tokenizer=tokenizer)
    eos = int(tokenizer.eos_token_id)
    topics = TOPICS[: settings.topics]
    answers: list[Answer] = []
    started = time.time()
    for words in settings.targets:
        limit = 12 if settings.smoke else round(2 * TOKENS_PER_WORD * words)
        ctx = Context(model, tokenizer, eos, words)
        for seed in range(settings.seeds):
            for name in settings.arms:
                answers += generate(name, ctx, topics, seed, settings, limit)
    return {
        "settings": asdict(settings),
        "arms": evaluate(answers, model, tokenizer, settings.window),
        "seconds": time.time() - started,
        "environment": common.environment(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", type=int, nargs="+", default=[80, 150, 250, 400], help="requested words N")
    parser.add_argument("--topics", type=int, default=6, help=f"prompts per target (1-{len(TOPICS)})")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--window", type=int, default=48, help="judge window (tokens) at each answer's end")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="one target, one topic, 12 tokens (not evidence)")
    parser.add_argument(
        "--combine", nargs="+", default=None, metavar="JSON", help="report runs of one target each together"
    )
    args = parser.parse_args(argv)
    if args.combine:
        import json

        outs = [json.loads(Path(f).read_text()) for f in args.combine]
        if any(len(o["settings"]["targets"]) != 1 for o in outs):
            parser.error("--combine takes runs of one target each")
        folder = common.out_dir(args.out, False)
        (folder / "length_following.md").write_text(combine(outs))
        combined_figure(outs, folder / "length_following.png")
        print(combine(outs))
        return 0
    if not 1 <= args.topics <= len(TOPICS):
        parser.error(f"--topics must be in [1, {len(TOPICS)}]")
    if any(n < 1 for n in args.targets):
        parser.error("--targets must be positive")
    settings = Settings(
        targets=(args.targets[0],) if args.smoke else tuple(args.targets),
        topics=1 if args.smoke else args.topics,
        seeds=args.seeds,
        window=4 if args.smoke else args.window,
        threads=args.threads,
        smoke=args.smoke,
        arms=tuple(args.arms),
    )
    out = run(settings)
    out["command"] = "python benchmarks/length_following.py " + " ".join(argv if argv is not None else sys.argv[1:])
    folder = common.out_dir(args.out, args.smoke)
    common.write_json(folder / "length_following.json", out)
    (folder / "length_following.md").write_text(markdown(out))
    figure(out, folder / "length_following.png")
    print(markdown(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
