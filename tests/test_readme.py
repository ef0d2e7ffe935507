"""The README's examples are run as doctests, on TinyStories-656K from ../shared/models."""

from __future__ import annotations

import doctest

import pytest
from conftest import REPO, TINYSTORIES, require_model_dir


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
    # The examples ran on the local copy, as the README tells offline readers to arrange.
    assert test.globs["model_id"] == str(path)
