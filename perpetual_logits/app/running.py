"""Loading a model and running one named method on prompts: what the CLI, the demo and the benchmarks run.

:func:`load_model` loads a model by Hub id, local folder, GGUF file or folder holding one;
:func:`run_method` generates with one method of :data:`~perpetual_logits.app.methods.METHODS` from one prompt or a
batch of prompts and reports what came out (:class:`RunResult`). Every user error (a missing model, a prompt the
model cannot take) raises ``ValueError`` with a one-line message.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import _validation
from .methods import MAX_SEED, GenerationPlan, MethodSettings, generation_arguments, sampling_kwargs

__all__ = ["LoadedModel", "RunResult", "encode_prompts", "fitted_budget", "load_model", "run_method"]


@dataclass
class LoadedModel:
    """A model with what the runs need to know about it."""

    name: str
    model: Any
    tokenizer: Any
    eos: list[int]
    pad: int
    max_positions: int | None

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _is_gguf(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".gguf"
    return path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.gguf"))


def load_model(name: str) -> LoadedModel:
    """Model and tokenizer of a Hub id, a local folder, a ``.gguf`` file or a folder holding one.

    GGUF models go through :func:`perpetual_logits.app.chat_model.load_chat_model` (converted once and cached).
    Every failure raises ``ValueError`` with one line.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"`model` must be a Hub id or a path, got {name!r}")
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1
    if looks_local and not path.exists():
        raise ValueError(f"model path {name!r} does not exist")
    try:
        if looks_local and _is_gguf(path):
            from .chat_model import load_chat_model

            model, tokenizer = load_chat_model(path)
        else:
            if looks_local and not path.is_dir():
                raise ValueError(f"model path {name!r} is neither a folder nor a .gguf file")
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name)
    except Exception as err:  # any loading failure is a user error here: report it in one line
        raise ValueError(f"cannot load model {name!r}: {_first_line(err)}") from None
    model.eval()
    eos_raw = model.generation_config.eos_token_id
    if eos_raw is None:
        eos_raw = tokenizer.eos_token_id
    if eos_raw is None:
        raise ValueError(f"model {name!r} defines no EOS token (generation_config.eos_token_id)")
    eos = [int(eos_raw)] if isinstance(eos_raw, int) else [int(i) for i in eos_raw]
    vocab = int(model.config.get_text_config().vocab_size)
    if any(not 0 <= i < vocab for i in eos):
        raise ValueError(f"model {name!r} has EOS id(s) {eos} outside its vocabulary of {vocab}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    config = model.config
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return LoadedModel(name, model, tokenizer, eos, int(pad), int(max_positions) if max_positions else None)


# -- runs ----------------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What one row of one generation produced. ``interventions``: steps of EOS-on-top / evictions / backsteps."""

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
    steps: int = 0  # generated steps of this row, the EOS step included

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (no logits)."""
        return {
            "seed": self.seed,
            "prompt": self.prompt,
            "new_tokens": self.new_tokens,
            "ended_with_eos": self.ended_with_eos,
            "intervention_steps": self.interventions,
            "backstep_events": self.events,
            "seconds": round(self.seconds, 4),
            "text": self.text,
        }


def _check_text(prompt: object, name: str = "prompt") -> str:
    if not isinstance(prompt, str):
        raise ValueError(f"`{name}` must be a str, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 on the command line
        raise ValueError(f"the {name} is not valid UTF-8 text: {prompt!r}") from None
    return prompt


def encode_prompts(loaded: LoadedModel, prompts: Sequence[str], chat: bool = False) -> dict[str, torch.Tensor]:
    """Token ids and attention mask of ``prompts`` (left-padded when they differ in length).

    With ``chat``, each prompt is one user turn put through the tokenizer's chat template (with the
    assistant's generation prompt).
    """
    texts = [_check_text(p) for p in prompts]
    if not texts:
        raise ValueError("`prompts` is empty")
    tokenizer = loaded.tokenizer
    if chat:
        if not loaded.has_chat_template:
            raise ValueError(f"model {loaded.name!r} has no chat template: drop --chat / chat=True")
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in texts
        ]
    rows = [tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in texts]
    for prompt, ids in zip(prompts, rows, strict=True):
        if not ids:
            raise ValueError(f"the prompt {prompt!r} encodes to no tokens")
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), loaded.pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[i, width - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def fitted_budget(loaded: LoadedModel, prompts: str | Sequence[str], wanted: int, chat: bool = False) -> int:
    """The new-token budget :func:`run_method` uses: ``wanted``, lowered so that the longest prompt and its new
    tokens fit the model's position table (raises ``ValueError`` when the prompt alone does not fit)."""
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    width = int(encode_prompts(loaded, batch, chat=chat)["input_ids"].shape[1])
    return _budget(loaded, width, wanted)


def _budget(loaded: LoadedModel, prompt_length: int, wanted: int) -> int:
    """``wanted`` new tokens, capped so that the sequence fits the model's position table."""
    if loaded.max_positions is None:
        return wanted
    room = loaded.max_positions - prompt_length
    if room < 1:
        raise ValueError(f"the prompt has {prompt_length} tokens; the model takes at most {loaded.max_positions}")
    return min(wanted, room)


def _interventions(plan: GenerationPlan, out: Any, row: int) -> tuple[list[int], list[dict[str, Any]]]:
    from ..processors import PostEOSResamplingLogitsProcessor, SuppressEOSLogitsProcessor

    proc = plan.processor
    if isinstance(proc, SuppressEOSLogitsProcessor):
        steps = proc.eos_top_steps
        return (list(steps[row]) if len(steps) > row else []), []
    if isinstance(proc, PostEOSResamplingLogitsProcessor):
        steps = proc.evictions
        return (list(steps[row]) if len(steps) > row else []), []
    if plan.perpetual:
        rows = getattr(out, "backstep_events", None) or []
        events = rows[row] if len(rows) > row else []
        return [int(e.step) for e in events], [asdict(e) for e in events]
    return [], []


def run_method(
    loaded: LoadedModel,
    method: str,
    prompts: str | Sequence[str],
    settings: MethodSettings,
    seed: int,
    streamer: Any = None,
    record_logits: bool = False,
    chat: bool = False,
) -> list[RunResult]:
    """Generate once with ``method`` from one prompt or a batch of prompts; one :class:`RunResult` per prompt.

    Args:
        loaded (`LoadedModel`): from :func:`load_model`.
        method (`str`): a name in :data:`METHODS`.
        prompts (`str` or `list[str]`): one prompt, or several generated as one batch.
        settings (`MethodSettings`): sampling and method settings.
        seed (`int`): in [0, 2**32 - 1].
        streamer (*optional*): a transformers streamer (one prompt only).
        record_logits (`bool`, defaults to False): keep each row's raw logits (``RunResult.logits``).
        chat (`bool`, defaults to False): put each prompt through the tokenizer's chat template.
    """
    from transformers import set_seed

    plan = generation_arguments(method, loaded.eos, settings, loaded.tokenizer)
    seed = _validation.positive_int(seed, "seed", minimum=0, maximum=MAX_SEED)
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    if streamer is not None and len(batch) != 1:
        raise ValueError("a streamer shows one prompt; got a batch of prompts")
    inputs = encode_prompts(loaded, batch, chat=chat)
    width = int(inputs["input_ids"].shape[1])
    model = loaded.model
    if plan.perpetual:
        from ..mixin import make_perpetual

        model = make_perpetual(model)
    kwargs: dict[str, Any] = {
        **sampling_kwargs(settings),
        **plan.kwargs,
        "max_new_tokens": _budget(loaded, width, settings.max_new_tokens),
        "pad_token_id": loaded.pad,
        "eos_token_id": loaded.eos,
        "return_dict_in_generate": True,
        "output_logits": record_logits,
        "streamer": streamer,
    }
    set_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    seconds = time.perf_counter() - start

    results = []
    eos = set(loaded.eos)
    for row, prompt in enumerate(batch):
        generated = [int(t) for t in out.sequences[row, width:].tolist()]
        # generate() stops a row at its first EOS and pads after it.
        cut = next((i for i, t in enumerate(generated) if t in eos), None)
        ended = cut is not None
        steps = cut + 1 if cut is not None else len(generated)
        if cut is not None:
            generated = generated[:cut]
        interventions, events = _interventions(plan, out, row)
        logits = None
        if record_logits and out.logits is not None:
            logits = tuple(step[row : row + 1] for step in out.logits[:steps])
        results.append(
            RunResult(
                method=plan.method.name,
                prompt=prompt,
                seed=seed,
                token_ids=generated,
                text=loaded.tokenizer.decode(generated, skip_special_tokens=True),
                ended_with_eos=ended,
                interventions=[int(s) for s in interventions],
                seconds=seconds,
                events=events,
                logits=logits,
                steps=steps,
            )
        )
    return results
