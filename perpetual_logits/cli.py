"""The ``perpetual-logits`` command (also ``python -m perpetual_logits``): the command line, and nothing else.

Subcommands:

* ``generate`` — one prompt with one method, streamed to the terminal, then a one-line summary (``--json``
  prints one JSON object instead);
* ``analyze`` — the blog's motivating experiments: sampled baseline runs to EOS, per-step statistics (bits),
  the block-wise and EOS-window figures, a JSON of every number and a markdown summary;
* ``demo`` — every method side by side: a table, sample texts and the figures;
* ``serve`` — an OpenAI-compatible HTTP server with backstep (:mod:`perpetual_logits.serve`, the ``[serve]`` extra).

The work is done by :mod:`perpetual_logits.app` (methods, running, report, demo) and
:mod:`perpetual_logits.serve`; this module, above both, parses arguments, shows progress bars and turns the
library's ``ValueError`` into one line on stderr.

Exit status: 0 on success, 2 for any error the user can fix (a bad argument, a missing model, an unreadable
prompts file, an output folder that cannot be written, a setting the model cannot honour) — one line on
stderr, never a traceback — and 130 when interrupted.

Argument parsing stays on the standard library's ``argparse``: the command has three subcommands and flat
options, which argparse covers fully, and its one shortcoming here (printing usage and exiting on a bad
argument) is a five-line override. click or typer would add a dependency without making the command better.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NoReturn

from .app.methods import MAX_NEW_TOKENS, MAX_SEED, METHODS, SCHEDULES, MethodSettings
from .app.running import RunResult
from .schedules import MAX_MULTIPLIER, MIN_MULTIPLIER

__all__ = ["DEFAULT_MODEL", "DEFAULT_PROMPTS", "main"]

#: The model ``demo`` uses by default; a Hub id or a local folder, loaded with ``from_pretrained``.
DEFAULT_MODEL = "raincandy-u/TinyStories-656K"
#: Prompts ``analyze`` uses without ``--prompts``: story openings, the default model's domain.
DEFAULT_PROMPTS = (
    "Once upon a time",
    "One day, a little girl named Lily",
    "Tom had a big red ball.",
    "The sun was shining and the birds were singing.",
)
_PROG = "perpetual-logits"


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage block and exits; one line through CLIError keeps every user error alike.
    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{self.prog}: error: {_one_line(message)} (see --help)")


# What str.splitlines() breaks at: shown escaped, so that an argument holding one ("\r") keeps the message on
# one line without losing what was typed.
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


def _one_line(text: str) -> str:
    """``text`` with its line breaks written as escapes (``"\\r"``)."""
    return text.translate(_LINE_BREAKS)


# -- argument types ----------------------------------------------------------------------------------------
def _int_in(minimum: int, maximum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int in [{minimum}, {maximum}], got {text!r}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be an int in [{minimum}, {maximum}], got {text!r}")
        return value

    return parse


def _float_in(low: float, high: float, low_open: bool = False) -> Callable[[str], float]:
    accepted = f"{'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in {accepted}, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or value > high:
            raise argparse.ArgumentTypeError(f"must be a number in {accepted}, got {text!r}")
        return value

    return parse


_BIG = 10**9
_multiplier = _float_in(MIN_MULTIPLIER, MAX_MULTIPLIER)


# -- parser --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``perpetual-logits`` command (all three subcommands)."""
    parser = _Parser(
        prog=_PROG,
        description="Keep language models writing past the point where they learned to stop.",
        epilog="Exit status: 0 success, 2 user error (one line on stderr), 130 interrupted.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,analyze,demo,serve}")

    sampling = _Parser(add_help=False)
    group = sampling.add_argument_group("sampling")
    group.add_argument(
        "--temperature",
        type=_multiplier,
        default=1.0,
        help=f"sampling temperature in [{MIN_MULTIPLIER:g}, {MAX_MULTIPLIER:g}]",
    )
    group.add_argument("--top-k", type=_int_in(0, _BIG), default=50, help="top-k (0 = off; default 50)")
    group.add_argument("--top-p", type=_float_in(0.0, 1.0, low_open=True), default=1.0, help="top-p in (0, 1]")
    group.add_argument(
        "--seed", type=_int_in(0, MAX_SEED), default=0, help="random seed (first seed of a series), < 2**32"
    )
    group.add_argument(
        "--chat",
        action="store_true",
        help="put each prompt through the tokenizer's chat template (one user turn)",
    )

    method = _Parser(add_help=False)
    group = method.add_argument_group("method settings")
    group.add_argument(
        "--n-remove",
        type=_int_in(1, 2**31),
        default=10,
        help="tokens removed per backstep; also the schedule length",
    )
    group.add_argument("--peak", type=_multiplier, default=2.0, help="temperature multiplier after a trigger")
    group.add_argument("--schedule", choices=SCHEDULES, default="linear", help="how the multiplier returns to 1")
    group.add_argument(
        "--max-backsteps",
        type=_int_in(0, _BIG),
        default=None,
        help="backsteps per row before EOS is suppressed (default 50; 8 for the chat demo)",
    )

    model_help = "Hub id, local folder, .gguf file or folder holding one"
    budget = _int_in(1, MAX_NEW_TOKENS)
    gen = sub.add_parser(
        "generate",
        parents=[sampling, method],
        help="generate from one prompt with one method",
        description="Generate from PROMPT with one method, stream the text, then print a one-line summary.",
    )
    gen.add_argument("prompt", metavar="PROMPT", help="the prompt")
    gen.add_argument("--model", required=True, help=model_help)
    gen.add_argument(
        "--method",
        choices=list(METHODS),
        default="baseline",
        help="; ".join(f"{m.name}: {m.description}" for m in METHODS.values()),
    )
    gen.add_argument("--max-new-tokens", type=budget, default=256, help="new-token budget")
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
    ana.add_argument("--model", required=True, help=model_help)
    ana.add_argument("--prompts", type=Path, help="text file, one prompt per line (default: built-in stories)")
    ana.add_argument("--runs", type=_int_in(1, 10_000), default=8, help="seeds per prompt (default 8)")
    ana.add_argument("--block-size", type=_int_in(1, _BIG), default=25, help="tokens per block (default 25)")
    ana.add_argument("--final-blocks", type=_int_in(2, 1000), default=4, help="blocks compared before EOS")
    ana.add_argument("--max-new-tokens", type=budget, default=400, help="budget to reach EOS")
    ana.add_argument("--out", type=Path, required=True, help="output folder")
    ana.set_defaults(func=_cmd_analyze)

    demo = sub.add_parser(
        "demo",
        parents=[sampling, method],
        help="every method side by side",
        description=(
            "Run baseline and Methods 1-4 on the same prompts and seeds and write a table, samples and figures. "
            "A model with a chat template (e.g. a SmolLM2 .gguf) gets chat prompts through its template."
        ),
    )
    demo.add_argument("--model", default=DEFAULT_MODEL, help=f"{model_help} (default {DEFAULT_MODEL})")
    demo.add_argument(
        "--prompt",
        action="append",
        help="a prompt; repeat for several, generated as one batch (default: a story opening, or three chat "
        "requests for a chat model)",
    )
    demo.add_argument("--runs", type=_int_in(1, 1000), default=None, help="seeds per method (default 3; 1 for chat)")
    demo.add_argument(
        "--max-new-tokens", type=budget, default=None, help="new-token budget (default 300; 120 for chat)"
    )
    demo.add_argument(
        "--analysis-runs",
        type=_int_in(0, 10_000),
        default=None,
        help="extra baseline runs per prompt behind the figures; 0 uses the demo's baseline runs "
        "(default 12; 0 for chat)",
    )
    demo.add_argument("--block-size", type=_int_in(1, _BIG), default=25, help="tokens per block (default 25)")
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default demo-output)")
    demo.set_defaults(func=_cmd_demo)
    _add_serve(sub, model_help)
    return parser


