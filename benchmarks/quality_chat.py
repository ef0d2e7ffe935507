"""Chat quality benchmark: how long, how repetitive and how coherent each method's answers are (SmolLM2).

Run ``python benchmarks/quality_chat.py`` (about 10 minutes on 2 cores), or ``--smoke`` (under a minute).
Results: ``<out>/quality_chat.json`` and ``<out>/quality_chat.md``.

Model: SmolLM2-135M-Instruct (``../shared/models/smollm2-135m-instruct``, a GGUF converted once to a cached
safetensors folder by :func:`perpetual_logits.app.chat_model.load_chat_model`). Every prompt goes through the
tokenizer's chat template with ``add_generation_prompt=True``; all prompts of a seed run as one left-padded
batch, with ``torch.manual_seed(seed)`` set before each arm, sampling at T 0.7, top-p 0.9 (what a new user
would try). The baseline stops at the end-of-turn token; every other arm is meant to write to
``max_new_tokens``.

Arms live in :data:`ARMS`: a name and a function returning the extra ``generate()`` kwargs. Adding one is one
dict entry, e.g. ``ARMS["chat preset"] = lambda ctx: {"backstep": BackstepConfig.chat(...)}``.

The judge is the model itself; see :data:`DEFINITIONS` for what it measures and what it cannot.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import perpetual_logits as pl
from benchmarks import common
from perpetual_logits.analysis.metrics import line_repeats, ngrams, per_thousand, rep_n
from perpetual_logits.dry import DRYLogitsProcessor
from perpetual_logits.text.endings import CHAT_CLOSING_PHRASES, CHAT_END_TOKENS, ENDING_PHRASES
from perpetual_logits.text.repetition import find_line_loop, find_token_loop, newline_token_ids

# Prompts a user asks a chat assistant. Several have short natural answers: that is where a chat model
# "stops too soon", and it leaves room after the natural end for the judge window.
PROMPTS = (
    "Explain how rainbows form.",
    "Write a short poem about autumn.",
    "What is the capital of France?",
    "Give me three tips for learning a new language.",
    "Write a haiku about the sea.",
    "How does a refrigerator work?",
    "What is photosynthesis? Answer in two sentences.",
    "Tell me a short story about a lost dog.",
)
N_REMOVE = 10
PEAK = 2.0
WINDOW = 48  # judge window, in tokens


@dataclass
class Context:
    """What an arm may need to build its kwargs."""

    model: Any
    tokenizer: Any
    eos: int


Arm = Callable[[Context], dict[str, Any]]

ARMS: dict[str, Arm] = {
    "baseline": lambda ctx: {"backstep": False},
    "Method 1: EOS suppression": lambda ctx: {
        "backstep": False,
        "logits_processor": [pl.SuppressEOSLogitsProcessor(ctx.eos)],
    },
    "Method 2: post-EOS resampling": lambda ctx: {
        "backstep": False,
        "logits_processor": [pl.PostEOSResamplingLogitsProcessor(ctx.eos, schedule=pl.LinearDecay(PEAK, N_REMOVE))],
    },
    "Method 3: backstep": lambda ctx: {"backstep": pl.BackstepConfig(n_remove=N_REMOVE)},
    "Method 4: backstep + dynamic T": lambda ctx: {"backstep": pl.BackstepConfig.method4(N_REMOVE, PEAK)},
    "Method 4 + repetition_penalty=1.3": lambda ctx: {
        "backstep": pl.BackstepConfig.method4(N_REMOVE, PEAK),
        "repetition_penalty": 1.3,
    },
    "Method 4 + no_repeat_ngram_size=4": lambda ctx: {
        "backstep": pl.BackstepConfig.method4(N_REMOVE, PEAK),
        "no_repeat_ngram_size": 4,
    },
    "Method 4 + DRY": lambda ctx: {
        "backstep": pl.BackstepConfig.method4(N_REMOVE, PEAK),
        "logits_processor": [DRYLogitsProcessor.from_tokenizer(ctx.tokenizer)],
    },
    "Method 4 + chat endings rewound": lambda ctx: {
        "backstep": pl.BackstepConfig.method4(N_REMOVE, PEAK, end_phrases="chat"),
        "tokenizer": ctx.tokenizer,
    },
    "Method 4 + loop rewinds": lambda ctx: {
        "backstep": pl.BackstepConfig.method4(N_REMOVE, PEAK, loops=pl.LoopDetection()),
        "tokenizer": ctx.tokenizer,
    },
    "chat preset (BackstepConfig.chat())": lambda ctx: {
        "backstep": pl.BackstepConfig.chat(),
        "tokenizer": ctx.tokenizer,
    },
}
"""The arms: name -> function of a :class:`Context` returning ``generate()`` kwargs on top of the shared
sampling settings. ``backstep=False`` runs plain ``generate()`` on the perpetual model."""

DEFINITIONS = {
    "new tokens": "generated tokens per answer, the final end-of-turn token excluded; mean (min–max).",
    "stopped early": "answers that ended with the end-of-turn token before max_new_tokens.",
    "closings /1k": "chat closing phrases (perpetual_logits.text.endings.CHAT_CLOSING_PHRASES: 'In conclusion', "
    "'I hope this helps', 'Let me know if ...', 'Feel free to ask', sign-offs) plus ENDING_PHRASES ('The End', "
    "...), per 1,000 generated tokens, in text decoded with skip_special_tokens=True.",
    "end tokens /1k": "end-of-turn and turn-opening tokens written out (CHAT_END_TOKENS as text, e.g. "
    "'<|im_end|>' spelled in pieces) plus real special tokens other than the final EOS (e.g. <|im_start|> "
    "opening a made-up user turn), per 1,000 generated tokens.",
    "rep-4": "1 − unique 4-grams / all 4-grams of an answer's token ids, mean over answers (grows with length).",
    "distinct-2": "unique bigrams / all bigrams pooled over all answers of the arm.",
    "line repeats": "perpetual_logits.analysis.metrics.line_repeats: share of an answer's lines (>= 8 characters) that "
    "copy an earlier line, mean over answers.",
    "loops /1k": "loops found by perpetual_logits.text.repetition with its defaults, scanning each answer token by "
    "token as the generation loop would: token loops (find_token_loop) + line loops (find_line_loop), per "
    "1,000 tokens. On the baseline's natural answers these are false positives (or the model's own loops).",
    "judge bpc": "SmolLM2-135M-Instruct's own bits per character (T = 1, no truncation) on a window of "
    f"{WINDOW} tokens right after the point where the baseline (same prompt, same seed) stopped, conditioned "
    "on the chat prompt and everything the arm wrote before; pooled over answers (total NLL / total "
    "characters). Only answers whose baseline stopped early enough to leave a full window count; every arm "
    "is scored on the same answers at the same context length.",
    "natural bpc": "the same judge on the baseline's own last tokens before it stopped (the window of up to "
    f"{WINDOW} tokens ending at the end-of-turn token, the token itself not scored): the reference line.",
    "judge limits": "The judge is the generating model itself: it rates text by how typical it is for this "
    "model, not by whether it is true or useful. Loops and copies of the prompt read as very predictable "
    "(low bpc), so read bpc together with rep-4 and line repeats. Natural answers are sampled at T 0.7 / "
    "top-p 0.9 and scored at T 1, and their reference window is the end of an answer, where the model is "
    "most certain; a continuation after the natural end is expected to score higher. No independent chat "
    "judge is available offline (stories260K knows only TinyStories).",
}


@dataclass
class ChatSettings:
    """What one run measures."""

    prompts: tuple[str, ...] = PROMPTS
    seeds: int = 1
    max_new_tokens: int = 160
    temperature: float = 0.7
    top_p: float = 0.9
    window: int = WINDOW
    threads: int = 1
    smoke: bool = False
    arms: tuple[str, ...] = field(default_factory=lambda: tuple(ARMS))

    @classmethod
    def smoke_settings(cls) -> ChatSettings:
        return cls(prompts=PROMPTS[:2], max_new_tokens=12, window=4, smoke=True)


@dataclass
class Answer:
    """One generated answer."""

    prompt: str
    seed: int
    prompt_ids: list[int]
    new_ids: list[int]
    ended: bool
    events: int = 0


def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as a user turn, through the tokenizer's chat template, assistant turn opened."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def load(path: Path | None = None) -> tuple[Any, Any]:
    from perpetual_logits.app.chat_model import load_chat_model

    common.quiet_transformers()
    return load_chat_model(path or common.models_dir() / "smollm2-135m-instruct")


def generate_arm(
    name: str, ctx: Context, prompt_ids: list[list[int]], seed: int, settings: ChatSettings
) -> list[Answer]:
    """All prompts of one seed as one left-padded batch under arm ``name``."""
    tokenizer = ctx.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ctx.eos
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    kwargs = ARMS[name](ctx)
    torch.manual_seed(seed)
    out = ctx.model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        do_sample=True,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=0,
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=pad,
        eos_token_id=ctx.eos,
        return_dict_in_generate=True,
        **kwargs,
    )
    events = getattr(out, "backstep_events", None)
    answers = []
    for row, prompt in enumerate(prompt_ids):
        new = out.sequences[row, width:].tolist()
        ended = ctx.eos in new
        if ended:
            new = new[: new.index(ctx.eos)]
        n_events = len(events[row]) if events else 0
        answers.append(Answer(settings.prompts[row], seed, prompt, new, ended, n_events))
    return answers


def _count(patterns: Sequence[Any], text: str) -> int:
    return sum(1 for p in patterns for _ in p.finditer(text))


def _literal(strings: Sequence[str]) -> list[Any]:
    import regex

    return [regex.compile(regex.escape(s)) for s in strings]


def loops_found(answer: Answer, newlines: frozenset[int]) -> tuple[int, int]:
    """(token loops, line loops) found scanning the answer token by token with the default settings."""
    row = answer.prompt_ids + answer.new_ids
    start = len(answer.prompt_ids)
    tokens = lines = 0
    for n in range(start + 1, len(row) + 1):
        tokens += find_token_loop(row[:n], start) is not None
        lines += find_line_loop(row[:n], newlines, start) is not None
    return tokens, lines


@torch.no_grad()
def token_nll(model: Any, rows: list[list[int]], pad: int) -> list[list[float]]:
    """Per-token NLL (nats) under ``model`` at T 1: ``nll[r][i]`` is for ``rows[r][i + 1]``."""
    out: list[list[float]] = []
    for row in rows:  # one at a time: rows differ a lot in length and this is a small part of the run
        ids = torch.tensor([row])
        logits = model(input_ids=ids).logits[0, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        out.append((-logp.gather(1, ids[0, 1:, None])[:, 0]).tolist())
    return out


def judge(
    model: Any, tokenizer: Any, answers: dict[str, list[Answer]], window: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Bits/char of each arm in the window after the baseline's stop, and the natural reference."""
    base = {(a.prompt, a.seed): a for a in answers["baseline"]}
    # Every arm must have a full window after the baseline's stop on the same (prompt, seed).
    eligible = {
        key
        for key, a in base.items()
        if a.ended
        and all(
            len(b.new_ids) >= len(a.new_ids) + window
            for name, arm in answers.items()
            if name != "baseline"
            for b in arm
            if (b.prompt, b.seed) == key
        )
    }
    scores: dict[str, Any] = {}
    for name, arm in answers.items():
        nats = chars = 0.0
        rows = [a for a in arm if (a.prompt, a.seed) in eligible]
        if name == "baseline":
            continue
        nll = token_nll(model, [a.prompt_ids + a.new_ids for a in rows], tokenizer.pad_token_id)
        for a, row_nll in zip(rows, nll):
            stop = len(base[(a.prompt, a.seed)].new_ids)
            p = len(a.prompt_ids)
            nats += sum(row_nll[p + stop - 1 : p + stop + window - 1])
            before = tokenizer.decode(a.new_ids[:stop], skip_special_tokens=True)
            after = tokenizer.decode(a.new_ids[: stop + window], skip_special_tokens=True)
            chars += len(after) - len(before)
        scores[name] = {
            "bpc": nats / (chars * math.log(2)) if chars else None,
            "answers": len(rows),
            "chars": int(chars),
        }
    # Reference: the baseline's own last `window` tokens before it ended (its end-of-turn token not scored).
    nats = chars = 0.0
    naturals = [a for a in answers["baseline"] if a.ended and len(a.new_ids) >= 2]
    nll = token_nll(model, [a.prompt_ids + a.new_ids for a in naturals], tokenizer.pad_token_id)
    for a, row_nll in zip(naturals, nll):
        p, n = len(a.prompt_ids), len(a.new_ids)
        first = max(0, n - window)
        nats += sum(row_nll[p + first - 1 : p + n - 1])
        chars += len(tokenizer.decode(a.new_ids, skip_special_tokens=True)) - len(
            tokenizer.decode(a.new_ids[:first], skip_special_tokens=True)
        )
    reference = {"bpc": nats / (chars * math.log(2)) if chars else None, "answers": len(naturals), "chars": int(chars)}
    scores["baseline"] = {"bpc": None, "answers": 0, "chars": 0}
    return scores, reference


