"""Doctests of compiled modules (see ``perpetual_logits/_native.py``) are collected in the source pass only
(``PERPETUAL_LOGITS_PURE_PYTHON=1``, ``make pytest`` runs both): pytest reads a module's doctests through its
``.py`` file, and a compiled module is not that file."""

from pathlib import Path

import perpetual_logits  # noqa: F401 - routes the compiled modules to their source when asked or stale
from perpetual_logits import _native


def _compiled_sources() -> set[Path]:
    import importlib

    for name in _native.MODULES:
        importlib.import_module(name)
    return {_native.source_path(name) for name in _native.compiled()}


_COMPILED = _compiled_sources()


def pytest_ignore_collect(collection_path: Path) -> bool | None:
    return True if collection_path.resolve() in _COMPILED else None
