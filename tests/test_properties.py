"""Property tests of the promise "every bad input a clear error" (issue 11).

* The command line: any argument list — valid and invalid numbers, unknown flags, odd paths and prompts —
  exits 0 or 2; exit 2 prints exactly one line on stderr and never a traceback. The command runs in-process
  (``cli.main(argv)``) against a tiny random model saved to a temp dir, with bounded sizes.
* The public constructors: any value of any argument either constructs or raises ``ValueError``/``TypeError``
  naming an argument — never another exception type, never a hang.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import deadline, save_tiny_model

from perpetual_logits import (
    Constant,
    CosineDecay,
    EarlyTrigger,
    EvictionBudgetCriteria,
    ExponentialDecay,
    LinearDecay,
    PostEOSResamplingLogitsProcessor,
    RepetitionLoopCriteria,
    StepDecay,
    StepStatsRecorder,
    SuppressEOSLogitsProcessor,
    cli,
)
from perpetual_logits.app.methods import METHODS, MethodSettings


# -- the command line -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-property")
    model = save_tiny_model(root / "model")
    a_file = root / "a-file.txt"
    a_file.write_text("w1 w2\nw3\n")
    bad_prompts = root / "latin1.txt"
    bad_prompts.write_bytes(b"w1 \xe9\xff\n")
    return {"model": model, "file": a_file, "bad_prompts": bad_prompts, "root": root}


def numbers(valid: st.SearchStrategy[Any], only_valid: bool = False) -> st.SearchStrategy[str]:
    """Small valid values (so a run stays short) and every kind of invalid one."""
    if only_valid:
        return valid.map(str)
    invalid = st.sampled_from(
        ["-1", "0", "-0.0", "nan", "inf", "-inf", "1e-38", "1e308", "4294967296", "10" * 12, "", "abc", "1.5.2", "0x10"]
    )
    return st.one_of(valid.map(str), invalid, st.text(max_size=6))


def prompts(only_valid: bool = False) -> st.SearchStrategy[str]:
    if only_valid:
        return st.sampled_from(["w1", "w1 w2 w3", "w7\nw8", "ünï w1"])
    odd = st.sampled_from(["", " ", "w1 w2", "-x", "--", "\udcff", "w1\udcfe", "ünïcödé", "\x00", "w1 " * 40])
    return st.one_of(odd, st.text(max_size=12))


@st.composite
def argument_lists(draw: st.DrawFn, places: dict[str, Path]) -> list[str]:
    # Half the draws are valid throughout, so that real runs are exercised as much as errors.
    ok = draw(st.booleans())
    command = draw(st.sampled_from(["generate", "analyze", "demo"] + ([] if ok else ["frobnicate"])))
    models = [str(places["model"])] + ([] if ok else [str(places["root"] / "missing"), str(places["file"]), ""])
    model = draw(st.sampled_from(models))
    argv: list[str] = [command]
    # demo without --model loads the default Hub model: the network, not what is tested here.
    if ok or command == "demo" or draw(st.integers(0, 9)):
        argv += ["--model", model]
    optional: dict[str, st.SearchStrategy[str]] = {
        "--temperature": numbers(st.sampled_from([0.5, 1.0, 2.0]), ok),
        "--top-k": numbers(st.integers(0, 60), ok),
        "--top-p": numbers(st.sampled_from([0.5, 0.9, 1.0]), ok),
        "--seed": numbers(st.sampled_from([0, 1, 2**32 - 1]), ok),
        "--n-remove": numbers(st.integers(1, 12), ok),
        "--peak": numbers(st.sampled_from([0.5, 2.0, 3.0]), ok),
        "--schedule": st.sampled_from(["linear", "step", "cosine", "exponential", "constant"] + ([] if ok else ["z"])),
        "--max-backsteps": numbers(st.integers(0, 5), ok),
        "--method": st.sampled_from([*METHODS] + ([] if ok else ["method5"])),
    }
    if not ok:
        optional["--unknown-flag"] = st.just("1")
    if command == "generate":
        optional["--max-new-tokens"] = numbers(st.integers(1, 6), ok)
    elif command == "analyze":
        optional.update(
            {
                "--max-new-tokens": numbers(st.integers(1, 6), ok),
                "--runs": numbers(st.integers(1, 2), ok),
                "--block-size": numbers(st.integers(1, 4), ok),
                "--final-blocks": numbers(st.integers(2, 3), ok),
                "--prompts": st.sampled_from(
                    [str(places["file"])] + ([] if ok else [str(places["bad_prompts"]), str(places["root"]), "/x"])
                ),
            }
        )
    elif command == "demo":
        optional.update(
            {
                "--max-new-tokens": numbers(st.integers(1, 4), ok),
                "--runs": numbers(st.just(1), ok),
                "--analysis-runs": numbers(st.integers(0, 1), ok),
                "--block-size": numbers(st.integers(1, 4), ok),
                "--prompt": prompts(ok),
            }
        )
    flags = draw(st.lists(st.sampled_from(sorted(optional)), max_size=5, unique=True))
    for flag in flags:
        argv += [flag, draw(optional[flag])]
    if command in ("analyze", "demo") and (ok or draw(st.integers(0, 5))):
        out = draw(st.sampled_from(["out", "nested/out"] + ([] if ok else ["FILE", "FILE/under"])))
        path = str(places["file"]) if out == "FILE" else str(places["file"] / "under") if out == "FILE/under" else ""
        argv += ["--out", path or str(places["root"] / "runs" / out)]
    if not ok and draw(st.booleans()) and draw(st.booleans()):
        argv.append("--chat")  # the tiny model has no chat template: an error
    if command == "generate":
        if ok or draw(st.integers(0, 9)):
            argv.append(draw(prompts(ok)))
        if draw(st.booleans()):
            argv.append("--json")
    # Keep demo runs short unless the draw already chose their size.
    if command == "demo":
        for flag, value in (("--max-new-tokens", "3"), ("--runs", "1"), ("--analysis-runs", "0")):
            if flag not in argv:
                argv += [flag, value]
    if command == "analyze":
        for flag, value in (("--max-new-tokens", "4"), ("--runs", "1")):
            if flag not in argv:
                argv += [flag, value]
    return argv


def call(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_cli_exits_0_or_2_with_one_line(places):
    codes: list[int] = []

    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(argument_lists(places))
    def check(argv: list[str]) -> None:
        code, _, err = call(argv)
        codes.append(code)
        assert code in (0, 2), (argv, code, err)
        assert "Traceback" not in err, (argv, err)
        if code == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("perpetual-logits"), (argv, err)

    check()
    # The draws must reach real runs, not only argument errors.
    assert codes.count(0) >= 5, f"only {codes.count(0)} of {len(codes)} runs succeeded"


# -- the constructors -------------------------------------------------------------------------------------------
def any_value() -> st.SearchStrategy[Any]:
    """Any value a user might pass: numbers of every size and sign, non-numbers, containers, tensors."""
    scalars = st.one_of(
        st.integers(-(10**30), 10**30),
        st.sampled_from([0, 1, 2, 3, 10, 2**31, 2**63, -1]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([0.0, 0.5, 1.0, 2.0, 1e-300, 1e300, 1 - 1e-16, 5e-324]),
        st.booleans(),
        st.none(),
        st.text(max_size=5),
        st.sampled_from(["sample", "argmax", "default", "linear"]),
    )
    containers = st.one_of(
        st.lists(scalars, max_size=3),
        st.tuples(scalars),
        st.builds(torch.tensor, st.lists(st.integers(0, 70), max_size=3)),
        st.builds(torch.tensor, st.lists(st.floats(-2, 2), max_size=3)),
        st.just(object()),
        st.just({"a": 1}),
        st.just(re.compile("x")),
    )
    return st.one_of(scalars, containers)


CONSTRUCTORS: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {
    "LinearDecay": (LinearDecay, ("peak", "steps")),
    "StepDecay": (StepDecay, ("peak", "step")),
    "CosineDecay": (CosineDecay, ("peak", "steps")),
    "ExponentialDecay": (ExponentialDecay, ("peak", "rate", "tolerance")),
    "Constant": (Constant, ("value", "steps")),
    "SuppressEOSLogitsProcessor": (SuppressEOSLogitsProcessor, ("eos_token_id", "record")),
    "PostEOSResamplingLogitsProcessor": (PostEOSResamplingLogitsProcessor, ("eos_token_id", "schedule", "trigger")),
    "StepStatsRecorder": (StepStatsRecorder, ("eos_token_id", "token_id")),
    "EarlyTrigger": (EarlyTrigger, ("window", "eos_threshold", "entropy_slope")),
    "RepetitionLoopCriteria": (RepetitionLoopCriteria, ("min_span", "max_span", "repeats")),
    "EvictionBudgetCriteria": (EvictionBudgetCriteria, ("source", "max_events")),
    "MethodSettings": (
        MethodSettings,
        ("max_new_tokens", "temperature", "top_k", "top_p", "n_remove", "peak", "schedule", "max_backsteps"),
    ),
}


def _exercise(obj: Any) -> None:
    """Use what was built a little: a schedule must give values and a length without hanging."""
    if isinstance(obj, (LinearDecay, StepDecay, CosineDecay, ExponentialDecay, Constant)):
        length = obj.length
        assert length is None or 0 <= length <= 2**31
        values = obj.factors(torch.tensor([0, 1, 5, 2**40]))
        assert torch.isfinite(values).all() and (values > 0).all()
        assert math.isfinite(obj(0))
        PostEOSResamplingLogitsProcessor(2, schedule=obj)


@pytest.mark.parametrize("name", sorted(CONSTRUCTORS))
def test_constructors_accept_or_name_the_argument(name):
    build, arguments = CONSTRUCTORS[name]

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(any_value(), min_size=1, max_size=len(arguments)))
    def check(values: list[Any]) -> None:
        kwargs = dict(zip(arguments, values))
        with deadline(2.0):
            try:
                obj = build(**kwargs)
            except (ValueError, TypeError) as err:
                message = str(err)
                assert any(f"`{a}`" in message or f"'{a}'" in message for a in arguments), (kwargs, message)
                return
            _exercise(obj)

    check()
