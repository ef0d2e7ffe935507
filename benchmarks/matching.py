"""Phrase matching cost per row per new token: the incremental ``PhraseStream`` against ``PhraseMatcher.scan``.

Both run in one process on the same rows: story text tokenized by TinyStories-656K's tokenizer (SentencePiece
with byte fallback), no rewind. For each phrase set -- ``default_end_phrases`` (11 strings), the chat set
(``chat=True``: 33 strings and 12 regular expressions) and N random 2-3-word phrases (the anti-slop scale) --
it reports the time per row per token of each, their ratio, and the time to build a matcher of N phrases
(constructor plus the stream's automaton). The old scan is timed on the last ``--old-tokens`` tokens of each
row only: its cost does not depend on the row's length (it decodes a bounded tail), but it is slow for large
sets. Goals (issue 21): <= 20 µs per row per token for the chat set and for 10,000 phrases, build <= 0.5 s.

    python benchmarks/matching.py                                     # 10,000 phrases, 32 rows x 300 tokens
    python benchmarks/matching.py --phrases 300 --rows 2 --tokens 60 --old-tokens 5   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common
from perpetual_logits.text.endings import default_end_phrases
from perpetual_logits.text.matcher import PhraseMatcher
from perpetual_logits.text.phrase_stream import PhraseIndex, PhraseStream

TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she "
    "saw a big, red ball. She wanted to play with it, but it was too high. Lily asked her mom for help. Her mom "
    'smiled and said, "Let\'s get it together!" They jumped and laughed until the ball came down. Lily was so '
    "happy. She said thank you to her mom and gave her a big hug. In summary, it was a good day.\n\n"
    "Tom had a dog named Max. Max liked to run and dig in the garden. One morning Max found an old box. Tom "
    'opened it and saw shiny coins inside! "Wow," said Tom. "We are rich!" He shared the coins with his '
    "friends, and they all bought ice cream. I hope this helps you see why sharing is good. "
)
WORDS = " ".join(
    (
        "the a and to of in was she he it they with for on her his said day big little happy dog cat ball park",
        "play mom dad friend tree sun run jump saw time good very one two box hug help love fun",
    )
).split()


def rows_of(tokenizer: Any, rows: int, tokens: int, seed: int) -> list[list[int]]:
    """Rows of story-like tokens: random slices of TEXT's tokens glued together."""
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        row: list[int] = []
        while len(row) < tokens:
            start = rng.randrange(len(ids) - 20)
            row += ids[start : start + rng.randint(5, 40)]
        out.append(row[:tokens])
    return out


def random_phrases(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    found: set[str] = set()
    while len(found) < count:
        words = [rng.choice(WORDS) for _ in range(rng.choice((2, 3)))]
        found.add(" ".join(words) + ("" if rng.random() < 0.8 else str(rng.randrange(1000))))
    return sorted(found)


def time_stream(matcher: PhraseMatcher, rows: list[list[int]], prompt: int) -> float:
    """Seconds per row per token of PhraseStream.feed over whole rows, read as new text: the answers the matcher
    keeps for text it has seen (earlier repeats) are forgotten first; within the run, rows learn from each other
    as a batch does."""
    PhraseIndex.of(matcher).forget()
    calls = 0
    start = time.perf_counter()
    for row in rows:
        stream = PhraseStream(matcher)
        ids = row[:prompt]
        for token in row[prompt:]:
            ids.append(token)
            stream.feed(ids, prompt)
            calls += 1
    return (time.perf_counter() - start) / max(1, calls)


def time_scan(matcher: PhraseMatcher, rows: list[list[int]], prompt: int, last: int) -> float:
    """Seconds per row per token of PhraseMatcher.scan on each row's last ``last`` tokens."""
    calls = 0
    start = time.perf_counter()
    for row in rows:
        for n in range(max(prompt + 1, len(row) - last + 1), len(row) + 1):
            matcher.scan(row[:n], prompt)
            calls += 1
    return (time.perf_counter() - start) / max(1, calls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phrases", type=int, default=10_000, help="random phrases in the large set")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=300, help="tokens per row (the first 10 are the prompt)")
    parser.add_argument("--old-tokens", type=int, default=30, help="tokens per row timed with the old scan()")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (the median is kept)")
    parser.add_argument("--out", help="folder for matching.json (default: print only)")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(common.models_dir() / "tinystories-656k")
    rows = rows_of(tokenizer, args.rows, args.tokens, seed=0)
    prompt = min(10, args.tokens - 1)

    builds = []
    for _ in range(args.repeats):
        phrases = random_phrases(args.phrases, seed=1)
        start = time.perf_counter()
        big = PhraseMatcher(phrases, tokenizer)
        constructed = time.perf_counter()
        PhraseIndex.of(big)
        builds.append((constructed - start, time.perf_counter() - constructed))
    construct = statistics.median(b[0] for b in builds)
    index = statistics.median(b[1] for b in builds)

    sets = {
        "default": PhraseMatcher(default_end_phrases(tokenizer), tokenizer),
        "chat": PhraseMatcher(default_end_phrases(tokenizer, chat=True), tokenizer),
        f"random {args.phrases}": big,
    }
    results: dict[str, Any] = {
        "environment": common.environment(),
        "rows": args.rows,
        "tokens": args.tokens,
        "build_seconds": {"constructor": construct, "stream_index": index, "total": construct + index},
        "per_row_per_token_us": {},
    }
    print(f"build {args.phrases} phrases: constructor {construct * 1e3:.1f} ms + automaton {index * 1e3:.1f} ms")
    print(f"{'set':>16} {'phrases':>8} {'scan() µs':>10} {'stream µs':>10} {'scan/stream':>12}")
    for name, matcher in sets.items():
        PhraseIndex.of(matcher)
        new = statistics.median(time_stream(matcher, rows, prompt) for _ in range(args.repeats))
        old = statistics.median(time_scan(matcher, rows, prompt, args.old_tokens) for _ in range(args.repeats))
        results["per_row_per_token_us"][name] = {
            "phrases": len(matcher.phrases),
            "scan": old * 1e6,
            "stream": new * 1e6,
            "ratio_scan_over_stream": old / new,
        }
        print(f"{name:>16} {len(matcher.phrases):>8} {old * 1e6:>10.1f} {new * 1e6:>10.1f} {old / new:>11.1f}x")
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "matching.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
