"""The blog's "why models stop" figures for a chat model: SmolLM2-135M-Instruct answering chat prompts.

Run ``python benchmarks/why_chat_models_stop.py`` (a few minutes on 2 cores). It samples baseline answers
(chat template applied, T 0.7, top-p 0.9, until the end-of-turn token or ``--max-new-tokens``), computes the
per-step statistics of the model's raw distribution (T 1, no truncation) with the library's
:func:`~perpetual_logits.step_stats`, and writes into ``benchmarks/results/why-chat-models-stop/``:

* ``blockwise.png`` / ``blockwise_end.png`` — EOS probability, its information content, entropy and
  varentropy per block of 25 tokens, counted from the start / lined up at the end-of-turn token;
* ``eos_window.png`` — the top-10 next tokens at the last five steps of one answer;
* ``analysis.json`` / ``analysis.md`` — the numbers behind them, with the answers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common
from benchmarks.quality_chat import PROMPTS, chat_prompt_ids, load
from perpetual_logits import StepStats, blockwise, eos_window, plot_blockwise, plot_eos_window, step_stats
from perpetual_logits.analysis import aligned_means

EXTRA_PROMPTS = (
    "What are the benefits of regular exercise?",
    "Describe the water cycle.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "What is a black hole?",
    "How do I make a good first impression?",
    "Summarize the plot of Romeo and Juliet.",
    "What should I pack for a weekend hiking trip?",
)
DEFAULT_OUT = common.REPO / "benchmarks" / "results" / "why-chat-models-stop"
NAMES = ("eos_prob", "info", "entropy", "varentropy")


def sample(
    model: Any, tokenizer: Any, prompts: Sequence[str], seed: int, max_new_tokens: int
) -> tuple[list[StepStats], list[dict[str, Any]], list[Any] | None]:
    """One left-padded batch of answers: per-row statistics, the answers, and the EOS window of the first
    answer that ended."""
    eos = int(model.generation_config.eos_token_id)
    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    width = max(len(p) for p in ids)
    input_ids = torch.tensor([[eos] * (width - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
        top_k=0,
        max_new_tokens=max_new_tokens,
        pad_token_id=eos,
        return_dict_in_generate=True,
        output_logits=True,
    )
    answers, lengths = [], []
    for row, prompt in enumerate(prompts):
        new = out.sequences[row, width:].tolist()
        ended = eos in new
        steps = new.index(eos) + 1 if ended else len(new)  # the step that produced EOS included
        lengths.append(steps)
        text = tokenizer.decode(new[: steps - 1 if ended else steps], skip_special_tokens=True)
        answers.append({"prompt": prompt, "seed": seed, "new_tokens": steps - ended, "ended": ended, "text": text})
    stats = step_stats(out.logits, eos, lengths=lengths)
    window = None
    first = next((r for r, a in enumerate(answers) if a["ended"]), None)
    if first is not None:
        window = eos_window(out.logits, tokenizer, k=10, last=5, row=first, length=lengths[first])
        answers[first]["eos_window"] = True
    return stats, answers, window


def end_summary(stats: Sequence[StepStats], block_size: int, final_blocks: int) -> dict[str, Any]:
    """Mean block statistics over the final ``final_blocks`` blocks of the answers long enough to have them."""
    eligible = [s for s in stats if len(s) >= final_blocks * block_size]
    summary: dict[str, Any] = {"answers": len(eligible), "blocks": list(range(-final_blocks, 0))}
    if not eligible:
        return summary
    tails = [blockwise(s[-final_blocks * block_size :], block_size) for s in eligible]
    for name in NAMES:
        summary[name] = aligned_means([getattr(t, name) for t in tails])
    summary["answers_eos_prob_up"] = sum(t.eos_prob[-1] > t.eos_prob[0] for t in tails)
    summary["answers_entropy_down"] = sum(t.entropy[-1] < t.entropy[0] for t in tails)
    return summary


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the figures and numbers")
    parser.add_argument("--seeds", type=int, default=1, help="batches of all prompts (default 1)")
    parser.add_argument("--max-new-tokens", type=int, default=320)
    parser.add_argument("--block-size", type=int, default=25)
    parser.add_argument("--final-blocks", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, help="use only the first N prompts (a quick check)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = load()
    eos = int(model.generation_config.eos_token_id)
    prompts = (*PROMPTS, *EXTRA_PROMPTS)[: args.prompts]
    stats: list[StepStats] = []
    answers: list[dict[str, Any]] = []
    window = None
    for seed in range(args.seeds):
        batch_stats, batch_answers, batch_window = sample(model, tokenizer, prompts, seed, args.max_new_tokens)
        stats += batch_stats
        answers += batch_answers
        window = window or batch_window
    ended = [i for i, a in enumerate(answers) if a["ended"]]
    figure_stats = [stats[i] for i in ended] or stats
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "SmolLM2-135M-Instruct"
    plot_blockwise(
        figure_stats,
        out / "blockwise.png",
        block_size=args.block_size,
        title=f"Block-wise statistics, {len(figure_stats)} chat answers that ended — {name}",
    )
    plot_blockwise(
        figure_stats,
        out / "blockwise_end.png",
        block_size=args.block_size,
        align="end",
        title=f"The same answers lined up at the end-of-turn token — {name}",
    )
    if window:
        first = next(a for a in answers if a.get("eos_window"))
        plot_eos_window(
            window,
            out / "eos_window.png",
            highlight={eos},
            title=f"Top-10 next tokens before <|im_end|> — {first['prompt']!r}",
        )
    summary = end_summary([stats[i] for i in ended], args.block_size, args.final_blocks)
    payload = {
        "model": name,
        "settings": vars(args),
        "distribution": "raw model logits (output_logits): temperature 1, no top-k/top-p",
        "answers": [{**a, "stats": s.to_dict()} for a, s in zip(answers, stats)],
        "final_blocks": summary,
        "eos_window": [w.to_dict() for w in window] if window else [],
        "seconds": time.perf_counter() - start,
        "environment": common.environment(),
    }
    (out / "analysis.json").write_text(json.dumps(_finite(payload), indent=1) + "\n", encoding="utf-8")
    lengths = sorted(a["new_tokens"] for a in answers if a["ended"])
    md = [
        f"# Why a chat model stops: {name}",
        "",
        f"Command: `{' '.join(['python benchmarks/why_chat_models_stop.py', *(argv or sys.argv[1:])])}`",
        "",
        f"{len(answers)} answers to {len(prompts)} chat prompts (chat template, T 0.7, top-p 0.9, "
        f"max_new_tokens={args.max_new_tokens}); {len(ended)} ended with <|im_end|>, after "
        f"{', '.join(map(str, lengths))} tokens. Statistics of the raw distribution (T 1), bits.",
        "",
    ]
    if summary.get("answers"):
        k = args.final_blocks
        md += [
            f"Final {k} blocks of {args.block_size} tokens, the {summary['answers']} ended answers that have them:",
            "",
            "| block | " + " | ".join(NAMES) + " |",
            "|---|" + "---|" * len(NAMES),
        ]
        for i, block in enumerate(summary["blocks"]):
            md.append(f"| {block} | " + " | ".join(f"{summary[n][i]:.4g}" for n in NAMES) + " |")
        md += [
            "",
            f"EOS probability higher in block -1 than in block -{k} in {summary['answers_eos_prob_up']} of "
            f"{summary['answers']} answers; entropy lower in {summary['answers_entropy_down']} of "
            f"{summary['answers']}.",
            "",
        ]
    if window:
        md += ["Top-3 at the last five steps of the first ended answer:", ""]
        for w in window:
            top = ", ".join(f"{t!r} {p:.3f}" for t, p in zip(w.tokens[:3], w.probs[:3]))
            md.append(f"- step {w.offset}: {top}")
        md.append("")
    md += ["## Answers", ""]
    for answer in answers:
        text = answer["text"].replace("\n", " ⏎ ")
        state = "ended" if answer["ended"] else "cut"
        md.append(f"- *{answer['prompt']}* ({answer['new_tokens']} tokens, {state}): {text}")
    (out / "analysis.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print(f"[why_chat_models_stop] wrote {out} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
