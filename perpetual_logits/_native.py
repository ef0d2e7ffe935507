"""The modules that may run compiled, and the switch back to their Python source.

The rewind policy runs per row and per new token, and the largest part of that time goes to reading each row's
new text and matching phrases in it. Those modules are plain typed Python, and mypyc can compile them to C
extension modules from the same source (``PERPETUAL_LOGITS_COMPILE=1 pip install .``; ``make`` does it for the
checkout). A compiled module sits beside its source and Python imports it first.

The source is used instead -- every module of :data:`MODULES` together, never a mix -- when

* ``PERPETUAL_LOGITS_PURE_PYTHON=1`` is set (to compare, or to debug with the source), or
* the sources changed since the build (an edited checkout): the digest the build recorded beside them no longer
  matches. A warning says so once; ``make compile`` builds again.

Run as a script (no package import) it prints the module sources, for the Makefile::

    python perpetual_logits/_native.py sources
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

__all__ = ["MODULES", "compiled", "source_digest", "source_needed"]

#: The modules compiled together, one group (their calls to each other stay native): the text each row adds per
#: token and the phrase matching on it, the largest part of the chat preset's per-token cost. Internal modules
#: only, fed by the package's own code: compiled code checks argument types strictly (an ``int`` parameter refuses
#: a float with a TypeError that names no argument), so public functions that validate what users pass stay
#: Python; so do classes that derive from the package's ABCs (mypyc gives them no ABC caches of their own).
MODULES = (
    "perpetual_logits.text.text_stream",
    "perpetual_logits.text.phrase_stream",
)
#: The shared library of the group (mypyc's ``group_name``), a module of the package.
GROUP = "perpetual_logits._native_group"
#: Written by the build beside this file: the digest of the sources it compiled.
DIGEST_FILE = "_native_digest.txt"
PURE_ENV = "PERPETUAL_LOGITS_PURE_PYTHON"

_PACKAGE_DIR = Path(__file__).resolve().parent


def source_path(module: str, package_dir: Path = _PACKAGE_DIR) -> Path:
    """The ``.py`` file of one of :data:`MODULES`."""
    return package_dir.joinpath(*module.split(".")[1:]).with_suffix(".py")


def source_digest(package_dir: Path = _PACKAGE_DIR) -> str:
    """SHA-256 over the sources of :data:`MODULES`, in order (what a build records and an import checks)."""
    digest = hashlib.sha256()
    for module in MODULES:
        digest.update(module.encode())
        digest.update(source_path(module, package_dir).read_bytes())
    return digest.hexdigest()


def _built(module: str, package_dir: Path = _PACKAGE_DIR) -> bool:
    """A compiled extension of ``module`` lies beside its source."""
    source = source_path(module, package_dir)
    return any(source.with_suffix(suffix).exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def source_needed(package_dir: Path = _PACKAGE_DIR, environ: Mapping[str, str] = os.environ) -> str | None:
    """Why :data:`MODULES` must run from source although compiled ones may lie beside them: ``"asked"``
    (``PERPETUAL_LOGITS_PURE_PYTHON`` set), ``"stale"`` (built from other sources, or with no digest), or ``None``
    (use what is there: the compiled build, or the source when nothing was built)."""
    if environ.get(PURE_ENV, "") not in ("", "0"):
        return "asked"
    if not any(_built(module, package_dir) for module in MODULES):
        return None
    recorded = package_dir / DIGEST_FILE
    built_from = recorded.read_text().strip() if recorded.exists() else None
    return None if built_from == source_digest(package_dir) else "stale"


def compiled() -> list[str]:
    """The modules of :data:`MODULES` that run compiled (imported here if they were not yet; empty: all run from
    source)."""
    modules = [importlib.import_module(name) for name in MODULES]
    return [module.__name__ for module in modules if not str(getattr(module, "__file__", "")).endswith(".py")]


class _SourceFirst:
    """A meta-path finder that imports :data:`MODULES` from their ``.py`` files, past any compiled extension."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, source_path(fullname))


def use_source_if_needed() -> None:
    """Called once by the package, before any of :data:`MODULES` is imported: route them to their source when
    asked to, or when the compiled build is stale (with a warning)."""
    if any(isinstance(finder, _SourceFirst) for finder in sys.meta_path):
        return
    reason = source_needed()
    if reason is None:
        return
    if reason == "stale":
        warnings.warn(
            "perpetual_logits: the compiled modules are older than their sources (edited since the build); "
            "running the Python source. Build again with `make compile`, or set PERPETUAL_LOGITS_PURE_PYTHON=1 "
            "to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
    sys.meta_path.insert(0, _SourceFirst())


if __name__ == "__main__":
    if sys.argv[1:] == ["sources"]:
        print(" ".join(str(source_path(m).relative_to(_PACKAGE_DIR.parent)) for m in MODULES))
    else:
        sys.exit("usage: python perpetual_logits/_native.py sources")
