"""The benchmark harness: the stories260K judge (loader, tokenizer, scoring) and smoke runs of both scripts."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest
import torch
from support import STORIES260K, TINYSTORIES, require_model_dir

from benchmarks import llama2c

README_SAMPLE = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, "
    "she saw a big, red ball. She wanted to play with it, but it was too high."
)


@pytest.fixture(scope="module")
def judge() -> llama2c.Judge:
    return llama2c.load_judge(require_model_dir(STORIES260K).parent)


def reference_encode(tok: llama2c.Llama2cTokenizer, text: str) -> list[int]:
    """llama2.c's encode(), literally: O(n²) best-pair merging, leftmost on ties."""
    ids = [tok._ids[b" "]] if text else []
    for char in text:
        piece = tok._ids.get(char.encode())
        ids += [piece] if piece is not None else [b + 3 for b in char.encode()]
    while True:
        best, best_i, best_id = -1e10, -1, -1
        for i in range(len(ids) - 1):
            merged = tok._ids.get(tok.pieces[ids[i]] + tok.pieces[ids[i + 1]])
            if merged is not None and tok.scores[merged] > best:
                best, best_i, best_id = tok.scores[merged], i, merged
        if best_i < 0:
            return [1, *ids]
        ids[best_i : best_i + 2] = [best_id]


# -- loader -------------------------------------------------------------------------------------------------
@pytest.mark.models
def test_greedy_sample_matches_readme(judge):
    text = llama2c.greedy(judge, "Once upon a time", max_new_tokens=60)
    assert text.startswith(README_SAMPLE), text


@pytest.mark.models
def test_model_shape(judge):
    config = judge.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 5, 8)
    assert (config.num_key_value_heads, config.vocab_size, config.intermediate_size) == (4, 512, 172)
    assert sum(p.numel() for p in judge.model.parameters()) == 260_032
    assert judge.model.lm_head.weight.data_ptr() == judge.model.model.embed_tokens.weight.data_ptr()


