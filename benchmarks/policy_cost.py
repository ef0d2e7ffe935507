"""What the rewind policy costs when no rewind happens: phrases and loops checked on every token.

TinyStories-656K, batches 1 and 32 (``--batches``), per decoding step, in one run with the arms interleaved (each
repeat runs every arm once, from a rotating start; one untimed warm-up each), on the process's CPU time (one torch
thread):

* ``dynamic`` -- ``BackstepConfig.method4(10)`` (the reference: EOS rule only);
* ``chat`` -- ``BackstepConfig.chat()`` (chat endings and regexes, loop rewinds);
* ``ban_N`` -- ``BackstepConfig.method4(10, ban_phrases=<N random 2-3-word phrases>)`` (``--phrases``, default
  10,000; words drawn with a fixed seed from the tokenizer's alphabetic pieces).

**No rewind happening** (issue 21's condition), kept honestly: every rule still reads every token, the text simply
never completes what they look for.

* EOS is masked by ``min_new_tokens = max_new_tokens``, and -- in every arm alike, by ``suppress_tokens`` -- the
  pieces that could spell this model's end marker as text (every piece holding "<", "|" or ">": the model writes
  "<|end_story|>" out of "<|", "end", ... when EOS is masked, and the chat endings would then rewind 1-4 of 32
  rows per run). A vectorized mask, the same work in every arm.
* Seeds are screened: a seed is used only when an untimed run of the ``chat`` arm with it rewinds nothing (its
  loops and endings, "The end." say, never fire); ``--screen`` tries at most that many seeds per timed repeat.
* The banned phrases are drawn from the tokenizer's words, then every phrase that occurs in the text of the
  screened runs or of the reference arm's runs with those seeds (case folded, any spacing) is dropped and another
  drawn, so none can match those runs (the screening's chat runs alone were not enough: the landing cuts their
  last words, which the other arms write).
* **Text the policy has not seen.** The policy keeps answers for text it has read (the phrase matchers' per
  text piece, the tokenizer's text per token pair), and a seed's text is read in the screening and in earlier
  repeats. So before each timed run every kept answer is forgotten and learned again from the other seeds'
  texts (replayed through the policy, untimed): the timed run reads new text, with answers kept from about
  12,000 tokens of other text, as in a process that served a few requests before. (Before this, the timed runs
  re-read seen text, which made ``chat`` look about 1 us per row per token cheaper.)
* Checked, not assumed: no rule changes a token until it rewinds (the schedule starts at the first rewind), so
  with one seed every arm must write the very same tokens. ``same_tokens`` reports whether they did in every
  timed run, and ``rewinds`` the rewinds the timed runs made (both must read true / 0 for a valid result).

Reported per arm: ms per step (median over repeats; the JSON keeps every repeat's), the ratio of medians to
``dynamic`` (goal: <= 1.10 for ``chat`` and ``ban_N``, issue 21) and the median and min-max of the per-repeat paired
ratios (each repeat's step over the reference's of that repeat, run back to back: the machine's drift between
repeats cancels out, which the ratio of medians does not; the goal is judged on the ratio of medians), ms
per decode forward (a run without rewinds makes tokens - 1 of them), the rewinds and whether the tokens matched, and
the time to build the policy from scratch (its phrase matchers) -- built once, then reused by every ``generate()``
call with the same phrases and tokenizer, so the timed runs do not include it (nor the per-tokenizer caches of token
texts, which the warm-up fills as any earlier request would in a serving process). ``--allow-rewinds`` skips the
screening and the suppression (the earlier measurement, where rewinds happen and their forwards are part of the cost).

``policy alone``: the same tokens replayed through the policy without the model (``after_token`` and ``settle``
per row per token, the fastest of the repeats, each reading the text as new, as the timed runs do): the rules'
own cost, steadier than the end-to-end ratio.

Where the time went (sampled profiles, line profiles and timers around the policy inside real runs, batch 32,
chat preset, no rewind): the rules' per-row Python is about all of the difference to ``method4``. It is spread over
the phrase stream, the loop rule, the landing's reading of each token, its cut at the limit with the returned
cache's realignment, and settling the hold-back (1-3 points each). Inside a run the same calls cost two to four
times what the replay measures: each forward evicts the rows' state from the core's caches (a replay with a forward
between its steps doubles). Replayed on new text the chat preset costs about 5 us per row per token at batch 32,
10,000 phrases about 4 (tenth session).

    python benchmarks/policy_cost.py                         # the measurement (quiet machine)
    python benchmarks/policy_cost.py --smoke                 # seconds: tiny sizes, results to a temp folder
    python benchmarks/policy_cost.py --tokens 96 --repeats 5 --phrases 10000 --batches 1,32
    python benchmarks/policy_cost.py --gpu --batches 32      # issue 21's CUDA goal (see below)

``--gpu``: the same arms on CUDA with a model of 1B parameters, as issue 21 asks when a GPU is lent: a Llama of
TinyLlama-1.1B's shape with random weights (no model hub here) in bfloat16, with TinyStories-656K's vocabulary and
tokenizer, timed on the wall clock between synchronizations (the GPU's work is not the process's CPU time). Random
weights would write token soup, on which the rules cost about twice what they cost on stories; so the random model is
made to write TinyStories-656K's own text: the seeds are screened and each seed's rows written by TinyStories-656K
first (on the CPU), and in every arm alike a processor (:class:`ScriptedTokens`) leaves the random model only that
row's next token. Its forward is a 1B forward; the rules read stories. ``--model random-tiny`` runs the same path on
a CPU with a tiny random Llama (to test it).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common
from perpetual_logits import BackstepConfig, make_perpetual
from perpetual_logits.backstep import landing
from perpetual_logits.backstep import policy as policy_module
from perpetual_logits.backstep.policy import RewindPolicy
from perpetual_logits.backstep.rules import PhraseRule
from perpetual_logits.protocol import RowView
from perpetual_logits.text.phrase_stream import PhraseIndex
from perpetual_logits.text.text_stream import TokenTexts

FIRST_SEED = 1000
#: Random Llamas with TinyStories-656K's vocabulary: (hidden, intermediate, layers, heads, key-value heads).
RANDOM_SHAPES = {"random-1b": (2048, 5632, 22, 32, 4), "random-tiny": (64, 128, 2, 4, 2)}  # TinyLlama-1.1B's; tiny


def load_model(name: str, device: str) -> tuple[Any, Any, Any]:
    """(model, tokenizer, writer) for ``--model``: TinyStories-656K (no writer), or a random Llama of
    :data:`RANDOM_SHAPES` with its vocabulary, special ids and tokenizer (bfloat16 on CUDA, float32 on a CPU), on
    ``device``, and TinyStories-656K on the CPU as the writer of its text (see ScriptedTokens)."""
    stories, tokenizer = common.load_tinystories()
    model, writer = stories, None
    if name in RANDOM_SHAPES:
        from transformers import LlamaConfig, LlamaForCausalLM

        hidden, intermediate, layers, heads, kv_heads = RANDOM_SHAPES[name]
        reference = stories.config
        config = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=reference.vocab_size,
            max_position_embeddings=2048,
            bos_token_id=reference.bos_token_id,
            eos_token_id=reference.eos_token_id,
            pad_token_id=reference.pad_token_id,
        )
        torch.manual_seed(0)
        model, writer = LlamaForCausalLM(config).eval(), stories
    elif name != "tinystories":
        raise SystemExit(f"--model must be tinystories, {' or '.join(RANDOM_SHAPES)}; got {name!r}")
    if device == "cuda" and name in RANDOM_SHAPES:
        return model.to(device, torch.bfloat16), tokenizer, writer
    return model.to(device), tokenizer, writer


def _clock(device: torch.device) -> float:
    """Seconds: the process's CPU time on a CPU; on CUDA the wall clock once the GPU's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def _plain(text: str) -> str:
    """``text`` case folded with its whitespace runs as one space (how the matcher compares, loosely)."""
    return " ".join(text.split()).lower()


