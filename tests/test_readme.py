"""The README's examples are run as doctests, on TinyStories-656K from ../shared/models."""

from __future__ import annotations

import doctest

import pytest
from support import REPO, TINYSTORIES, require_model_dir


@pytest.mark.slow
def test_readme_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    path = require_model_dir(TINYSTORIES)
    monkeypatch.setenv("PERPETUAL_LOGITS_MODEL", str(path))
    readme = REPO / "README.md"
    test = doctest.DocTestParser().get_doctest(readme.read_text(encoding="utf-8"), {}, "README.md", str(readme), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    result = runner.run(test, clear_globs=False)
    assert result.attempted > 10
    assert result.failed == 0, f"{result.failed} README example(s) failed; see the output above"
    # The examples ran on the local copy, as the README tells offline readers to arrange: the model and the
    # tokenizer they used were loaded from it.
    assert test.globs["model"].name_or_path == test.globs["tokenizer"].name_or_path == str(path)


def test_architecture_section_names_every_room_and_only_rooms() -> None:
    """The README's architecture section names each file of the package outside serve/ and vllm/ (which describe
    themselves), and every file it names exists."""
    import re

    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    package = REPO / "perpetual_logits"
    named: set[str] = set()
    wing = ""  # a bullet that starts with `wing/` names that wing's files
    for line in section.splitlines():
        if line.startswith("* "):
            start = re.match(r"\* `(\w+)/`", line)
            wing = start.group(1) + "/" if start else ""
        named.update(wing + name for name in re.findall(r"`(\w+\.py)`", line))
    rooms = {
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if path.relative_to(package).parts[0] not in ("serve", "vllm")
        and (path.name != "__init__.py" or path.parent == package)  # a wing's __init__.py only hands names on
    }
    assert named == rooms
