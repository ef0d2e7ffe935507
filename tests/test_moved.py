"""The old module paths of modules that moved into a wing still import, warn, and hand on the same objects."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest
from support import REPO

import perpetual_logits
from perpetual_logits._moved import MOVED


def _import_fresh(name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[object, list[warnings.WarningMessage]]:
    monkeypatch.delitem(sys.modules, name, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(name)
    return module, caught


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_imports_with_a_warning_naming_the_new_home(old, monkeypatch):
    module, caught = _import_fresh(old, monkeypatch)
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning) and old in str(w.message)]
    assert len(deprecations) == 1
    homes = [importlib.import_module(home) for home in MOVED[old]]
    for home in homes:
        assert home.__name__ in str(deprecations[0].message)
        for name in home.__all__:  # every public name of every home, the very same object
            assert getattr(module, name) is getattr(home, name)
    if len(homes) == 1:  # one home: the same module, so a monkeypatch through the old name reaches the code
        assert module is homes[0]
    else:
        assert sorted(module.__all__) == sorted(name for home in homes for name in home.__all__)


def test_the_warning_points_at_the_importing_line(monkeypatch):
    monkeypatch.delitem(sys.modules, "perpetual_logits.phrases", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import perpetual_logits.phrases  # noqa: F401
    assert [w.filename for w in caught if issubclass(w.category, DeprecationWarning)] == [__file__]


def test_the_package_itself_imports_no_old_path():
    # A fresh interpreter: every module of the package imported with deprecation warnings as errors.
    code = (
        "import importlib, pkgutil, warnings\n"
        "warnings.simplefilter('error', DeprecationWarning)\n"
        "import perpetual_logits\n"
        "skip = ('perpetual_logits.vllm', 'perpetual_logits.serve')\n"
        "names = [m.name for m in pkgutil.walk_packages(perpetual_logits.__path__, 'perpetual_logits.')]\n"
        "for name in names:\n"
        "    if not name.startswith(skip):\n"
        "        importlib.import_module(name)\n"
        "print(len(names))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 30


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("perpetual_logits.truncation", "take_over_truncation"),
        ("perpetual_logits.truncation", "configured_truncation"),
        ("perpetual_logits.truncation", "check_no_double_truncation"),
        ("perpetual_logits.backstep.temperature", "WARPERS"),
        ("perpetual_logits.backstep.temperature", "insert_before_warpers"),
    ],
)
def test_names_that_moved_between_modules_still_resolve(module, name):
    from perpetual_logits import processor_list

    with pytest.warns(DeprecationWarning, match=f"processor_list.{name}"):
        moved = getattr(importlib.import_module(module), name)
    assert moved is getattr(processor_list, name)


def test_an_unknown_name_is_still_an_attribute_error():
    import perpetual_logits.truncation as truncation

    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        truncation.no_such_name  # noqa: B018


# The package's public names before the wings (`__all__` of perpetual_logits/__init__.py on main at that time).
PUBLIC_BEFORE = [
    "CHAT_CLOSING_PHRASES",
    "CHAT_END_TOKENS",
    "ENDING_PHRASES",
    "BackstepConfig",
    "BackstepEvent",
    "BackstepOutput",
    "BackstepStats",
    "Constant",
    "ContextShift",
    "CosineDecay",
    "DRYLogitsProcessor",
    "EOSLogitsProcessor",
    "EarlyTrigger",
    "EventSource",
    "EvictionBudgetCriteria",
    "ExponentialDecay",
    "LinearDecay",
    "LoopMatch",
    "LoopRewinds",
    "PerpetualGenerationMixin",
    "PhraseMatch",
    "PhraseMatcher",
    "PhraseScan",
    "PostEOSResamplingLogitsProcessor",
    "RepetitionLoopCriteria",
    "Rewind",
    "RewindRule",
    "RowState",
    "RowTruncation",
    "RowView",
    "Schedule",
    "StepDecay",
    "StepStats",
    "StepStatsRecorder",
    "SuppressEOSLogitsProcessor",
    "Truncation",
    "TruncationSchedule",
    "Widen",
    "__version__",
    "blockwise",
    "default_end_phrases",
    "eos_window",
    "find_line_loop",
    "find_token_loop",
    "make_perpetual",
    "newline_token_ids",
    "plot_blockwise",
    "plot_eos_window",
    "step_stats",
    "take_over_truncation",
]


#: Public names renamed for one word per idea (issue 20): old -> new.
RENAMED = {"BackstepEvent": "RewindEvent", "LoopRewinds": "LoopDetection", "Rewind": "RewindTo", "Widen": "Widening"}
#: Public names that are internals: no longer in ``__all__``, importable for one release.
DROPPED = {"RowTruncation", "TruncationSchedule", "take_over_truncation"}


@pytest.mark.parametrize("name", [name for name in PUBLIC_BEFORE if name != "__version__"])
def test_every_public_name_from_before_still_imports(name):
    namespace: dict[str, object] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(f"from perpetual_logits import {name}", namespace)
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    new = RENAMED.get(name, name)
    home = {"take_over_truncation": "processor_list"}.get(name, "truncation") if name in DROPPED else None
    assert namespace[name] is getattr(
        importlib.import_module(f"perpetual_logits.{home}") if home else perpetual_logits, new
    )
    if name in RENAMED or name in DROPPED:
        # (a `from package import name` may look the name up twice: once in the import system, once in the code)
        assert deprecations and all(f"`{new}`" in str(w.message) or f".{new}`" in str(w.message) for w in deprecations)
    else:
        assert deprecations == []


def test_public_names_are_the_ones_from_before_renamed_less_the_internals():
    assert len(PUBLIC_BEFORE) == 50
    now = (set(PUBLIC_BEFORE) - set(RENAMED) - DROPPED) | set(RENAMED.values()) | {"Landing", "PerCallState"}
    assert sorted(perpetual_logits.__all__) == sorted(now)
    namespace: dict[str, object] = {}
    exec("from perpetual_logits import *", namespace)  # raises if a listed name is missing
    assert now - {"__version__"} <= set(namespace)


def test_console_script_entry_point_resolves():
    from importlib.metadata import EntryPoint

    line = next(x for x in (REPO / "pyproject.toml").read_text().splitlines() if x.startswith("perpetual-logits ="))
    value = line.split("=", 1)[1].strip().strip('"')
    from perpetual_logits.cli import main

    assert EntryPoint(name="perpetual-logits", value=value, group="console_scripts").load() is main