def random_phrases(tokenizer: Any, count: int, seed: int = 0, avoid: Iterable[str] = ()) -> list[str]:
    """``count`` distinct phrases of 2-3 words drawn from the tokenizer's alphabetic pieces (the leading-space
    marker stripped; word pieces like "amaz" are words here too, which only makes matches rarer), none of which
    occurs in any of the texts ``avoid`` (compared case folded, as plain substrings: stricter than the matcher's
    word boundaries)."""
    words = sorted(
        {p.lstrip("▁Ġ") for p in tokenizer.get_vocab() if p.lstrip("▁Ġ").isalpha() and len(p.lstrip("▁Ġ")) > 2}
    )
    if len(words) ** 2 < 2 * count:
        raise ValueError(f"the tokenizer has {len(words)} usable words: too few for {count} distinct phrases")
    texts = [_plain(text) for text in avoid]
    rng = random.Random(seed)
    phrases: set[str] = set()
    tries = 0
    while len(phrases) < count:
        tries += 1
        if tries > 100 * count:
            raise ValueError(f"could not draw {count} phrases that occur in none of the texts")
        phrase = " ".join(rng.choice(words) for _ in range(rng.choice((2, 3))))
        if not any(phrase.lower() in text for text in texts):
            phrases.add(phrase)
    return sorted(phrases)


