"""The README's examples are run as doctests, on TinyStories-656K from ../shared/models."""

from __future__ import annotations

import doctest
import os

import pytest
from conftest import REPO, TINYSTORIES, require_model_dir


@pytest.mark.slow
def test_readme_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    path = require_model_dir(TINYSTORIES)
    monkeypatch.setenv("PERPETUAL_LOGITS_MODEL", str(path))
    result = doctest.testfile(
        str(REPO / "README.md"),
        module_relative=False,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        verbose=False,
    )
    assert result.attempted > 10
    assert result.failed == 0, f"{result.failed} README example(s) failed; see the output above"
    assert os.environ["PERPETUAL_LOGITS_MODEL"] == str(path)
