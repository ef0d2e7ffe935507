"""The ``perpetual-logits`` command (also ``python -m perpetual_logits``).

Subcommands:

* ``generate`` — one prompt with one method, streamed to the terminal, then a one-line summary (``--json``
  prints one JSON object instead);
* ``analyze`` — the blog's motivating experiments: sampled baseline runs to EOS, per-step statistics (bits),
  the block-wise and EOS-window figures, a JSON of every number and a markdown summary;
* ``demo`` — every method side by side on the default model: a table, sample texts and the figures.

Errors the user can fix (a missing model, a bad number, an unreadable prompts file) end with one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch

from .analysis import StepStats, aligned_means, blockwise, eos_window, step_stats

__all__ = ["DEFAULT_MODEL", "DEFAULT_PROMPTS", "METHODS", "main"]

#: The model ``demo`` uses by default; a Hub id or a local folder, loaded with ``from_pretrained``.
DEFAULT_MODEL = "raincandy-u/TinyStories-656K"
METHODS = ("baseline", "suppress", "post-eos", "backstep", "dynamic", "dynamic+phrases")
_BACKSTEP_METHODS = ("backstep", "dynamic", "dynamic+phrases")
SCHEDULES = ("linear", "step", "cosine", "exponential", "constant")
#: Prompts ``analyze`` uses without ``--prompts``: story openings, the default model's domain.
DEFAULT_PROMPTS = (
    "Once upon a time",
    "One day, a little girl named Lily",
    "Tom had a big red ball.",
    "The sun was shining and the birds were singing.",
)
_INTERVENTION = {
    "baseline": "none",
    "suppress": "EOS on top",
    "post-eos": "evictions",
    "backstep": "backsteps",
    "dynamic": "backsteps",
    "dynamic+phrases": "backsteps",
}
_PROG = "perpetual-logits"


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage block and exits; one line through CLIError keeps every user error alike.
    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{self.prog}: error: {message} (see --help)")


# -- argument types ----------------------------------------------------------------------------------------
def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}")
        return value

    return parse


def _float_in(low: float, high: float, low_open: bool = True, high_open: bool = False) -> Callable[[str], float]:
    accepted = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in {accepted}, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be a number in {accepted}, got {text!r}")
        return value

    return parse


_positive_float = _float_in(0.0, math.inf, high_open=True)


# -- parser --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``perpetual-logits`` command (all three subcommands)."""
    parser = _Parser(
        prog=_PROG,
        description="Keep language models writing past the point where they learned to stop.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,analyze,demo}")

    sampling = _Parser(add_help=False)
    group = sampling.add_argument_group("sampling")
    group.add_argument("--temperature", type=_positive_float, default=1.0, help="sampling temperature (> 0)")
    group.add_argument("--top-k", type=_int_at_least(0), default=50, help="top-k (0 = off; default 50)")
    group.add_argument("--top-p", type=_float_in(0.0, 1.0), default=1.0, help="nucleus top-p in (0, 1]")
    group.add_argument("--seed", type=_int_at_least(0), default=0, help="random seed (first seed of a series)")

    method = _Parser(add_help=False)
    group = method.add_argument_group("method settings")
    group.add_argument(
        "--n-remove",
        type=_int_at_least(1),
        default=10,
        help="tokens removed per backstep; also the schedule length",
    )
    group.add_argument("--peak", type=_positive_float, default=2.0, help="temperature multiplier after a trigger")
    group.add_argument("--schedule", choices=SCHEDULES, default="linear", help="how the multiplier returns to 1")

    gen = sub.add_parser(
        "generate",
        parents=[sampling, method],
        help="generate from one prompt with one method",
        description="Generate from PROMPT with one method, stream the text, then print a one-line summary.",
    )
    gen.add_argument("prompt", metavar="PROMPT", help="the prompt")
    gen.add_argument("--model", required=True, help="Hub id or local folder of a causal LM")
    gen.add_argument(
        "--method",
        choices=METHODS,
        default="baseline",
        help="baseline, Method 1-4, or Method 4 with ending control (dynamic+phrases)",
    )
    gen.add_argument("--max-new-tokens", type=_int_at_least(1), default=256, help="new-token budget")
    gen.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stream tokens as they are final",
    )
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    gen.set_defaults(func=_cmd_generate)

    ana = sub.add_parser(
        "analyze",
        parents=[sampling],
        help="why the model stops: statistics and figures of baseline runs",
        description=(
            "Sample baseline runs to EOS for every prompt and seed; write the block-wise and EOS-window "
            "figures, a JSON of every statistic (bits) and a markdown summary."
        ),
    )
    ana.add_argument("--model", required=True, help="Hub id or local folder of a causal LM")
    ana.add_argument("--prompts", type=Path, help="text file, one prompt per line (default: built-in stories)")
    ana.add_argument("--runs", type=_int_at_least(1), default=8, help="seeds per prompt (default 8)")
    ana.add_argument("--block-size", type=_int_at_least(1), default=25, help="tokens per block (default 25)")
    ana.add_argument("--final-blocks", type=_int_at_least(2), default=4, help="blocks compared before EOS")
    ana.add_argument("--max-new-tokens", type=_int_at_least(1), default=400, help="budget to reach EOS")
    ana.add_argument("--out", type=Path, required=True, help="output folder")
    ana.set_defaults(func=_cmd_analyze)

    demo = sub.add_parser(
        "demo",
        parents=[sampling, method],
        help="every method side by side on the default model",
        description="Run baseline and Methods 1-4 on one prompt and write a table, samples and figures.",
    )
    demo.add_argument("--model", default=DEFAULT_MODEL, help=f"Hub id or local folder (default {DEFAULT_MODEL})")
    demo.add_argument("--prompt", default=DEFAULT_PROMPTS[0], help="the prompt (default: 'Once upon a time')")
    demo.add_argument("--runs", type=_int_at_least(1), default=3, help="seeds per method (default 3)")
    demo.add_argument("--max-new-tokens", type=_int_at_least(1), default=300, help="new-token budget")
    demo.add_argument(
        "--analysis-runs", type=_int_at_least(1), default=12, help="baseline runs behind the figures (default 12)"
    )
    demo.add_argument("--block-size", type=_int_at_least(1), default=25, help="tokens per block (default 25)")
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default demo-output)")
    demo.set_defaults(func=_cmd_demo)
    return parser