def marker_piece_ids(tokenizer: Any) -> list[int]:
    """Ids of the pieces that can spell an end marker such as "<|end_story|>" as text: any piece holding "<",
    "|" or ">" (TinyStories text has none of these characters otherwise)."""
    return sorted(i for piece, i in tokenizer.get_vocab().items() if any(c in piece for c in "<|>"))


def configs(tokenizer: Any, phrases: int, avoid: Iterable[str] = ()) -> dict[str, BackstepConfig]:
    return {
        "dynamic": BackstepConfig.method4(10),
        "chat": BackstepConfig.chat(),
        # The preset's rules alone: the landing (issue 16) reads each row's text too, and may cut a row back at
        # the limit (so its tokens are compared as a prefix).
        "chat_no_landing": BackstepConfig.chat(landing=False),
        f"ban_{phrases}": BackstepConfig.method4(10, ban_phrases=random_phrases(tokenizer, phrases, avoid=avoid)),
    }


def build_seconds(config: BackstepConfig, tokenizer: Any, vocab: int) -> float:
    """Time to build the policy from scratch (its phrase matchers; later calls reuse them). Garbage is collected
    first: a full collection that earlier work left due would otherwise land in the build, which allocates many
    objects (0.19 s of a 0.23 s build of 10,000 phrases, after a batch's 30 repeats)."""
    policy_module._MATCHERS.pop(tokenizer, None)
    gc.collect()
    start = time.perf_counter()
    RewindPolicy(config, [2], vocab, tokenizer)
    return time.perf_counter() - start


_RESPELLED = 4  # tokens at the end of a row cut back by the landing that may differ (a sentence end spelled anew)


def _agree(first: torch.Tensor, other: torch.Tensor, prompt_length: int, padding: frozenset[int]) -> bool:
    """Whether two runs wrote the same tokens: row by row, up to where the shorter one was cut back at the limit
    by the landing (a cut row ends in padding, the model's pad or EOS id, which EOS masking never samples; its
    last few tokens may be a sentence end spelled anew, see ``cut_point``)."""
    for a, b in zip(first.tolist(), other.tolist()):
        kept = [len(_unpadded(a, padding)), len(_unpadded(b, padding))]
        # A cut row's last tokens may be respelled even where its length is unchanged (in a run of a few tokens,
        # such as --smoke, that can be all of them: then only the prompts are compared).
        n = max(min(kept) - _RESPELLED, prompt_length)
        if a[:n] != b[:n]:
            return False
    return True


def _unpadded(ids: list[int], padding: frozenset[int]) -> list[int]:
    end = len(ids)
    while end and ids[end - 1] in padding:
        end -= 1
    return ids[:end]


class ScriptedTokens(LogitsProcessor):
    """Leaves each row one choice, its next token in ``rows`` (prompt included): a random model then writes the
    text another model wrote. Rows must not rewind (the seeds are screened) and share one length.

    Args:
        rows (`torch.Tensor`): (batch, length) token ids, on the scores' device.
    """

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen = self.rows[:, input_ids.shape[-1]]
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter(1, chosen[:, None], 0.0)  # type: ignore[return-value]


