"""Backstep in batches: time per decode step against plain ``generate()`` and against the forward-count ideal,
peak cache length, and (on CUDA) static cache + ``torch.compile`` with recompiles after rewinds.

A processor forces EOS on a fixed share of (row, step) pairs, so every row rewinds now and then. Plain
``generate()`` runs the same model at the same batch size with EOS never chosen. The *forward-count ideal* of a
backstep run is plain's time per step times the forwards the backstep run actually took: a ratio of 1.0 means a
rewind costs exactly the tokens it regenerates.

    python benchmarks/batch.py                 # CPU: a random 15M Llama, batch 1/8/32
    python benchmarks/batch.py --gpu           # CUDA: a random 1.1B Llama (TinyLlama's shape) in bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor

from benchmarks import common
from perpetual_logits import BackstepConfig, SuppressEOSLogitsProcessor, make_perpetual

EOS = 2


class ForceEOS(LogitsProcessor):
    """Makes EOS the only choice on a share ``rate`` of (row, step) pairs, drawn from its own generator."""

    def __init__(self, rate: float, seed: int = 0) -> None:
        self.rate = rate
        self.seed = seed
        self.generator: torch.Generator | None = None

    def reset(self) -> None:
        self.generator = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.generator is None or self.generator.device != scores.device:
            self.generator = torch.Generator(device=scores.device).manual_seed(self.seed)
        hit = torch.rand(scores.shape[0], device=scores.device, generator=self.generator) < self.rate
        forced = torch.full_like(scores, float("-inf"))
        forced[:, EOS] = 0.0
        return torch.where(hit[:, None], forced, scores)  # type: ignore[return-value]


def build_model(gpu: bool) -> Any:
    # TinyLlama-1.1B's shape on CUDA, stories15M's on CPU; random weights (no hub here).
    hidden, ffn, layers, heads, kv = (2048, 5632, 22, 32, 4) if gpu else (288, 768, 6, 6, 6)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=32000,
        max_position_embeddings=2048,
        eos_token_id=EOS,
        pad_token_id=0,
        bos_token_id=1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    if gpu:
        model = model.to("cuda", torch.bfloat16)
    return make_perpetual(model)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Any, device: torch.device) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def batch_arm(model: Any, batch: int, new_tokens: int, rate: float, repeats: int) -> dict[str, Any]:
    device = model.device
    ids = torch.randint(3, 1000, (batch, 16), generator=torch.Generator().manual_seed(batch)).to(device)
    kwargs = {"do_sample": True, "top_k": 0, "max_new_tokens": new_tokens, "return_dict_in_generate": True}
    plain_times, back_times, forwards, events, peaks = [], [], [], [], []
    cfg = BackstepConfig(n_remove=10, max_backsteps=10**6)
    for r in range(repeats):  # interleaved: plain, backstep, plain, backstep, ...
        torch.manual_seed(r)
        t, _ = timed(
            lambda: model.generate(
                ids, logits_processor=[SuppressEOSLogitsProcessor(EOS, record=False)], backstep=False, **kwargs
            ),
            device,
        )
        plain_times.append(t / new_tokens)
        torch.manual_seed(r)
        force = [ForceEOS(rate, seed=r)]
        t, out = timed(lambda: model.generate(ids, logits_processor=force, backstep=cfg, **kwargs), device)  # noqa: B023
        stats = out.backstep_stats
        back_times.append(t)
        forwards.append(stats.decode_forwards + 1)
        events.append(stats.rewinds)
        peaks.append(stats.peak_cache_slots)
    plain_step = statistics.median(plain_times)
    ideal = [plain_step * f for f in forwards]
    return {
        "batch": batch,
        "new_tokens": new_tokens,
        "plain_ms_per_step": plain_step * 1e3,
        "backstep_ms_per_forward": statistics.median([t / f for t, f in zip(back_times, forwards)]) * 1e3,
        "step_ratio": statistics.median([(t / f) / plain_step for t, f in zip(back_times, forwards)]),
        "total_vs_plain": statistics.median(back_times) / (plain_step * new_tokens),
        "forward_count_ideal_vs_plain": statistics.median(forwards) / new_tokens,
        "total_vs_ideal": statistics.median([t / i for t, i in zip(back_times, ideal)]),
        "rewinds": statistics.median(events),
        "peak_cache_slots": max(peaks),
        "plain_peak_cache_slots": 16 + new_tokens - 1,
    }


def compile_arm(model: Any, new_tokens: int) -> dict[str, Any]:
    """Batch 1, static cache, compiled forward: plain vs backstep without EOS, then recompiles after rewinds."""
    import torch._dynamo.utils as dynamo_utils

    device = model.device
    ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(1)).to(device)
    kwargs = {"do_sample": True, "top_k": 0, "max_new_tokens": new_tokens, "cache_implementation": "static"}
    never = [SuppressEOSLogitsProcessor(EOS, record=False)]
    for _ in range(2):  # warm-up: compile both paths
        model.generate(ids, logits_processor=never, backstep=False, **kwargs)
        model.generate(ids, logits_processor=never, backstep=BackstepConfig(), **kwargs)
    plain, back = [], []
    for r in range(5):
        torch.manual_seed(r)
        plain.append(timed(lambda: model.generate(ids, logits_processor=never, backstep=False, **kwargs), device)[0])
        torch.manual_seed(r)
        back.append(
            timed(lambda: model.generate(ids, logits_processor=never, backstep=BackstepConfig(), **kwargs), device)[0]
        )
    before = sum(dynamo_utils.counters["stats"].values())
    out = model.generate(
        ids,
        logits_processor=[ForceEOS(0.05)],
        backstep=BackstepConfig(n_remove=10),
        return_dict_in_generate=True,
        **kwargs,
    )
    after = sum(dynamo_utils.counters["stats"].values())
    return {
        "plain_ms_per_step": statistics.median(plain) / new_tokens * 1e3,
        "backstep_no_eos_ms_per_step": statistics.median(back) / new_tokens * 1e3,
        "rewinds_in_check_run": len(out.backstep_events[0]),
        "dynamo_stat_changes_after_rewinds": after - before,
    }


def exactness_arm(model: Any, new_tokens: int = 48) -> dict[str, Any]:
    """Batch 4, left-padded prompts, forced rewinds: the largest difference between the logits recorded for each
    kept token and a fresh forward over the final row, for the dynamic and the static cache."""
    device = model.device
    lengths = [5, 9, 12, 16]
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in lengths]
    width = max(lengths)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - n for n in lengths])[:, None]).long().to(device)
    result: dict[str, Any] = {}
    for cache in ("dynamic", "static"):
        torch.manual_seed(0)
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=True,
            top_k=0,
            max_new_tokens=new_tokens,
            logits_processor=[ForceEOS(0.1)],
            backstep=BackstepConfig(n_remove=4, max_backsteps=10**6),
            return_dict_in_generate=True,
            output_logits=True,
            **({"cache_implementation": "static"} if cache == "static" else {}),
        )
        worst = 0.0
        for i, prompt in enumerate(prompts):
            row = prompt + out.sequences[i, width:].tolist()
            with torch.no_grad():
                fresh = model(torch.tensor([row], device=device)).logits[0, len(prompt) - 1 : -1].float()
            recorded = torch.stack([step[i] for step in out.logits]).float()
            worst = max(worst, float((recorded - fresh).abs().max()))
        scale = float(fresh.abs().max())
        result[cache] = {"rewinds": out.backstep_stats.rewinds, "max_abs_diff": worst, "logit_scale": scale}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    common.quiet_transformers()
    if not args.gpu:
        torch.set_num_threads(2)
    model = build_model(args.gpu)
    batches = [1, 8] if args.smoke else [1, 8, 32]
    new_tokens = 24 if args.smoke else (256 if args.gpu else 96)
    repeats = 1 if args.smoke else args.repeats
    results: dict[str, Any] = {"machine": common.environment(), "gpu": args.gpu, "eos_rate": 0.02, "batches": []}
    for batch in batches:
        arm = batch_arm(model, batch, new_tokens, 0.02, repeats)
        results["batches"].append(arm)
        print(json.dumps(arm), flush=True)
    if args.gpu:
        results["exactness_bf16"] = exactness_arm(model)
        print(json.dumps(results["exactness_bf16"]), flush=True)
        results["compile"] = compile_arm(model, new_tokens)
        print(json.dumps(results["compile"]), flush=True)
    out = common.out_dir(args.out, args.smoke)
    name = "batch_gpu.json" if args.gpu else "batch.json"
    (out / name).write_text(json.dumps(results, indent=2))
    print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
