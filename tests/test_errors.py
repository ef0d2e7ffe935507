"""Every bad input a clear error (issue 11): each defect found by trying the package as a new user would.

Each test here failed on the code before the fix: a traceback, a wrong result or a hang.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from support import deadline, save_tiny_model

from perpetual_logits import (
    Constant,
    ExponentialDecay,
    LinearDecay,
    PhraseMatcher,
    PostEOSResamplingLogitsProcessor,
    StepDecay,
    SuppressEOSLogitsProcessor,
    _validation,
    cli,
    eos_window,
)
from perpetual_logits.app import demo, report, running
from perpetual_logits.schedules import TABLE_STEPS, factor_table, multipliers


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


# -- CLI ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flag", "value"),
    [("--seed", "4294967296"), ("--temperature", "1e-38"), ("--temperature", "1e300"), ("--peak", "1e-300")],
)
def test_out_of_range_numbers_are_refused_before_any_work(capsys, tiny_dir, flag, value):
    code, out, err = run(capsys, "generate", "--model", str(tiny_dir), flag, value, "--max-new-tokens", "3", "w1")
    assert_one_line_error(code, err, flag)
    assert out == ""


def test_largest_seed_runs(capsys, tiny_dir):
    code, _, err = run(capsys, "generate", "--model", str(tiny_dir), "--seed", str(2**32 - 1), "--json", "w1")
    assert code == 0, err


def test_prompt_that_is_not_utf8_is_a_one_line_error(capsys, tiny_dir):
    # Bytes that are not UTF-8 reach sys.argv as lone surrogates (PEP 383).
    prompt = b"w1 \xff\xfe".decode("utf-8", "surrogateescape")
    code, _, err = run(capsys, "generate", "--model", str(tiny_dir), "--max-new-tokens", "3", prompt)
    assert_one_line_error(code, err, "UTF-8")


@pytest.mark.parametrize("command", ["analyze", "demo"])
@pytest.mark.parametrize("kind", ["existing file", "under a file"])
def test_bad_out_fails_before_the_runs(capsys, tiny_dir, tmp_path, monkeypatch, command, kind):
    existing = tmp_path / "taken"
    existing.write_text("a file, not a folder")
    out = existing if kind == "existing file" else existing / "sub"

    def no_runs(*args, **kwargs):
        raise AssertionError("a run started before --out was checked")

    for module in (running, report, demo):  # the report and the demo hold their own reference
        monkeypatch.setattr(module, "run_method", no_runs)
    start = time.perf_counter()
    code, _, err = run(capsys, command, "--model", str(tiny_dir), "--out", str(out), "--max-new-tokens", "3")
    assert_one_line_error(code, err, str(out.name))
    assert time.perf_counter() - start < 5.0


def test_sliding_window_backstep_runs_and_its_budget_has_a_flag(capsys, tmp_path):
    folder = save_tiny_model(tmp_path / "mistral", arch="mistral", sliding_window=64)
    capsys.readouterr()  # the save's own progress bar
    argv = ["generate", "--model", str(folder), "--method", "backstep", "--max-new-tokens", "30", "--json", "w1"]
    for extra in ([], ["--max-backsteps", "2"]):  # the setting the library's advice names has a flag
        code, _, err = run(capsys, *argv, *extra)
        assert code == 0, err


def test_a_library_refusal_inside_generation_is_one_line_exit_2(capsys, tiny_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise ValueError("backstep generation cannot do this:\nlower max_backsteps")

    monkeypatch.setattr(running, "run_method", refuse)
    code, _, err = run(capsys, "generate", "--model", str(tiny_dir), "--method", "backstep", "w1")
    assert_one_line_error(code, err, "cannot do this: lower max_backsteps")


def test_chat_flag_on_a_model_without_chat_template(capsys, tiny_dir):
    code, _, err = run(capsys, "generate", "--model", str(tiny_dir), "--chat", "--max-new-tokens", "3", "w1")
    assert_one_line_error(code, err, "chat template")


# -- processors: "new call or continuation?" -----------------------------------------------------------------
def test_new_prompt_of_the_expected_length_is_a_new_generation():
    proc = PostEOSResamplingLogitsProcessor(2, schedule=LinearDecay(4.0, 10), trigger="argmax")
    eos_on_top = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    proc(torch.tensor([[1, 3, 3]]), eos_on_top)  # an eviction at step 0 of the first prompt
    # An unrelated prompt whose length equals the previous output's (3 + 1): not a continuation.
    out = proc(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0.0, 1.0, -5.0, 2.0]]))
    assert proc.evictions == [[]]  # the first call's eviction is not carried over
    assert proc.multiplier == [1.0]
    assert torch.allclose(out[0, [0, 1, 3]], torch.tensor([0.0, 1.0, 2.0]))  # no heat from the old call


def test_continuation_is_still_recognised():
    proc = PostEOSResamplingLogitsProcessor(2, schedule=LinearDecay(2.0, 4), trigger="argmax")
    proc(torch.tensor([[1, 3, 3]]), torch.tensor([[0.0, 1.0, 5.0, 2.0]]))
    proc(torch.tensor([[1, 3, 3, 1]]), torch.tensor([[0.0, 1.0, 0.0, 2.0]]))
    assert proc.evictions == [[0]] and proc.multiplier == [1.75]


def test_suppress_records_restart_for_a_new_prompt_in_generate():
    from support import tiny_model

    model = tiny_model("llama")
    proc = SuppressEOSLogitsProcessor(2)
    kwargs = {"do_sample": False, "max_new_tokens": 3, "eos_token_id": 63, "pad_token_id": 0}
    first = model.generate(torch.tensor([[1, 5, 6]]), logits_processor=[proc], **kwargs)
    # The next prompt has exactly the length of the previous output, but other tokens.
    second_prompt = torch.full_like(first, 9)
    model.generate(second_prompt, logits_processor=[proc], **kwargs)
    assert len(proc.eos_probabilities[0]) == 3


# -- schedules: closed forms, bounded arguments ---------------------------------------------------------------
@pytest.mark.parametrize(
    "build",
    [
        lambda: LinearDecay(2, 10**7),
        lambda: StepDecay(2, step=1e-7),
        lambda: ExponentialDecay(2, rate=0.9999999, tolerance=1e-6),
    ],
)
def test_long_schedules_build_and_run_in_no_time(build):
    with deadline(2.0):
        schedule = build()
        proc = PostEOSResamplingLogitsProcessor(2, schedule=schedule, trigger="argmax")
        table = factor_table(schedule)
        length = schedule.length
        assert length > TABLE_STEPS
        steps = torch.tensor([0, 1, TABLE_STEPS + 5, length - 1, length, 10 * length])
        got = multipliers(table, steps, torch.ones(6, dtype=torch.bool))
        want = torch.tensor([schedule(int(s)) for s in steps], dtype=torch.float32)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)
        proc(torch.tensor([[1, 3]]), torch.tensor([[0.0, 1.0, 5.0, 2.0]]))
        assert proc.multiplier == [pytest.approx(schedule(0))]


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: StepDecay(1e300, step=1e-300), "peak"),
        (lambda: StepDecay(2.0, step=1e-300), "step"),
        (lambda: ExponentialDecay(1e308), "peak"),
        (lambda: ExponentialDecay(2.0, rate=1 - 1e-16), "rate"),
        (lambda: LinearDecay(2.0, 10**30), "steps"),
        (lambda: Constant(1e-300), "value"),
    ],
)
def test_extreme_schedule_arguments_are_refused_by_name(build, name):
    with deadline(2.0), pytest.raises(ValueError, match=f"`{name}`"):
        build()


# -- analysis -------------------------------------------------------------------------------------------------
def test_eos_window_without_tokenizer_labels_by_id():
    steps = (torch.tensor([[0.1, 0.6, 0.3]]).log(),)
    window = eos_window(steps, None, k=2)
    assert window[0].tokens == ["<1>", "<2>"]


def test_eos_window_with_a_non_tokenizer_names_the_argument():
    with pytest.raises(TypeError, match="`tokenizer`"):
        eos_window((torch.zeros(1, 3),), object())


# -- phrases --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("phrase", ["", "   ", re.compile("a*"), re.compile(r"\b"), re.compile(r"(?<=a)b*")])
def test_phrases_that_match_nothing_visible_are_refused_by_name(phrase):
    with pytest.raises(ValueError, match="`ban_phrases`"):
        _validation.phrases([phrase], "ban_phrases")


def test_phrase_matcher_refuses_a_regex_with_empty_matches():
    class Tok:
        def decode(self, ids, **kwargs):
            return ""

    with pytest.raises(ValueError, match="`phrases`"):
        PhraseMatcher([re.compile(r"\b")], Tok())


def test_phrases_accepts_strings_and_patterns():
    assert _validation.phrases("The End", "p") == ("The End",)
    assert _validation.phrases(["The End", re.compile(r"\bend\b")], "p")[0] == "The End"
