"""The README's "Serving with vLLM" example runs as written (on the session's engine)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import perpetual_logits.vllm as plv

README = Path(__file__).resolve().parents[1] / "README.md"


def serving_example() -> str:
    text = README.read_text()
    section = text[text.index("## Serving with vLLM") :]
    section = section[: section.index("\n## ", 1)]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the section has a python example"
    return match.group(1)


def test_readme_serving_example_runs(llm, model_path, monkeypatch):
    built: list[tuple[str, dict]] = []

    def shared_engine(model: str, **kwargs):
        built.append((Path(model).name, kwargs))
        return llm  # the session's engine: starting a second one would cost a minute

    monkeypatch.setattr(plv, "LLM", shared_engine)
    monkeypatch.chdir(README.parent)  # the example's model path is relative to the repository
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(serving_example(), str(README), "exec"), {"__name__": "__main__"})
    assert built == [(Path(model_path).name, {"kv_cache_memory_bytes": 512 << 20})]
    print(printed.getvalue())  # shown with `pytest -rP`: the README quotes one such run
    lines = printed.getvalue().splitlines()
    assert lines[0] == "[96, 96]"  # Methods 1 and 2 wrote to max_tokens
    assert len(lines) == 3
    for line in lines[1:]:
        n, reason, _events, _cached = line.split()
        # to the limit; a token that began an end marker the limit left unfinished is dropped
        assert reason == "length" and 96 - 8 <= int(n) <= 96
