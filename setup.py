"""Builds the package; with ``PERPETUAL_LOGITS_COMPILE=1`` also compiles the rewind policy's per-token modules with
mypyc (see ``perpetual_logits/_native.py``: which modules, and when their source is used instead). Metadata lives
in pyproject.toml."""

import os
import runpy
from pathlib import Path

from setuptools import setup

ext_modules = []
if os.environ.get("PERPETUAL_LOGITS_COMPILE", "") not in ("", "0"):
    try:
        from mypyc.build import mypycify
    except ImportError as missing:
        raise SystemExit(
            "PERPETUAL_LOGITS_COMPILE=1 compiles with mypyc, which comes with mypy: `pip install mypy setuptools`, "
            "then install without build isolation (`pip install --no-build-isolation .`), or run `make compile`"
        ) from missing

    package = Path(__file__).parent / "perpetual_logits"
    native = runpy.run_path(str(package / "_native.py"))
    ext_modules = mypycify(
        [str(native["source_path"](module, package)) for module in native["MODULES"]],
        group_name=native["GROUP"],
        opt_level="3",
        debug_level="0",
    )
    # What the extensions were built from: an import checks it and runs the source if it changed since.
    (package / native["DIGEST_FILE"]).write_text(native["source_digest"](package) + "\n")

setup(ext_modules=ext_modules)
