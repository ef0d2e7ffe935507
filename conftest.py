"""Doctests of compiled modules (see ``perpetual_logits/_native.py``) are collected in the source pass only
(``PERPETUAL_LOGITS_PURE_PYTHON=1``, ``make pytest`` runs both): pytest reads a module's doctests through its
``.py`` file, and a compiled module is not that file."""

from pathlib import Path

from perpetual_logits import _native

_COMPILED = {_native.source_path(name) for name in _native.compiled()}


def pytest_ignore_collect(collection_path: Path) -> bool | None:
    return True if collection_path.resolve() in _COMPILED else None