# -- model loading -----------------------------------------------------------------------------------------
@dataclass
class _Loaded:
    name: str
    model: Any
    tokenizer: Any
    eos: list[int]
    pad: int
    max_positions: int | None


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' info/warning logs and its loading bar for the command's duration."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def load_model(name: str) -> _Loaded:
    """Model and tokenizer through ``from_pretrained``; every failure becomes a one-line :class:`CLIError`."""
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1
    if looks_local and not Path(name).expanduser().is_dir():
        raise CLIError(f"{_PROG}: error: model folder {name!r} does not exist")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name)
    except Exception as err:  # any loading failure is a user error here: report it in one line
        raise CLIError(f"{_PROG}: error: cannot load model {name!r}: {_first_line(err)}") from None
    model.eval()
    eos_raw = model.generation_config.eos_token_id
    if eos_raw is None:
        eos_raw = tokenizer.eos_token_id
    if eos_raw is None:
        raise CLIError(f"{_PROG}: error: model {name!r} defines no EOS token (generation_config.eos_token_id)")
    eos = [int(eos_raw)] if isinstance(eos_raw, int) else [int(i) for i in eos_raw]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    config = model.config
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return _Loaded(name, model, tokenizer, eos, int(pad), int(max_positions) if max_positions else None)


# -- one run -------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """Sampling and method settings shared by every run of a command."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    n_remove: int = 10
    peak: float = 2.0
    schedule: str = "linear"


@dataclass
class RunResult:
    """What one generation produced. ``interventions``: steps of EOS-on-top / evictions / backsteps."""

    method: str
    prompt: str
    seed: int
    token_ids: list[int]
    text: str
    ended_with_eos: bool
    interventions: list[int]
    seconds: float
    events: list[dict[str, Any]] = field(default_factory=list)
    logits: tuple[torch.Tensor, ...] | None = None

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)