def _add_serve(sub: Any, model_help: str) -> None:
    serve = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server with backstep",
        description=(
            "Serve /v1/completions, /v1/chat/completions (with streaming), /v1/models and /health. Requests choose "
            'their method with "preset" and "backstep" fields next to the standard ones (see the README).'
        ),
    )
    serve.add_argument("--model", required=True, help=model_help + " (vllm: a transformers folder)")
    serve.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="hf (embedded, default) or vllm")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=_int_in(0, 65535), default=8000, help="port (default 8000)")
    serve.add_argument("--served-model-name", help="the name clients pass as `model` (default: the folder name)")
    serve.add_argument(
        "--api-key", help="require `Authorization: Bearer KEY` on /v1/* (or set PERPETUAL_LOGITS_API_KEY)"
    )
    serve.add_argument(
        "--preset",
        choices=("none", "backstep", "dynamic", "chat"),
        default="dynamic",
        help="method of requests that name no preset (default dynamic: Method 4)",
    )
    serve.add_argument("--backstep", metavar="JSON", help="server-wide backstep fields, e.g. '{\"n_remove\": 8}'")
    serve.add_argument("--max-batch", type=_int_in(1, 4096), default=16, help="hf: requests per generate()")
    serve.add_argument("--max-queue", type=_int_in(1, 1_000_000), default=256, help="waiting requests before 429")
    serve.add_argument(
        "--batch-wait-ms", type=_float_in(0.0, 10_000.0), default=10.0, help="hf: wait for requests to batch"
    )
    serve.add_argument("--max-model-len", type=_int_in(2, _BIG), help="context length (default: the model's)")
    serve.add_argument("--chat-template", help="a Jinja chat template (file or text) for models without one")
    serve.add_argument(
        "--default-max-tokens", type=_int_in(1, _BIG), default=256, help="max_tokens of requests that give none"
    )
    serve.add_argument(
        "--vllm-args", metavar="JSON", help="vllm: more engine arguments, e.g. '{\"kv_cache_memory_bytes\": 268435456}'"
    )
    serve.set_defaults(func=_cmd_serve)


