"""The compiled build of the per-token text modules (perpetual_logits/_native.py): when it is used, when the
source is, and that ``make pytest`` really runs the suite both ways."""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO

from perpetual_logits import _native


def _package_copy(tmp_path: Path, built: bool, digest: str | None) -> Path:
    """A package folder with the sources of the compiled modules, a stand-in extension beside each when
    ``built``, and the digest file holding ``digest``."""
    package = tmp_path / "perpetual_logits"
    for module in _native.MODULES:
        source = _native.source_path(module, package)
        source.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(_native.source_path(module), source)
        if built:
            source.with_suffix(importlib.machinery.EXTENSION_SUFFIXES[0]).write_bytes(b"")
    if digest is not None:
        (package / _native.DIGEST_FILE).write_text(digest + "\n")
    return package


def test_a_build_of_these_sources_is_used_and_an_outdated_one_is_not(tmp_path):
    package = _package_copy(tmp_path, built=True, digest=None)
    assert _native.source_needed(package, {}) == "stale"  # built, but from what is not recorded
    (package / _native.DIGEST_FILE).write_text(_native.source_digest(package))
    assert _native.source_needed(package, {}) is None
    text_stream = _native.source_path(_native.MODULES[0], package)
    text_stream.write_text(text_stream.read_text() + "\n# edited\n")
    assert _native.source_needed(package, {}) == "stale"


def test_the_source_is_used_when_asked_and_nothing_is_said_without_a_build(tmp_path):
    assert _native.source_needed(_package_copy(tmp_path, built=True, digest=None), {_native.PURE_ENV: "1"}) == "asked"
    plain = _package_copy(tmp_path / "plain", built=False, digest=None)
    assert _native.source_needed(plain, {}) is None
    assert _native.source_needed(plain, {_native.PURE_ENV: "0"}) is None


def test_this_run_uses_the_build_it_was_asked_for():
    """``make pytest`` runs the suite with the compiled modules (PERPETUAL_LOGITS_EXPECT_COMPILED=1), then on the
    source (PERPETUAL_LOGITS_PURE_PYTHON=1): each pass must run what it says."""
    if _native.source_needed() == "asked":
        assert _native.compiled() == []
    elif os.environ.get("PERPETUAL_LOGITS_EXPECT_COMPILED") == "1":
        assert _native.compiled() == list(_native.MODULES)
    else:
        assert _native.compiled() in ([], list(_native.MODULES))  # never a mix


@pytest.mark.skipif(not _native.compiled(), reason="no compiled build in this checkout (make compile)")
def test_an_edited_source_runs_from_source_with_one_warning(tmp_path):
    """A checkout edited after its build: the source runs, and a warning says why."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "perpetual_logits", copy / "perpetual_logits")
    edited = _native.source_path(_native.MODULES[-1], copy / "perpetual_logits")
    edited.write_text(edited.read_text() + "\n# edited after the build\n")
    code = (
        "import warnings; warnings.simplefilter('always')\n"
        "import perpetual_logits, perpetual_logits.text.phrase_stream\n"
        "from perpetual_logits import _native; print(_native.compiled())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != _native.PURE_ENV}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=copy, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert result.stderr.count("older than their sources") == 1