def make_schedule(kind: str, peak: float, steps: int) -> Any:
    """The temperature schedule named on the command line, ``steps`` tokens long where it has a length."""
    from . import schedules

    try:
        if kind == "linear":
            return schedules.LinearDecay(peak, steps)
        if kind == "step":
            return schedules.StepDecay(peak)  # the reference code's 0.1 per token
        if kind == "cosine":
            return schedules.CosineDecay(peak, steps)
        if kind == "exponential":
            return schedules.ExponentialDecay(peak)
        if kind == "constant":
            return schedules.Constant(peak, steps=steps)
    except ValueError as err:
        raise CLIError(f"{_PROG}: error: {err}") from None
    raise CLIError(f"{_PROG}: error: unknown schedule {kind!r}; choose from {', '.join(SCHEDULES)}")


def _budget(loaded: _Loaded, prompt_length: int, wanted: int) -> int:
    """``wanted`` new tokens, capped so that the sequence fits the model's position table."""
    if loaded.max_positions is None:
        return wanted
    room = loaded.max_positions - prompt_length
    if room < 1:
        raise CLIError(
            f"{_PROG}: error: the prompt has {prompt_length} tokens; the model takes at most {loaded.max_positions}"
        )
    return min(wanted, room)


def run_method(
    loaded: _Loaded,
    method: str,
    prompt: str,
    settings: Settings,
    seed: int,
    streamer: Any = None,
    record_logits: bool = False,
) -> RunResult:
    """Generate once from ``prompt`` with ``method`` and report what came out."""
    from transformers import set_seed

    from . import processors

    if method not in METHODS:
        raise CLIError(f"{_PROG}: error: unknown method {method!r}; choose from {', '.join(METHODS)}")
    tokenizer, model = loaded.tokenizer, loaded.model
    inputs = tokenizer(prompt, return_tensors="pt")
    prompt_length = int(inputs["input_ids"].shape[1])
    if prompt_length == 0:
        raise CLIError(f"{_PROG}: error: the prompt {prompt!r} encodes to no tokens")
    kwargs: dict[str, Any] = {
        "do_sample": True,
        "temperature": settings.temperature,
        "top_k": settings.top_k,
        "top_p": settings.top_p,
        "max_new_tokens": _budget(loaded, prompt_length, settings.max_new_tokens),
        "pad_token_id": loaded.pad,
        "eos_token_id": loaded.eos,
        "return_dict_in_generate": True,
        "output_logits": record_logits,
        "streamer": streamer,
    }
    proc: processors.EOSLogitsProcessor | None = None
    if method == "suppress":
        proc = processors.SuppressEOSLogitsProcessor(loaded.eos)
    elif method == "post-eos":
        schedule = make_schedule(settings.schedule, settings.peak, settings.n_remove)
        proc = processors.PostEOSResamplingLogitsProcessor(loaded.eos, schedule=schedule, trigger="sample")
    elif method in _BACKSTEP_METHODS:
        import perpetual_logits

        schedule = None
        if method != "backstep":
            schedule = make_schedule(settings.schedule, settings.peak, settings.n_remove)
        model = perpetual_logits.make_perpetual(model)
        # dynamic+phrases: Method 4 plus ending control (spelled end markers and ending phrases are rewound).
        phrases = "default" if method == "dynamic+phrases" else None
        kwargs["backstep"] = perpetual_logits.BackstepConfig(
            n_remove=settings.n_remove, schedule=schedule, ban_phrases=phrases
        )
        kwargs["tokenizer"] = tokenizer
    if proc is not None:
        kwargs["logits_processor"] = [proc]

    set_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    seconds = time.perf_counter() - start

    generated = out.sequences[0, prompt_length:].tolist()
    # generate() stops a row at its first EOS, so EOS can only be the last token.
    ended = bool(generated) and generated[-1] in loaded.eos
    if ended:
        generated = generated[:-1]
    events: list[dict[str, Any]] = []
    if isinstance(proc, processors.SuppressEOSLogitsProcessor):
        interventions = proc.eos_top_steps[0] if proc.eos_top_steps else []
    elif isinstance(proc, processors.PostEOSResamplingLogitsProcessor):
        interventions = proc.evictions[0] if proc.evictions else []
    elif method in _BACKSTEP_METHODS:
        row = (getattr(out, "backstep_events", None) or [[]])[0]
        events = [asdict(e) for e in row]
        interventions = [int(e.step) for e in row]
    else:
        interventions = []
    logits = tuple(out.logits) if record_logits and out.logits is not None else None
    return RunResult(
        method=method,
        prompt=prompt,
        seed=seed,
        token_ids=[int(t) for t in generated],
        text=tokenizer.decode(generated, skip_special_tokens=True),
        ended_with_eos=ended,
        interventions=[int(s) for s in interventions],
        seconds=seconds,
        events=events,
        logits=logits,
    )


