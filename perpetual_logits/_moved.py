"""Old module paths and old names, kept importable for one release after they moved or were renamed.

The package groups its modules in wings (``app/``, ``analysis/``, ``text/``) and one module edits generate()'s
processor list (``processor_list``). Code written against an old path (``import perpetual_logits.phrases``,
``from perpetual_logits.methods import load_model``) keeps working: :class:`MovedModules`, installed on
``sys.meta_path`` by the package, answers for the old name with a :class:`DeprecationWarning` that names the new
home. Nothing here is imported under the old names by the package itself.

There are no files at the old paths on purpose: a moved file is then a rename that git follows, so work on the
old file merges into the new one.

A name that moved between modules, was renamed or left the package's public names is handed on by the old
module's ``__getattr__`` (:func:`old_names`), with a warning that names it as it is now.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from types import ModuleType
from typing import Any

__all__ = ["MOVED", "MovedModules", "install", "moved_names", "old_names"]

#: Old module name -> its new home(s). A module that was split has two homes; the old name offers the names of both.
MOVED: dict[str, tuple[str, ...]] = {
    "perpetual_logits.phrases": ("perpetual_logits.text.endings", "perpetual_logits.text.matcher"),
    "perpetual_logits.phrase_stream": ("perpetual_logits.text.phrase_stream",),
    "perpetual_logits.text_stream": ("perpetual_logits.text.text_stream",),
    "perpetual_logits.repetition": ("perpetual_logits.text.repetition",),
    "perpetual_logits.metrics": ("perpetual_logits.analysis.metrics",),
    "perpetual_logits.plotting": ("perpetual_logits.analysis.plotting",),
    "perpetual_logits.methods": ("perpetual_logits.app.methods", "perpetual_logits.app.running"),
    "perpetual_logits.report": ("perpetual_logits.app.report", "perpetual_logits.app.demo"),
    "perpetual_logits.app.cli": ("perpetual_logits.cli",),
    "perpetual_logits.chat_model": ("perpetual_logits.app.chat_model",),
    "perpetual_logits.backstep.lengths": ("perpetual_logits.processor_list",),
}


def _warn(old: str, homes: Sequence[str]) -> None:
    # stacklevel 3: past this function and the loader; the import system's own frames are skipped, so the warning
    # names the line that imported the old path.
    warnings.warn(
        f"`{old}` moved to {' and '.join(f'`{home}`' for home in homes)}; import it from there "
        "(the old path will be removed in the next release)",
        DeprecationWarning,
        stacklevel=3,
    )


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds and loads the old names of :data:`MOVED`.

    A module with one home is that very module (``sys.modules`` holds it under both names, so a monkeypatch through
    the old name reaches the code); a split module's old name is a module that hands on every name of its homes.
    """

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        homes = MOVED[spec.name]
        _warn(spec.name, homes)
        if len(homes) == 1:
            return importlib.import_module(homes[0])
        return None  # the import system makes an empty module; exec_module fills it

    def exec_module(self, module: ModuleType) -> None:
        homes = MOVED[module.__spec__.name] if module.__spec__ is not None else ()
        if len(homes) == 1:
            return
        for home in homes:
            new = importlib.import_module(home)
            for name, value in vars(new).items():
                if not (name.startswith("__") and name.endswith("__")):
                    setattr(module, name, value)
        vars(module)["__all__"] = [name for home in homes for name in getattr(sys.modules[home], "__all__", ())]


def install() -> None:
    """Put one :class:`MovedModules` on ``sys.meta_path`` (first, so that no stale file shadows a moved module)."""
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModules())


def moved_names(module: str, home: str, names: Collection[str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that hands on ``names``, which moved from ``module`` to ``home``, with a warning.

    Example:

    ```python
    >>> import warnings
    >>> import perpetual_logits.truncation as truncation
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     moved = truncation.take_over_truncation
    >>> from perpetual_logits.processor_list import take_over_truncation
    >>> moved is take_over_truncation, caught[0].category.__name__
    (True, 'DeprecationWarning')

    ```
    """
    return old_names(module, {name: (home, name) for name in names})


def old_names(module: str, table: Mapping[str, tuple[str, str]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that hands on names kept for one release under an old name or in an old place.

    Args:
        module (`str`): the module the ``__getattr__`` belongs to (``__name__``).
        table (`Mapping[str, tuple[str, str]]`): old name -> (the module that holds it now, its name there). A
            name that kept its spelling moved; one that changed it was renamed. The warning says which, and
            names the new place.

    Example:

    ```python
    >>> import warnings
    >>> import perpetual_logits as pl
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     old = pl.Widen
    >>> old is pl.Widening
    True
    >>> print(caught[0].message)
    `perpetual_logits.Widen` was renamed `perpetual_logits.Widening`; use the new name (the old one will be removed
    in the next release)

    ```
    """

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        home, new = table[name]
        if new == name:
            message = (
                f"`{module}.{name}` moved to `{home}.{name}`; import it from there "
                "(the old name will be removed in the next release)"
            )
        else:
            message = (
                f"`{module}.{name}` was renamed `{home}.{new}`; use the new name "
                "(the old one will be removed in the next release)"
            )
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(home), new)

    return __getattr__