def evaluate(answers: dict[str, list[Answer]], tokenizer: Any, settings: ChatSettings) -> dict[str, Any]:
    closings = [*CHAT_CLOSING_PHRASES, *_literal(ENDING_PHRASES)]
    end_tokens = _literal(CHAT_END_TOKENS)
    special = set(tokenizer.all_special_ids)
    newlines = newline_token_ids(tokenizer)
    arms: dict[str, Any] = {}
    for name, arm in answers.items():
        texts = [tokenizer.decode(a.new_ids, skip_special_tokens=True) for a in arm]
        total = sum(len(a.new_ids) for a in arm)
        n_closings = sum(_count(closings, t) for t in texts)
        n_end = sum(_count(end_tokens, t) for t in texts) + sum(i in special for a in arm for i in a.new_ids)
        loops = [loops_found(a, newlines) for a in arm]
        bigrams = [g for a in arm for g in ngrams(a.new_ids, 2)]
        lengths = [len(a.new_ids) for a in arm]
        arms[name] = {
            "answers": len(arm),
            "new_tokens": common.summary(lengths),
            "stopped_early": sum(a.ended for a in arm),
            "closings_per_1k": per_thousand(n_closings, total),
            "end_tokens_per_1k": per_thousand(n_end, total),
            "rep4": sum(rep_n(a.new_ids, 4) for a in arm) / len(arm),
            "distinct2": len(set(bigrams)) / len(bigrams) if bigrams else 1.0,
            "line_repeats": sum(line_repeats(t) for t in texts) / len(arm),
            "token_loops_per_1k": per_thousand(sum(t for t, _ in loops), total),
            "line_loops_per_1k": per_thousand(sum(line for _, line in loops), total),
            "answers_with_loops": sum(t + line > 0 for t, line in loops),
            "interventions_per_answer": sum(a.events for a in arm) / len(arm),
            "samples": texts,
            "new_ids": [a.new_ids for a in arm],
        }
    return arms