def _summary_line(result: RunResult) -> str:
    parts = [f"[{result.method}] {result.new_tokens} new tokens"]
    parts.append("stopped at EOS" if result.ended_with_eos else "stopped at the token budget")
    kind = _INTERVENTION[result.method]
    if kind != "none":
        parts.append(f"{kind}: {len(result.interventions)}")
    if result.events:
        parts.append(f"tokens removed: {sum(int(e['removed']) for e in result.events)}")
    rate = result.new_tokens / result.seconds if result.seconds > 0 else 0.0
    parts.append(f"{result.seconds:.2f} s ({rate:.0f} tokens/s)")
    return " · ".join(parts)


# -- generate ------------------------------------------------------------------------------------------------
def _cmd_generate(args: argparse.Namespace) -> int:
    loaded = load_model(args.model)
    settings = _settings(args)
    streamer = None
    if args.stream and not args.json:
        from transformers import TextStreamer

        streamer = TextStreamer(loaded.tokenizer, skip_prompt=False, skip_special_tokens=True)
    result = run_method(loaded, args.method, args.prompt, settings, args.seed, streamer=streamer)
    if args.json:
        payload = {
            "model": args.model,
            "method": result.method,
            "prompt": result.prompt,
            "seed": result.seed,
            "settings": asdict(settings),
            "text": result.text,
            "new_tokens": result.new_tokens,
            "ended_with_eos": result.ended_with_eos,
            "intervention_kind": _INTERVENTION[result.method],
            "intervention_steps": result.interventions,
            "backstep_events": result.events,
            "seconds": round(result.seconds, 4),
        }
        print(json.dumps(_finite(payload)))
        return 0
    if streamer is None:
        print(args.prompt + result.text)
    print(_summary_line(result))
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        n_remove=getattr(args, "n_remove", 10),
        peak=getattr(args, "peak", 2.0),
        schedule=getattr(args, "schedule", "linear"),
    )


# -- analyze -------------------------------------------------------------------------------------------------
def _progress(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="run", file=sys.stderr, leave=False, dynamic_ncols=True)


