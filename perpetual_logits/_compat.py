"""The transformers versions we support, checked once at import."""

from __future__ import annotations

MIN_TRANSFORMERS = "5.17"
MAX_TRANSFORMERS_EXCLUSIVE = "6"


def check_transformers_version(installed: str | None = None) -> None:
    """Raise ImportError naming the supported range when the installed transformers is outside it."""
    from packaging.version import Version

    if installed is None:
        import transformers

        installed = transformers.__version__
    version = Version(installed)
    if version < Version(MIN_TRANSFORMERS) or version >= Version(MAX_TRANSFORMERS_EXCLUSIVE):
        raise ImportError(
            f"perpetual_logits needs transformers>={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS_EXCLUSIVE}; "
            f"found {installed}. Install a supported version: pip install 'transformers>={MIN_TRANSFORMERS},<6'"
        )