def markdown(out: dict[str, Any]) -> str:
    s = out["settings"]
    ref = out["reference"]
    lines = [
        "## Chat quality (SmolLM2-135M-Instruct)",
        "",
        f"{len(s['prompts'])} chat prompts × {s['seeds']} seed(s), chat template applied, one left-padded batch "
        f"per arm, `do_sample=True, temperature={s['temperature']}, top_p={s['top_p']}, top_k=0, "
        f"max_new_tokens={s['max_new_tokens']}`; backstep arms use n_remove={N_REMOVE}, peak {PEAK}. "
        f"Run: {out['environment']['date']}, {out['seconds']:.0f} s, {out['environment']['torch_threads']} torch "
        f"thread(s), load average at start {out['environment']['load_average_at_start']}.",
        "",
        "| arm | new tokens mean (min–max) | stopped early | closings /1k | end tokens /1k | rep-4 | distinct-2 "
        "| line repeats | loops /1k (token + line) | answers with loops | interventions | judge bpc (answers, chars) |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for name, m in out["arms"].items():
        nt = m["new_tokens"]
        j = out["judge"][name]
        judge_cell = f"{j['bpc']:.3f} ({j['answers']}, {j['chars']:,})" if j["bpc"] is not None else "—"
        lines.append(
            f"| {name} | {nt['mean']:.0f} ({nt['min']:.0f}–{nt['max']:.0f}) | {m['stopped_early']}/{m['answers']} "
            f"| {m['closings_per_1k']:.2f} | {m['end_tokens_per_1k']:.2f} | {m['rep4']:.3f} | {m['distinct2']:.3f} "
            f"| {m['line_repeats']:.3f} | {m['token_loops_per_1k']:.1f} + {m['line_loops_per_1k']:.1f} "
            f"| {m['answers_with_loops']} | {m['interventions_per_answer']:.1f} | {judge_cell} |"
        )
    ref_cell = f"{ref['bpc']:.3f} ({ref['answers']} answers, {ref['chars']:,} chars)" if ref["bpc"] else "—"
    lines += ["", f"Reference: judge bits/char on the natural answers' last tokens = **{ref_cell}**.", ""]
    lines += ["### Definitions", ""]
    lines += [f"- **{k}**: {v}" for k, v in out["definitions"].items()]
    lines += ["", "### Samples", "", f"First answer ({s['prompts'][0]!r}) of each arm; ⏎ is a newline.", ""]
    for name, m in out["arms"].items():
        text = m["samples"][0].replace("\n", " ⏎ ")
        lines.append(f"- *{name}*: {text[:700]}{'…' if len(text) > 700 else ''}")
    return "\n".join(lines) + "\n"


def run(settings: ChatSettings, model_path: Path | None = None) -> dict[str, Any]:
    torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    model, tokenizer = load(model_path)
    perpetual = pl.make_perpetual(model)
    eos = int(model.generation_config.eos_token_id)
    ctx = Context(perpetual, tokenizer, eos)
    prompt_ids = [chat_prompt_ids(tokenizer, p) for p in settings.prompts]
    answers: dict[str, list[Answer]] = {name: [] for name in settings.arms}
    for seed in range(settings.seeds):
        for name in settings.arms:
            t0 = time.perf_counter()
            answers[name] += generate_arm(name, ctx, prompt_ids, seed, settings)
            print(f"[quality_chat] seed {seed} {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    arms = evaluate(answers, tokenizer, settings)
    scores, reference = judge(model, tokenizer, answers, settings.window)
    return {
        "settings": asdict(settings),
        "environment": common.environment(),
        "definitions": DEFINITIONS,
        "arms": arms,
        "judge": scores,
        "reference": reference,
        "seconds": time.perf_counter() - start,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="under a minute: 2 prompts, 12 tokens")
    parser.add_argument("--out", help="results folder (default benchmarks/results; a temp folder with --smoke)")
    parser.add_argument("--seeds", type=int, help="seeds (default 1)")
    parser.add_argument("--max-new-tokens", type=int, help="tokens per answer (default 160)")
    parser.add_argument("--threads", type=int, help="torch threads (default 1)")
    parser.add_argument("--arms", nargs="+", help=f"subset of the arms (default all: {list(ARMS)})")
    parser.add_argument("--model", help="SmolLM2 folder or GGUF (default ../shared/models/smollm2-135m-instruct)")
    parser.add_argument("--no-report", action="store_true", help="accepted for run_all.py; no report is written")
    parser.add_argument("--recorded-command", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = ChatSettings.smoke_settings() if args.smoke else ChatSettings()
    for name in ("seeds", "max_new_tokens", "threads"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            setattr(settings, name, value)
    if args.arms:
        unknown = [a for a in args.arms if a not in ARMS]
        if unknown:
            parser.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
        settings.arms = ("baseline", *[a for a in args.arms if a != "baseline"])
    model_path = Path(args.model) if args.model else common.models_dir() / "smollm2-135m-instruct"
    if not model_path.exists():
        print(f"[quality_chat] skipped: {model_path} is absent (set PERPETUAL_LOGITS_MODELS or pass --model)")
        return 0
    out_dir = common.out_dir(args.out, args.smoke)
    result = run(settings, model_path)
    result["command"] = args.recorded_command or " ".join(
        ["python benchmarks/quality_chat.py", *(argv or sys.argv[1:])]
    )
    common.write_json(out_dir / "quality_chat.json", result)
    (out_dir / "quality_chat.md").write_text(markdown(result))
    print(f"[quality_chat] wrote {out_dir / 'quality_chat.json'} and .md ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