def _read_prompts(path: Path | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise CLIError(f"{_PROG}: error: cannot read prompts file {str(path)!r}: {_first_line(err)}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise CLIError(f"{_PROG}: error: prompts file {str(path)!r} has no non-empty line")
    return prompts


def _finite(value: Any) -> Any:
    """JSON-safe copy: non-finite floats (the inf information content of a masked EOS) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _fmt(value: float, digits: int = 4) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"


@dataclass
class Analysis:
    """Everything ``analyze`` computes; :meth:`write` puts it on disk."""

    model: str
    eos: list[int]
    settings: Settings
    block_size: int
    final_blocks: int
    runs: list[RunResult]
    stats: list[StepStats]
    window: list[Any]
    window_run: int | None
    trend: dict[str, Any]
    command: str

    def ended(self) -> list[int]:
        return [i for i, r in enumerate(self.runs) if r.ended_with_eos]


def analyze_runs(
    loaded: _Loaded,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: Settings,
    block_size: int,
    final_blocks: int,
    command: str,
) -> Analysis:
    """Baseline runs for every prompt × seed, their per-step statistics and the end-aligned trend."""
    runs: list[RunResult] = []
    stats: list[StepStats] = []
    with _progress(len(prompts) * len(seeds), "baseline runs") as bar:
        for prompt in prompts:
            for seed in seeds:
                result = run_method(loaded, "baseline", prompt, settings, seed, record_logits=True)
                assert result.logits is not None
                # Steps up to and including the one that produced EOS; the model's raw distribution.
                steps = result.new_tokens + (1 if result.ended_with_eos else 0)
                stats.append(step_stats(result.logits, loaded.eos, lengths=[steps])[0])
                runs.append(result)
                bar.update(1)
    ended = [i for i, r in enumerate(runs) if r.ended_with_eos]
    window: list[Any] = []
    window_run = ended[0] if ended else None
    if window_run is not None:
        run = runs[window_run]
        assert run.logits is not None
        window = eos_window(run.logits, loaded.tokenizer, k=10, last=5, length=len(stats[window_run]))
    trend = end_trend([stats[i] for i in ended], block_size, final_blocks)
    for run in runs:
        run.logits = None  # the statistics are kept; the (steps, vocab) logits are not needed any more
    return Analysis(
        loaded.name,
        loaded.eos,
        settings,
        block_size,
        final_blocks,
        runs,
        stats,
        window,
        window_run,
        trend,
        command,
    )


def end_trend(stats: Sequence[StepStats], block_size: int, final_blocks: int) -> dict[str, Any]:
    """Compare the last ``final_blocks`` blocks of runs that ended with EOS, lined up at their end.

    Blocks are counted back from the step that produced EOS (``blockwise(..., from_end=True)``), so block -1
    of every run is its final ``block_size`` steps, EOS step included. Only runs with at least
    ``final_blocks`` full blocks take part, so every block mean averages the same runs.
    """
    eligible = [s for s in stats if len(s) >= final_blocks * block_size]
    result: dict[str, Any] = {
        "runs_ended_with_eos": len(stats),
        "runs_compared": len(eligible),
        "final_blocks": final_blocks,
        "block_size": block_size,
        "blocks": list(range(-final_blocks, 0)),
    }
    if not eligible:
        return result
    tails = [blockwise(s[-final_blocks * block_size :], block_size) for s in eligible]
    for name in ("eos_prob", "info", "entropy", "varentropy"):
        result[name] = aligned_means([getattr(t, name) for t in tails])
    first, last = 0, final_blocks - 1
    result["runs_eos_prob_up"] = sum(t.eos_prob[last] > t.eos_prob[first] for t in tails)
    result["runs_entropy_down"] = sum(t.entropy[last] < t.entropy[first] for t in tails)
    # The step that sampled EOS is where EOS was likely by selection; the final block without it shows
    # whether the rise starts before that step.
    without = [blockwise(s[-block_size:-1], block_size) for s in eligible] if block_size > 1 else []
    if without:
        result["final_block_without_eos_step"] = {
            name: aligned_means([getattr(w, name) for w in without])[0] for name in ("eos_prob", "entropy")
        }
    return result


def _trend_sentences(trend: dict[str, Any]) -> list[str]:
    n, k = trend["runs_compared"], trend["final_blocks"]
    if not n:
        return [
            f"No run that ended with EOS had {k} full blocks of {trend['block_size']} tokens, so the final "
            "blocks are not compared; use a smaller --block-size or more runs."
        ]
    p0, p1 = trend["eos_prob"][0], trend["eos_prob"][-1]
    h0, h1 = trend["entropy"][0], trend["entropy"][-1]
    rises = p1 > p0
    falls = h1 < h0
    ratio = f" (×{p1 / p0:.3g})" if p0 > 0 else ""
    lines = [
        f"- **EOS probability {'rises' if rises else 'does not rise'}** over the final {k} blocks: "
        f"{_fmt(p0)} in block -{k} → {_fmt(p1)} in block -1{ratio}; higher in the final block than in "
        f"block -{k} in {trend['runs_eos_prob_up']} of {n} runs.",
        f"- **Entropy {'falls' if falls else 'does not fall'}**: {h0:.3f} bits in block -{k} → {h1:.3f} "
        f"bits in block -1 ({h1 - h0:+.3f} bits); lower in the final block in {trend['runs_entropy_down']} "
        f"of {n} runs.",
    ]
    without = trend.get("final_block_without_eos_step")
    if without:
        lines.append(
            f"- The final block includes the step that sampled EOS, where EOS is likely by selection. "
            f"Without that step the final block has EOS probability {_fmt(without['eos_prob'])} and entropy "
            f"{without['entropy']:.3f} bits."
        )
    return lines


def _write_figures(
    analysis: Analysis, out: Path, prefix: str, figure_stats: list[StepStats], ended: list[int]
) -> dict[str, Path]:
    from .plotting import plot_blockwise, plot_eos_window

    paths: dict[str, Path] = {}
    which = "runs that ended with EOS" if ended else "runs (none ended with EOS)"
    paths["blockwise"] = plot_blockwise(
        figure_stats,
        out / f"{prefix}blockwise.png",
        block_size=analysis.block_size,
        title=f"Block-wise statistics, {len(figure_stats)} {which} — {Path(analysis.model).name}",
    )
    paths["blockwise_end"] = plot_blockwise(
        figure_stats,
        out / f"{prefix}blockwise_end.png",
        block_size=analysis.block_size,
        align="end",
        title=f"The same runs lined up at EOS — {Path(analysis.model).name}",
    )
    if analysis.window and analysis.window_run is not None:
        run = analysis.runs[analysis.window_run]
        paths["eos_window"] = plot_eos_window(
            analysis.window,
            out / f"{prefix}eos_window.png",
            highlight=set(analysis.eos),
            title=f"Top-10 next tokens before EOS — prompt {run.prompt!r}, seed {run.seed}",
        )

    return paths


def write_analysis(analysis: Analysis, out: Path, prefix: str = "") -> dict[str, Path]:
    """Write the figures (PNG), ``analysis.json`` and ``analysis.md`` into ``out``; return their paths.

    Without matplotlib (the ``plot`` extra) the figures are skipped with a one-line note.
    """
    out.mkdir(parents=True, exist_ok=True)
    ended = analysis.ended()
    paths: dict[str, Path] = {}
    figure_stats = [analysis.stats[i] for i in ended] or analysis.stats
    try:
        paths.update(_write_figures(analysis, out, prefix, figure_stats, ended))
    except ImportError as err:  # matplotlib is the optional `plot` extra: write everything else
        print(f"{_PROG}: note: figures skipped ({err})", file=sys.stderr)

    lengths = [analysis.runs[i].new_tokens for i in ended]
    payload = {
        "model": analysis.model,
        "command": analysis.command,
        "units": {"eos_prob": "probability", "info": "bits", "entropy": "bits", "varentropy": "bits^2"},
        "settings": asdict(analysis.settings),
        "block_size": analysis.block_size,
        "distribution": "raw model logits (output_logits): temperature 1, no top-k/top-p",
        "runs": [
            {
                "prompt": r.prompt,
                "seed": r.seed,
                "new_tokens": r.new_tokens,
                "ended_with_eos": r.ended_with_eos,
                "text": r.text,
                "stats": s.to_dict(),
                "blocks": blockwise(s, analysis.block_size).to_dict(),
                "blocks_from_end": blockwise(s, analysis.block_size, from_end=True).to_dict(),
            }
            for r, s in zip(analysis.runs, analysis.stats, strict=True)
        ],
        "mean_blocks": {
            name: aligned_means([getattr(blockwise(s, analysis.block_size), name) for s in figure_stats])
            for name in ("eos_prob", "info", "entropy", "varentropy")
        },
        "eos_window": {
            "run": analysis.window_run,
            "steps": [w.to_dict() for w in analysis.window],
        },
        "final_blocks": analysis.trend,
    }
    paths["json"] = out / f"{prefix}analysis.json"
    paths["json"].write_text(json.dumps(_finite(payload), indent=1) + "\n", encoding="utf-8")

    trend = analysis.trend
    md = [
        f"# Why the model stops: {analysis.model}",
        "",
        f"Command: `{analysis.command}`",
        "",
        f"{len(analysis.runs)} sampled baseline runs; {len(ended)} ended with EOS within "
        f"{analysis.settings.max_new_tokens} new tokens"
        + (f" (median length {statistics.median(lengths):.0f} tokens)." if lengths else "."),
        "Statistics are those of the model's raw next-token distribution at every step (temperature 1, "
        "nothing masked), in bits.",
        "",
        f"## The final {trend['final_blocks']} blocks before EOS",
        "",
        f"Runs are lined up at their end: blocks of {analysis.block_size} tokens are counted back from the "
        f"step that produced EOS, so block -1 is each run's last {analysis.block_size} steps (EOS step "
        f"included). Only runs with at least {trend['final_blocks']} full blocks are compared "
        f"({trend['runs_compared']} of {trend['runs_ended_with_eos']} that ended with EOS), so each block "
        "averages the same runs.",
        "",
        *_trend_sentences(trend),
        "",
    ]
    if trend["runs_compared"]:
        md += [
            "| block | EOS probability | EOS information (bits) | entropy (bits) | varentropy (bits²) |",
            "|---:|---:|---:|---:|---:|",
        ]
        for i, block in enumerate(trend["blocks"]):
            md.append(
                f"| {block} | {_fmt(trend['eos_prob'][i])} | {_fmt(trend['info'][i], 2)} | "
                f"{trend['entropy'][i]:.3f} | {trend['varentropy'][i]:.3f} |"
            )
        md.append("")
    md += ["## Figures", ""]
    for key, label in (
        ("blockwise", "Blocks counted from the start (the blog's figure 1)"),
        ("blockwise_end", "Blocks counted back from EOS"),
        ("eos_window", "Top-10 tokens at the last 5 steps before EOS (the blog's figures 2-3)"),
    ):
        if key in paths:
            md.append(f"![{label}]({paths[key].name})")
            md.append("")
    paths["markdown"] = out / f"{prefix}analysis.md"
    paths["markdown"].write_text("\n".join(md), encoding="utf-8")
    return paths


def _command_line(argv: Sequence[str] | None) -> str:
    words = list(sys.argv[1:] if argv is None else argv)
    return " ".join([_PROG, *(w if w and " " not in w else repr(w) for w in words)])


def _cmd_analyze(args: argparse.Namespace) -> int:
    prompts = _read_prompts(args.prompts)
    loaded = load_model(args.model)
    settings = _settings(args)
    seeds = list(range(args.seed, args.seed + args.runs))
    analysis = analyze_runs(loaded, prompts, seeds, settings, args.block_size, args.final_blocks, args.command_line)
    paths = write_analysis(analysis, args.out)
    print("\n".join(_trend_sentences(analysis.trend)))
    for path in paths.values():
        print(f"wrote {path}")
    return 0


# -- demo ----------------------------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace) -> int:
    from .metrics import count_end_markers, rep_n

    loaded = load_model(args.model)
    settings = _settings(args)
    seeds = list(range(args.seed, args.seed + args.runs))
    results: dict[str, list[RunResult]] = {m: [] for m in METHODS}
    with _progress(len(METHODS) * len(seeds), "demo runs") as bar:
        for method in METHODS:
            for seed in seeds:
                results[method].append(run_method(loaded, method, args.prompt, settings, seed))
                bar.update(1)

    header = (
        "| method | new tokens (mean) | stopped at EOS | EOS interventions (mean) "
        "| spelled end markers (mean) | rep-4 | tokens/s |"
    )
    rows = [header, "|---|---:|---:|---|---:|---:|---:|"]
    table: list[dict[str, Any]] = []
    for method in METHODS:
        runs = results[method]
        tokens = [r.new_tokens for r in runs]
        entry = {
            "method": method,
            "new_tokens": statistics.fmean(tokens),
            "stopped_at_eos": sum(r.ended_with_eos for r in runs),
            "intervention_kind": _INTERVENTION[method],
            "interventions": statistics.fmean(len(r.interventions) for r in runs),
            "end_markers": statistics.fmean(count_end_markers(r.text) for r in runs),
            "rep_4": statistics.fmean(rep_n(r.token_ids, 4) for r in runs),
            "tokens_per_second": sum(tokens) / max(sum(r.seconds for r in runs), 1e-9),
        }
        table.append(entry)
        kind = (
            "–"
            if entry["intervention_kind"] == "none"
            else f"{entry['interventions']:.1f} {entry['intervention_kind']}"
        )
        rows.append(
            f"| {method} | {entry['new_tokens']:.0f} | {entry['stopped_at_eos']}/{len(runs)} | {kind} | "
            f"{entry['end_markers']:.1f} | {entry['rep_4']:.3f} | {entry['tokens_per_second']:.0f} |"
        )

    analysis = analyze_runs(
        loaded,
        [args.prompt],
        list(range(args.seed, args.seed + args.analysis_runs)),
        Settings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p),
        args.block_size,
        4,
        args.command_line,
    )
    paths = write_analysis(analysis, args.out)

    samples = [
        f"### {method} (seed {results[method][0].seed})\n\n{args.prompt}{results[method][0].text}\n"
        for method in METHODS
    ]
    readme = [
        f"# perpetual-logits demo: {loaded.name}",
        "",
        f"Command: `{args.command_line}`",
        "",
        f"Prompt {args.prompt!r}, {args.runs} seed(s) per method, at most {settings.max_new_tokens} new "
        f"tokens, temperature {settings.temperature}, top-k {settings.top_k}, top-p {settings.top_p}; "
        f"backstep removes {settings.n_remove} tokens; post-eos and dynamic use a {settings.schedule} "
        f"schedule from {settings.peak}x. 'EOS on top': steps where EOS was the most likely token "
        "(suppressed); rep-4: share of repeated 4-grams.",
        "",
        *rows,
        "",
        "## Why the model stops",
        "",
        *_trend_sentences(analysis.trend),
        "",
        *(f"![{key}]({p.name})" for key, p in paths.items() if p.suffix == ".png"),
        "",
        "## Samples",
        "",
        *samples,
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "README.md").write_text("\n".join(readme), encoding="utf-8")
    results_json = {
        "model": loaded.name,
        "prompt": args.prompt,
        "settings": asdict(settings),
        "table": table,
        "runs": {m: [_run_dict(r) for r in results[m]] for m in METHODS},
    }
    (args.out / "results.json").write_text(json.dumps(_finite(results_json), indent=1) + "\n", encoding="utf-8")

    print("\n".join(rows))
    print()
    for method in METHODS:
        # The methods share a seed, so their texts agree up to the first EOS: show the ends, where they differ.
        text = args.prompt + results[method][0].text
        tail = text if len(text) <= 400 else "… " + text[-400:].lstrip()
        print(f"--- {method} (seed {results[method][0].seed}), last 400 characters ---\n{tail}\n")
    print("\n".join(_trend_sentences(analysis.trend)))
    print(f"wrote {args.out / 'README.md'}, {args.out / 'results.json'}")
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def _run_dict(result: RunResult) -> dict[str, Any]:
    return {
        "seed": result.seed,
        "new_tokens": result.new_tokens,
        "ended_with_eos": result.ended_with_eos,
        "intervention_steps": result.interventions,
        "backstep_events": result.events,
        "seconds": round(result.seconds, 4),
        "text": result.text,
    }


# -- entry point ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``perpetual-logits`` command; return its exit status (0 ok, 2 user error).

    Args:
        argv (`list[str]`, *optional*): the arguments after the program name; defaults to ``sys.argv[1:]``.

    Example:

    ```python
    >>> from perpetual_logits.cli import main
    >>> main(["generate", "--model", "x", "--max-new-tokens", "0", "hi"])
    2

    ```
    """
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
        args.command_line = _command_line(argv)
        with _quiet_transformers():
            return int(args.func(args))
    except CLIError as err:
        print(str(err), file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help and --version
        return exit_.code if isinstance(exit_.code, int) else 0
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return 130