def test_permute_rotary_moves_pairs_to_halves():
    heads, head_size, dim = 2, 8, 3
    w = torch.arange(heads * head_size * dim, dtype=torch.float32).view(heads * head_size, dim)
    out = llama2c._permute_rotary(w, heads)
    for h in range(heads):
        for i in range(head_size // 2):
            # interleaved pair (2i, 2i+1) -> rotate-half pair (i, i + head_size/2)
            assert torch.equal(out[h * head_size + i], w[h * head_size + 2 * i])
            assert torch.equal(out[h * head_size + i + head_size // 2], w[h * head_size + 2 * i + 1])


def test_loader_rejects_bad_files(tmp_path):
    with pytest.raises(ValueError, match="`path`"):
        llama2c.load_llama2c_model(tmp_path / "missing.bin")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x01\x00\x00\x00" * 7 + b"\x00" * 12)
    with pytest.raises(ValueError, match="`path`"):
        llama2c.load_llama2c_model(bad)
    with pytest.raises(ValueError, match="`path`"):
        llama2c.Llama2cTokenizer(tmp_path / "missing-tok.bin")


# -- tokenizer ----------------------------------------------------------------------------------------------
@pytest.mark.models
def test_tokenizer_matches_reference_merge_loop(judge):
    tok = judge.tokenizer
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz   ,.!?'\"\nLTSO é日"
    texts = [
        "Once upon a time",
        README_SAMPLE,
        "Hello\nworld é 日本",
        "  leading spaces and trailing  ",
        "",
        *("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60))) for _ in range(40)),
    ]
    for text in texts:
        assert tok.encode(text) == reference_encode(tok, text), text


@pytest.mark.models
def test_tokenizer_round_trip_and_offsets(judge):
    tok = judge.tokenizer
    for text in ("Once upon a time", 'Lily said, "Hi!"\nTom smiled. é 日本', README_SAMPLE):
        ids, offsets = tok.encode_with_offsets(text)
        assert tok.decode(ids) == text
        assert ids[0] == llama2c.BOS_ID and offsets[0] == -1
        assert offsets[1:] == sorted(offsets[1:]) and offsets[1] == 0
        # Each token's text starts at its offset (after the dummy-prefix space of the first one).
        for k in range(2, len(ids)):
            piece = tok.pieces[ids[k]]
            if not 3 <= ids[k] < 259:
                assert text.encode()[len(text[: offsets[k]].encode()) :].startswith(piece)
    assert tok.encode("Once", bos=False)[0] != llama2c.BOS_ID
    with pytest.raises(ValueError, match="`text`"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`ids`"):
        tok.decode([5000])


# -- judge --------------------------------------------------------------------------------------------------
@pytest.mark.models
def test_strided_window_equals_full_context_where_it_fits(judge):
    ids = judge.tokenizer.encode(README_SAMPLE * 2)
    assert 100 < len(ids) < 512
    full = judge.token_nll(ids)
    small = llama2c.Judge(judge.model, judge.tokenizer, window=64, stride=16).token_nll(ids)
    assert full.shape == small.shape == (len(ids) - 1,)
    assert torch.allclose(full[:63], small[:63], atol=1e-5)  # the first window is identical
    assert torch.isfinite(small).all()
    # Less context can only be a little worse on average for this model; never wildly different.
    assert abs(small.mean().item() - full.mean().item()) < 0.5


@pytest.mark.models
def test_nll_boundary_and_bits_per_char(judge):
    text = README_SAMPLE
    total, chars = judge.nll(text)
    assert chars == len(text) and total > 0
    cut = text.index("One day")
    after, after_chars = judge.nll(text, cut)
    assert after_chars == len(text) - cut and 0 < after < total
    bpc = judge.bits_per_char([text])
    assert bpc == pytest.approx(total / len(text) / math.log(2))
    rng = random.Random(0)
    shuffled = "".join(rng.sample(text, len(text)))
    assert judge.bits_per_char([shuffled]) > 2 * bpc  # natural text is far more predictable
    assert llama2c.judge_bits_per_char([text], models_dir=STORIES260K.parent) == pytest.approx(bpc)
    assert math.isnan(judge.bits_per_char([]))
    with pytest.raises(ValueError, match="`start_char`"):
        judge.nll(text, len(text) + 1)
    with pytest.raises(ValueError, match="`start_chars`"):
        judge.bits_per_char([text], [0, 1])
    with pytest.raises(ValueError, match="`texts`"):
        judge.bits_per_char(text)
    with pytest.raises(ValueError, match="`stride`"):
        llama2c.Judge(judge.model, judge.tokenizer, window=64, stride=64)


# -- smoke runs of the scripts ------------------------------------------------------------------------------
@pytest.mark.models
def test_speed_smoke(tmp_path):
    require_model_dir(TINYSTORIES)
    from benchmarks import common, speed

    results_md = common.REPO / "benchmarks" / "RESULTS.md"
    before = results_md.stat().st_mtime_ns if results_md.exists() else None
    out = tmp_path / "results"
    assert speed.main(["--smoke", "--out", str(out)]) == 0
    data = json.loads((out / "speed.json").read_text())
    arms = data["models"]["tinystories-656k"]["arms"]
    assert {"plain generate()", "Method 1: SuppressEOSLogitsProcessor", "bare forward loop"} <= set(arms)
    assert arms["plain generate()"]["ratio_to_plain"]["of_medians"] == pytest.approx(1.0)
    assert all(n == data["settings"]["new_tokens"] for n in arms["plain generate()"]["new_tokens"])
    assert data["targets"]
    assert (tmp_path / "RESULTS.md").read_text().startswith("# perpetual_logits benchmarks")
    assert (out / "speed_ratios.png").stat().st_size > 1000
    after = results_md.stat().st_mtime_ns if results_md.exists() else None
    assert before == after  # a smoke run never touches the real report


@pytest.mark.models
def test_quality_smoke(tmp_path):
    require_model_dir(TINYSTORIES)
    require_model_dir(STORIES260K)
    from benchmarks import quality

    out = tmp_path / "results"
    assert quality.main(["--smoke", "--out", str(out)]) == 0
    data = json.loads((out / "quality.json").read_text())
    methods = data["methods"]
    assert set(methods) == {a.name for a in quality.ARMS}
    runs = data["settings"]["runs"]
    for name, m in methods.items():
        assert m["runs"] == runs
        assert 0.0 <= m["rep"]["4"] <= m["rep"]["2"] < 1.0, name
        assert m["glued_words_per_1k"] >= 0 and 0.0 <= m["line_repeats"] < 1.0, name
    for name in set(methods) - {"baseline"}:
        # Every arm but the baseline writes to max_new_tokens (an unfinished end marker may be dropped there), so all
        # have the same equal-window pairs.
        assert methods[name]["reached_max"] == runs, name
        assert methods[name]["judge_runs_window"] == data["reference"]["judge_window_pairs"], name
    assert methods["Method 4 + loop rewinds"]["rewinds_per_run_by_reason"].keys() <= {"eos", "loop"}
    assert "ending" not in methods["Method 4 + ban at phrase start"]["rewinds_per_run_by_reason"]
    assert "phrase" not in methods["Method 4 + endings rewound"]["rewinds_per_run_by_reason"]
    assert data["reference"]["judge_bpc_natural"] > 0
    assert data["goal"]["arm"] == "Method 4 + endings rewound"
    text = (out / "quality.md").read_text()
    assert "### Definitions" in text and "judge bpc after stop" in text and "equal window" in text
    assert "Issue 12's goal" in text
    assert (tmp_path / "RESULTS.md").exists()


@pytest.mark.models
@pytest.mark.slow
def test_quality_chat_smoke(tmp_path):
    # SmolLM2 is slow on 2 cores: 2 prompts × 12 tokens × every arm, about 40 s.
    from support import MODELS_DIR

    require_model_dir(MODELS_DIR / "smollm2-135m-instruct")
    from benchmarks import quality_chat

    out = tmp_path / "results"
    assert quality_chat.main(["--smoke", "--out", str(out)]) == 0
    data = json.loads((out / "quality_chat.json").read_text())
    assert set(data["arms"]) == set(quality_chat.ARMS)
    for name, arm in data["arms"].items():
        assert arm["answers"] == 2, name
        assert 0.0 <= arm["rep4"] < 1.0 and 0.0 < arm["distinct2"] <= 1.0, name
    assert "judge limits" in data["definitions"]
    assert "| baseline |" in (out / "quality_chat.md").read_text()


@pytest.mark.models
@pytest.mark.slow
def test_length_following_smoke_and_combined_report(tmp_path):
    # SmolLM2: one topic, 12 tokens, every arm.
    from support import MODELS_DIR

    require_model_dir(MODELS_DIR / "smollm2-135m-instruct")
    from benchmarks import length_following

    out = tmp_path / "results"
    assert length_following.main(["--smoke", "--out", str(out)]) == 0
    data = json.loads((out / "length_following.json").read_text())
    assert list(data["arms"]) == list(length_following.ARMS)
    for name, arm in data["arms"].items():
        assert arm["answers"] == 1 and 0.0 <= arm["S_l"] <= 100.0 and 0.0 <= arm["natural_endings"] <= 1.0, name
    # the per-target report reads such runs back
    joined = tmp_path / "joined"
    assert length_following.main(["--combine", str(out / "length_following.json"), "--out", str(joined)]) == 0
    report = (joined / "length_following.md").read_text()
    assert all(f"| {name} |" in report for name in data["arms"])
    assert (joined / "length_following.png").stat().st_size > 0
    assert length_following.length_score(100, 100) == 100.0 and length_following.length_score(100, 400) == 0.0


def test_glued_words_and_arms():
    from benchmarks import quality

    assert quality.glued_words("They played with.none. They were happy.The end. Mr. Tom.") == 2
    assert quality.glued_words("It was 3.5 feet. A.") == 0
    assert len({a.name for a in quality.ARMS}) == len(quality.ARMS)
    with pytest.raises(SystemExit):
        quality.main(["--smoke", "--arms", "no such arm"])


def test_scripts_run_as_files():
    # `python benchmarks/speed.py --help` must work from any directory (the script adds the repo root).
    import subprocess
    import sys

    from benchmarks import common

    # run_all imports speed, quality and report the same way, so one interpreter start covers all four.
    for script in ("run_all.py",):
        proc = subprocess.run(
            [sys.executable, str(common.REPO / "benchmarks" / script), "--help"],
            capture_output=True,
            text=True,
            cwd="/",
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert "usage" in proc.stdout


def test_vllm_processor_cost_smoke(capsys):
    from benchmarks import vllm_processor_cost

    vllm_processor_cost.main(["--batch", "2", "--vocab", "64", "--steps", "1", "--repeats", "1"])
    table = capsys.readouterr().out
    assert "| early |" in table and "| widen top-k + top-p |" in table


def test_vllm_benchmark_refuses_hf_counts_it_has_no_prompts_for(capsys):
    """The HF arm reuses the vLLM arms' prompts: a count missing from --counts is refused before any arm runs
    (it used to fail with a KeyError after the vLLM arms had run for minutes)."""
    from benchmarks import vllm_serving

    with pytest.raises(SystemExit):
        vllm_serving.main(["--model", "unused", "--hf-python", "python", "--counts", "32", "--hf-counts", "8"])
    assert "--hf-counts (8) must be among --counts (32)" in capsys.readouterr().err


# -- pooling runs of policy_cost.py ---------------------------------------------------------------------------
def _policy_cost_run(path, reference, arm, settings=None):
    """A policy_cost.json of one run at batch 32 with these per-repeat steps (ms) for the reference and one arm."""
    run = {
        "tokens": 96,
        "repeats": len(reference),
        "phrases": 10000,
        "allow_rewinds": False,
        "model": "TinyStories-656K on cpu",
        "clock": "CPU time",
        **(settings or {}),
        "batches": {
            "32": {
                "dynamic": {"ms_per_step_by_repeat": reference, "ratio_of_medians": 1.0},
                "chat": {
                    "ms_per_step_by_repeat": arm,
                    "ratio_of_medians": statistics.median(arm) / statistics.median(reference),
                },
                "_seeds": {"used": [1000]},
            }
        },
    }
    path.write_text(json.dumps(run))
    return path


def test_pooled_policy_cost_pairs_repeats_within_runs_and_pools_over_runs(tmp_path, capsys):
    from benchmarks import policy_cost_pooled

    # Run 1: a fast machine, the arm 5 % above in each repeat; run 2: the reference step drifting, the arm 12 %
    # above. Pairing repeats cancels the drift; pooling counts both runs' repeats.
    one = _policy_cost_run(tmp_path / "1.json", [4.0, 4.0, 4.0], [4.2, 4.2, 4.2])
    two = _policy_cost_run(tmp_path / "2.json", [5.0, 6.0, 4.0], [5.6, 6.72, 4.48])
    pooled = policy_cost_pooled.pool(policy_cost_pooled.load_runs([one, two]))["32"]["chat"]
    assert pooled["paired_median_by_run"] == pytest.approx([1.05, 1.12])
    assert pooled["runs_above_goal_by_paired_median"] == 1
    assert pooled["pooled_paired_median"] == pytest.approx((1.05 + 1.12) / 2)  # three values of each
    low, high = pooled["interval_95"]
    assert low == pytest.approx(1.05) and high == pytest.approx(1.12)  # draws of one run only reach either end
    assert policy_cost_pooled.main([str(one), str(two), "--out", str(tmp_path / "pooled.md")]) == 0
    table = (tmp_path / "pooled.md").read_text()
    assert "| 32 | chat |" in table and "1 of 2" in table and capsys.readouterr().out == table


def test_pooled_interval_is_reproducible_and_narrows_with_more_runs():
    from benchmarks.policy_cost_pooled import bootstrap_interval

    rng = random.Random(1)
    runs = [[1.08 + rng.gauss(0, 0.1) for _ in range(30)] for _ in range(12)]
    assert bootstrap_interval(runs) == bootstrap_interval(runs)
    few_low, few_high = bootstrap_interval(runs[:3])
    low, high = bootstrap_interval(runs)
    assert low <= statistics.median([r for run in runs for r in run]) <= high
    assert high - low < few_high - few_low
    assert bootstrap_interval([[1.05, 1.05], [1.05]]) == (1.05, 1.05)
    with pytest.raises(ValueError, match="`groups`"):
        bootstrap_interval([[1.0], []])


def test_pooled_policy_cost_refuses_runs_it_cannot_pool(tmp_path):
    from benchmarks import policy_cost_pooled

    one = _policy_cost_run(tmp_path / "1.json", [4.0, 4.0], [4.2, 4.2])
    other = _policy_cost_run(tmp_path / "2.json", [4.0, 4.0], [4.2, 4.2], {"phrases": 1000})
    with pytest.raises(ValueError, match="`paths`"):
        policy_cost_pooled.load_runs([one])
    with pytest.raises(ValueError, match="phrases"):
        policy_cost_pooled.load_runs([one, other])
    (tmp_path / "3.json").write_text(json.dumps({"tokens": 96}))
    with pytest.raises(ValueError, match=r"not a policy_cost\.py result"):
        policy_cost_pooled.load_runs([one, tmp_path / "3.json"])
    with pytest.raises(SystemExit):
        policy_cost_pooled.main([str(one)])
