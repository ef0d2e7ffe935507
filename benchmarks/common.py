"""Helpers shared by the benchmark scripts: paths, models, machine description, statistics, memory."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make perpetual_logits and benchmarks importable
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "benchmarks" / "results"


def models_dir() -> Path:
    """``$PERPETUAL_LOGITS_MODELS`` if set, else ``../shared/models`` next to the repository."""
    env = os.environ.get("PERPETUAL_LOGITS_MODELS")
    return Path(env).resolve() if env else (REPO.parent / "shared" / "models").resolve()


def out_dir(requested: str | None, smoke: bool) -> Path:
    """Where results go: ``--out`` if given; a fresh temporary folder in smoke mode (so a smoke run never
    overwrites real results); else ``benchmarks/results``."""
    if requested:
        path = Path(requested)
    elif smoke:
        path = Path(tempfile.mkdtemp(prefix="perpetual-bench-")) / "results"
    else:
        path = DEFAULT_OUT
    path.mkdir(parents=True, exist_ok=True)
    return path


def quiet_transformers() -> None:
    """No weight-loading progress bars or generation-config chatter in benchmark output."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_tinystories(path: Path | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of TinyStories-656K through the ordinary ``from_pretrained`` path, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    folder = path if path is not None else models_dir() / "tinystories-656k"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"TinyStories-656K not found in {folder}; set PERPETUAL_LOGITS_MODELS to the shared/models folder"
        )
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Machine and versions, recorded with every result file."""
    import transformers

    from perpetual_logits import _native

    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": load,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        # mypyc-compiled modules in use (perpetual_logits/_native.py); empty: all from the Python source
        "compiled_modules": _native.compiled(),
    }


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max, p10, p90 and mean of ``values`` (``nan`` everywhere when empty)."""
    if not values:
        nan = math.nan
        return {"median": nan, "min": nan, "max": nan, "p10": nan, "p90": nan, "mean": nan, "n": 0}
    ordered = sorted(float(v) for v in values)
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "p10": percentile(ordered, 10),
        "p90": percentile(ordered, 90),
        "mean": statistics.fmean(ordered),
        "n": len(ordered),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method) of ``values``, ``q`` in [0, 100]."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"`q` must be in [0, 100], got {q!r}")
    ordered = sorted(float(v) for v in values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# -- memory ---------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss_mib() -> float:
    """Current resident set size in MiB (``nan`` where /proc is unavailable)."""
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else math.nan


def peak_rss_mib() -> float:
    """Peak RSS since the last :func:`reset_peak_rss` (or process start), in MiB."""
    kib = _status_kib("VmHWM")
    if kib is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS; only a process-wide peak
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
    return kib / 1024


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON (NaN written as null so that strict JSON readers accept it)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(data), indent=2) + "\n")