class Runner:
    """One ``generate()`` of the benchmark's setting: a batch of the same prompt, sampled, EOS masked."""

    def __init__(self, model: Any, tokenizer: Any, batch: int, tokens: int, suppress: list[int] | None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prompt = tokenizer(["Once upon a time"] * batch, return_tensors="pt").to(model.device)
        self.tokens = tokens
        self.suppress = suppress
        # Per seed, the rows the model is made to write (see ScriptedTokens); a seed without: what it samples.
        self.script: dict[int, torch.Tensor] = {}

    def __call__(self, config: BackstepConfig, seed: int) -> tuple[float, Any]:
        """(seconds, the generate() output) of one run: CPU seconds, or wall seconds on CUDA (see _clock)."""
        torch.manual_seed(seed)
        extra: dict[str, Any] = {"suppress_tokens": self.suppress} if self.suppress else {}
        if seed in self.script:
            extra["logits_processor"] = [ScriptedTokens(self.script[seed])]
        start = _clock(self.model.device)
        out = self.model.generate(
            **self.prompt,
            do_sample=True,
            top_k=0,
            max_new_tokens=self.tokens,
            min_new_tokens=self.tokens,  # EOS masked
            backstep=config,
            tokenizer=self.tokenizer,
            return_dict_in_generate=True,
            **extra,
        )
        return _clock(self.model.device) - start, out


def screen_seeds(run: Runner, repeats: int, tries: int) -> tuple[list[int], list[str], int]:
    """Seeds whose untimed run of ``BackstepConfig.chat()`` rewinds nothing, the texts those runs wrote, and the
    seeds tried. Fewer than ``repeats`` found: the found ones are used in turn (none: an error)."""
    chat = BackstepConfig.chat()
    seeds: list[int] = []
    texts: list[str] = []
    tried = 0
    while len(seeds) < repeats and tried < tries * repeats:
        seed = FIRST_SEED + tried
        tried += 1
        _, out = run(chat, seed)
        if out.backstep_stats.rewinds == 0:
            seeds.append(seed)
            texts += run.tokenizer.batch_decode(out.sequences)
    if not seeds:
        raise SystemExit(f"no seed out of {tried} gave a run of the chat preset without rewinds: raise --screen")
    return [seeds[r % len(seeds)] for r in range(repeats)], texts, tried


def forget_seen_text(config: BackstepConfig, tokenizer: Any, vocab: int) -> None:
    """Drop every answer kept for text already seen: the phrase matchers' (see
    :class:`~perpetual_logits.text.phrase_stream.PhraseIndex`) and the tokenizer's texts of token pairs (the
    text stream's and the landing's). The texts of single tokens stay: they are facts about the vocabulary."""
    for rule in RewindPolicy(config, [2], vocab, tokenizer).rules:
        if isinstance(rule, PhraseRule):
            PhraseIndex.of(rule.matcher).forget()
    TokenTexts.of(tokenizer).forget()
    landing._PAIR_FACTS.get(tokenizer, {}).clear()
    landing._FOLLOW_FACTS.get(tokenizer, []).clear()


def replay(
    config: BackstepConfig, rows: list[list[int]], prompt: int, tokenizer: Any, vocab: int, strict: bool = True
) -> float:
    """CPU seconds to replay the new tokens of ``rows`` through a fresh policy, as the HF loop calls it
    (:meth:`RewindPolicy.after_token` per row, then :meth:`RewindPolicy.settle` per row, per token). ``strict``:
    a rewind is an error (the tokens were screened to rewind nothing); else it is ignored (only learning)."""
    batch, length = len(rows), len(rows[0])
    policy = RewindPolicy(config, [2], vocab, tokenizer)
    ids = [row[:prompt] for row in rows]
    start = time.process_time()
    policy.start(batch, prompt)
    for k in range(prompt, length):
        for b in range(batch):
            ids[b].append(rows[b][k])
            decision = policy.after_token(RowView(b, ids[b], prompt, 0, final=k == length - 1))
            if strict and decision not in ("keep", "finish"):
                raise RuntimeError("a rewind while replaying tokens that did not rewind")
        for b in range(batch):
            policy.settle(b, k + 1, False)
    return time.process_time() - start


def policy_alone(
    config: BackstepConfig,
    sequences: torch.Tensor,
    others: list[list[list[int]]],
    prompt: int,
    tokenizer: Any,
    vocab: int,
    repeats: int,
) -> float:
    """Microseconds per row per token of the policy alone (no model), replaying ``sequences``' new tokens through
    the policy (:func:`replay`); the fastest of ``repeats``. Each repeat reads the text as new, as the timed runs
    do (:func:`read_as_new`: answers kept only from ``others``)."""
    rows = sequences.tolist()
    best = float("inf")
    for _ in range(max(1, repeats)):
        read_as_new(config, others, prompt, tokenizer, vocab)
        best = min(best, replay(config, rows, prompt, tokenizer, vocab))
    return 1e6 * best / (len(rows) * (len(rows[0]) - prompt))


def read_as_new(config: BackstepConfig, others: list[list[list[int]]], prompt: int, tokenizer: Any, vocab: int) -> None:
    """Before a timed run: forget every answer kept for text already seen (:func:`forget_seen_text`), then learn
    them again from ``others`` -- the texts of the other seeds' runs, replayed untimed -- so that the timed run
    reads text the policy has not seen, with answers kept from other text, as in a process that served other
    requests before."""
    forget_seen_text(config, tokenizer, vocab)
    for rows in others:
        replay(config, rows, prompt, tokenizer, vocab, strict=False)


def measure(
    batch: int,
    tokens: int,
    repeats: int,
    phrases: int,
    model: Any,
    tokenizer: Any,
    screen: int,
    allow_rewinds: bool,
    writer: Any = None,
) -> dict[str, Any]:
    """The arms at one batch size. ``writer``: the model that writes the text, when ``model`` is only to be timed
    (a random model, made to write the writer's rows: see ScriptedTokens)."""
    suppress = None if allow_rewinds else marker_piece_ids(tokenizer)
    run = Runner(model, tokenizer, batch, tokens, suppress)
    text_run = Runner(writer, tokenizer, batch, tokens, suppress) if writer is not None else run
    texts: list[str] = []
    if allow_rewinds:
        seeds, tried = [FIRST_SEED + r for r in range(repeats)], 0
    else:
        seeds, texts, tried = screen_seeds(text_run, repeats, screen)
    # Each seed's whole text (untimed, the reference arm: the screening's chat runs are cut back by the landing,
    # so their texts lack the last words the other arms write): what the banned phrases avoid, and what the timed
    # runs of the other seeds learn from first.
    written = {seed: text_run(BackstepConfig.method4(10), seed)[1].sequences for seed in dict.fromkeys(seeds)}
    texts_of = {seed: rows.tolist() for seed, rows in written.items()}
    if writer is not None:
        run.script = {seed: rows.to(model.device) for seed, rows in written.items()}
    whole = [run.tokenizer.decode(row) for rows in texts_of.values() for row in rows] if not allow_rewinds else []
    arms = configs(tokenizer, phrases, avoid=[*texts, *whole])
    vocab = int(model.config.vocab_size)

    built = {name: build_seconds(config, tokenizer, vocab) for name, config in arms.items()}
    for config in arms.values():
        run(config, 0)  # warm-up, untimed (and the phrase matchers are built: generate() calls reuse them)
    prompt_length = int(run.prompt["input_ids"].shape[1])

    def others_of(seed: int) -> list[list[list[int]]]:
        return [rows for other, rows in texts_of.items() if other != seed]

    per_step: dict[str, list[float]] = {name: [] for name in arms}
    per_forward: dict[str, list[float]] = {name: [] for name in arms}
    rewinds = dict.fromkeys(arms, 0)
    same = dict.fromkeys(arms, True)
    reference: dict[int, torch.Tensor] = {}
    names = list(arms)
    config = model.generation_config
    padding = frozenset(int(t) for t in (config.pad_token_id, config.eos_token_id, 0) if t is not None)
    for r in range(repeats):
        k = r % len(names)
        for name in [*names[k:], *names[:k]]:
            read_as_new(arms[name], others_of(seeds[r]), prompt_length, tokenizer, vocab)
            seconds, out = run(arms[name], seeds[r])
            per_step[name].append(seconds / tokens)
            per_forward[name].append(seconds / max(1, out.backstep_stats.decode_forwards))
            rewinds[name] += out.backstep_stats.rewinds
            first = reference.setdefault(r, out.sequences)
            same[name] = same[name] and _agree(first, out.sequences, prompt_length, padding)
    ref = per_step["dynamic"]
    prompt = int(run.prompt["input_ids"].shape[1])
    # The reference tokens rewound nobody only when the runs are rewind-free (checked by same_tokens).
    alone = {
        name: None
        if allow_rewinds
        else policy_alone(config, reference[0], others_of(seeds[0]), prompt, tokenizer, vocab, repeats)
        for name, config in arms.items()
    }
    result: dict[str, Any] = {}
    for name, times in per_step.items():
        paired = [a / b for a, b in zip(times, ref)]
        result[name] = {
            "ms_per_step": 1000 * statistics.median(times),
            # Every repeat's step, in the order run (the paired ratios divide it by the reference's of that repeat):
            # later readers can judge the spread, or another statistic, without running again.
            "ms_per_step_by_repeat": [1000 * t for t in times],
            "ratio_of_medians": statistics.median(times) / statistics.median(ref),
            "paired_ratio_min": min(paired),
            "paired_ratio_median": statistics.median(paired),
            "paired_ratio_max": max(paired),
            "ms_per_decode_forward": 1000 * statistics.median(per_forward[name]),
            "build_seconds": built[name],
            "rewinds_in_timed_runs": rewinds[name],
            "same_tokens": same[name],
            "policy_alone_us_per_row_token": alone[name],
        }
    result["_seeds"] = {"used": seeds, "tried": tried, "end_marker_pieces_suppressed": not allow_rewinds}
    return result


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown(out: dict[str, Any]) -> str:
    condition = (
        "rewinds allowed: EOS masked by min_new_tokens only"
        if out["allow_rewinds"]
        else "no rewind: EOS masked by min_new_tokens, end-marker pieces suppressed in every arm, seeds screened"
    )
    compiled = [name.rsplit(".", 1)[-1] for name in out["environment"].get("compiled_modules", [])]
    lines = [
        f"Policy cost, {out['model']}, {out['tokens']} tokens, {out['repeats']} repeats, {out['clock']} per step "
        f"({condition}). Ratios to `BackstepConfig.method4(10)` in the same run. Text modules: "
        f"{'compiled (' + ', '.join(compiled) + ')' if compiled else 'Python source'}.",
        "",
        "| batch | arm | ms/step | ratio (of medians) | paired median (min-max) | ms/forward "
        "| policy alone us/row/token | policy build s | rewinds | same tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for batch, arms in out["batches"].items():
        for name, r in arms.items():
            if name.startswith("_"):
                continue
            lines.append(
                f"| {batch} | {name} | {r['ms_per_step']:.2f} | {r['ratio_of_medians']:.4f} | "
                f"{r['paired_ratio_median']:.4f} ({r['paired_ratio_min']:.2f}-{r['paired_ratio_max']:.2f}) | "
                f"{r['ms_per_decode_forward']:.2f} | "
                f"{_number(r['policy_alone_us_per_row_token'])} | "
                f"{r['build_seconds']:.2f} | {r['rewinds_in_timed_runs']} | {'yes' if r['same_tokens'] else 'no'} |"
            )
    lines.append("")
    for batch, arms in out["batches"].items():
        seeds = arms["_seeds"]
        lines.append(f"Batch {batch}: seeds {seeds['used']} ({seeds['tried']} screened).")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=96, help="new tokens per run (default 96)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per arm (default 5)")
    parser.add_argument("--phrases", type=int, default=10_000, help="random banned phrases (default 10,000)")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default 1,32)")
    parser.add_argument("--screen", type=int, default=10, help="seeds tried per repeat for rewind-free runs")
    parser.add_argument("--allow-rewinds", action="store_true", help="no screening, no end-marker suppression")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, results to a temporary folder")
    parser.add_argument(
        "--model", default="tinystories", help="tinystories (default), random-1b or random-tiny (see --gpu)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs")
    parser.add_argument("--gpu", action="store_true", help="= --model random-1b --device cuda (issue 21's GPU goal)")
    parser.add_argument("--out", help="results folder (default benchmarks/results; a temp folder with --smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tokens, args.repeats, args.phrases, args.batches = 4, 1, 20, "1,2"
    if args.gpu:
        args.model, args.device = "random-1b", "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda (or --gpu): no CUDA device here")
    torch.set_num_threads(1)
    model, tokenizer, writer = load_model(args.model, args.device)
    model = make_perpetual(model, tokenizer=tokenizer)
    writer = make_perpetual(writer, tokenizer=tokenizer) if writer is not None else None
    described = "TinyStories-656K" if args.model == "tinystories" else f"a {args.model} Llama (random weights)"
    batches = [int(b) for b in args.batches.split(",")]
    out: dict[str, Any] = {
        "tokens": args.tokens,
        "repeats": args.repeats,
        "phrases": args.phrases,
        "allow_rewinds": args.allow_rewinds,
        "model": f"{described} on {args.device}" + (", bfloat16" if model.dtype == torch.bfloat16 else ""),
        "clock": "wall time" if args.device == "cuda" else "CPU time",
        "environment": common.environment(),
        "batches": {
            str(b): measure(
                b, args.tokens, args.repeats, args.phrases, model, tokenizer, args.screen, args.allow_rewinds, writer
            )
            for b in batches
        },
    }
    folder = common.out_dir(args.out, args.smoke)
    common.write_json(folder / "policy_cost.json", out)
    (folder / "policy_cost.md").write_text(markdown(out))
    print(markdown(out))
    print(f"results: {folder / 'policy_cost.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
