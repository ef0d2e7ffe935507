"""The supported transformers range is checked at import, with an error that names it."""

from __future__ import annotations

import pytest

from perpetual_logits._compat import check_transformers_version


@pytest.mark.parametrize("version", ["4.57.6", "5.16.1", "6.0.0"])
def test_unsupported_transformers_raise_importerror_naming_the_range(version: str) -> None:
    with pytest.raises(ImportError, match=r"transformers>=5\.17,<6.*found " + version.replace(".", r"\.")):
        check_transformers_version(version)


@pytest.mark.parametrize("version", ["5.17.0", "5.24.0", "5.99.1"])
def test_supported_versions_pass(version: str) -> None:
    check_transformers_version(version)


def test_installed_version_is_supported() -> None:
    check_transformers_version()