# -- helpers -------------------------------------------------------------------------------------------------
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


@contextmanager
def _progress(total: int, desc: str) -> Iterator[Callable[[int], Any]]:
    from tqdm.auto import tqdm

    # Only on a terminal: in a log or a pipe, stderr holds errors and notes only.
    quiet = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    with tqdm(
        total=total, desc=desc, unit="run", file=sys.stderr, leave=False, dynamic_ncols=True, disable=quiet
    ) as bar:
        yield bar.update


def _settings(args: argparse.Namespace) -> MethodSettings:
    return MethodSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        n_remove=getattr(args, "n_remove", 10),
        peak=getattr(args, "peak", 2.0),
        schedule=getattr(args, "schedule", "linear"),
        max_backsteps=50 if getattr(args, "max_backsteps", None) is None else args.max_backsteps,
    )


def _command_line(argv: Sequence[str] | None) -> str:
    words = list(sys.argv[1:] if argv is None else argv)
    return " ".join([_PROG, *(w if w and " " not in w else repr(w) for w in words)])


def _check_prompt_text(prompt: str) -> str:
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 reach argv as lone surrogates
        raise CLIError(f"{_PROG}: error: PROMPT is not valid UTF-8 text") from None
    return prompt


def _summary_line(result: RunResult, window: int | None = None) -> str:
    """``window``: the model's positions, when they lowered the budget (the run stops there, not at the budget)."""
    parts = [f"[{result.method}] {result.new_tokens} new tokens"]
    if result.ended_with_eos:
        parts.append("stopped at EOS")
    elif window is not None:
        parts.append(f"stopped at the model's {window}-position window")
    else:
        parts.append("stopped at the token budget")
    kind = METHODS[result.method].intervention
    if kind != "none":
        parts.append(f"{kind}: {len(result.interventions)}")
    if result.events:
        parts.append(f"tokens removed: {sum(int(e['removed']) for e in result.events)}")
    rate = result.new_tokens / result.seconds if result.seconds > 0 else 0.0
    parts.append(f"{result.seconds:.2f} s ({rate:.0f} tokens/s)")
    return " · ".join(parts)


def _note(text: str) -> None:
    print(f"{_PROG}: note: {text}", file=sys.stderr)


def _fitted_budget(loaded: Any, prompts: Sequence[str], wanted: int, chat: bool) -> int:
    """The smallest budget any of ``prompts`` runs with (the model's window lowers it); one note when lowered."""
    from .app.running import fitted_budget

    budget = min(fitted_budget(loaded, prompt, wanted, chat=chat) for prompt in prompts)
    if budget < wanted:
        which = "" if len(prompts) == 1 else " for the longest prompt"
        _note(
            f"--max-new-tokens {wanted} lowered to {budget}{which}: the prompt and its new tokens must fit the "
            f"model's {loaded.max_positions} positions"
        )
    return budget


# -- commands ------------------------------------------------------------------------------------------------
def _cmd_generate(args: argparse.Namespace) -> int:
    from .app.report import finite
    from .app.running import load_model, run_method

    prompt = _check_prompt_text(args.prompt)
    settings = _settings(args)
    loaded = load_model(args.model)
    # The budget is lowered to fit the model's window: say so, and report what the run used.
    budget = _fitted_budget(loaded, [prompt], settings.max_new_tokens, args.chat)
    window = None
    if budget < settings.max_new_tokens:
        window = loaded.max_positions
        settings = replace(settings, max_new_tokens=budget)
    streamer = None
    if args.stream and not args.json:
        from transformers import TextStreamer

        streamer = TextStreamer(loaded.tokenizer, skip_prompt=args.chat, skip_special_tokens=True)
        if args.chat:
            print(prompt)
    (result,) = run_method(loaded, args.method, prompt, settings, args.seed, streamer=streamer, chat=args.chat)
    if args.json:
        payload = {
            "model": args.model,
            "method": result.method,
            "prompt": result.prompt,
            "chat_template": args.chat,
            "seed": result.seed,
            "settings": asdict(settings),
            "max_new_tokens_requested": args.max_new_tokens,
            "text": result.text,
            "new_tokens": result.new_tokens,
            "ended_with_eos": result.ended_with_eos,
            "intervention_kind": METHODS[result.method].intervention,
            "intervention_steps": result.interventions,
            "backstep_events": result.events,
            "seconds": round(result.seconds, 4),
        }
        print(json.dumps(finite(payload)))
        return 0
    if streamer is None:
        print(prompt + ("\n" if args.chat else "") + result.text)
    print(_summary_line(result, window))
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .app.report import analyze_runs, output_dir, read_prompts, trend_sentences, write_analysis
    from .app.running import load_model

    prompts = read_prompts(args.prompts) if args.prompts is not None else list(DEFAULT_PROMPTS)
    for prompt in prompts:
        _check_prompt_text(prompt)
    settings = _settings(args)
    out = output_dir(args.out)  # before the runs: a bad --out fails in a second, not after minutes
    loaded = load_model(args.model)
    _fitted_budget(loaded, prompts, settings.max_new_tokens, args.chat)
    seeds = list(range(args.seed, args.seed + args.runs))
    with _progress(len(prompts) * len(seeds), "baseline runs") as update:
        analysis = analyze_runs(
            loaded,
            prompts,
            seeds,
            settings,
            args.block_size,
            args.final_blocks,
            args.command_line,
            chat=args.chat,
            progress=update,
        )
    paths, notes = write_analysis(analysis, out)
    for note in notes:
        _note(note)
    print("\n".join(trend_sentences(analysis.trend)))
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .app.demo import DEFAULT_CHAT_PROMPTS, demo_summary, run_demo, write_demo
    from .app.report import output_dir
    from .app.running import load_model

    out = output_dir(args.out)
    for prompt in args.prompt or ():
        _check_prompt_text(prompt)
    loaded = load_model(args.model)
    # A chat model gets chat prompts through its template and a budget that fits a slow model.
    chat = args.chat or loaded.has_chat_template
    prompts = args.prompt or (list(DEFAULT_CHAT_PROMPTS) if chat else [DEFAULT_PROMPTS[0]])
    runs = args.runs if args.runs is not None else (1 if chat else 3)
    if args.max_new_tokens is None:
        args.max_new_tokens = 120 if chat else 300
    analysis_runs = args.analysis_runs if args.analysis_runs is not None else (0 if chat else 12)
    if args.max_backsteps is None and chat:
        # A chat model that has finished wants EOS at every step: each backstep regenerates n_remove tokens
        # for all rows of the batch, so the budget bounds the demo's time (under 3 minutes on 2 cores).
        args.max_backsteps = 8
    settings = _settings(args)
    _fitted_budget(loaded, prompts, settings.max_new_tokens, chat)
    seeds = list(range(args.seed, args.seed + runs))
    total = len(METHODS) * len(seeds) * len(prompts) + analysis_runs * len(prompts)
    with _progress(total, "demo runs") as update:
        report = run_demo(
            loaded,
            prompts,
            seeds,
            settings,
            args.command_line,
            chat=chat,
            analysis_runs=analysis_runs,
            block_size=args.block_size,
            progress=update,
        )
    paths, notes = write_demo(report, out)
    for note in notes:
        _note(note)
    print(demo_summary(report))
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve.server import ServeOptions, run
    except ImportError as err:
        raise CLIError(
            f"{_PROG} serve needs the [serve] extra ({err.name} is missing): pip install 'perpetual-logits[serve]'"
        ) from None
    from dataclasses import fields

    return run(ServeOptions(**{f.name: getattr(args, f.name) for f in fields(ServeOptions)}))


# -- entry point ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``perpetual-logits`` command; return its exit status (0 ok, 2 user error, 130 interrupted).

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
    except ValueError as err:  # the library's word for "this input cannot work": one line, no traceback
        text = " ".join(str(err).split()) or type(err).__name__
        print(f"{_PROG}: error: {text}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help and --version
        return exit_.code if isinstance(exit_.code, int) else 0
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return 130
