"""Data fixtures: the real sample files beside the repository (read in place, never copied)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATASETS = Path(
    os.environ.get(
        "FBFT_SHARED_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"
    )
)


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real dataset sample files not found at {path} (set FBFT_SHARED_DATASETS)")
    return path


@pytest.fixture(scope="session")
def mvtec_root() -> Path:
    """MVTec AD root holding the partial `grid` class (with masks)."""
    return _require(SHARED_DATASETS / "mvtec_ad" / "grid").parent


@pytest.fixture(scope="session")
def bottle_root() -> Path:
    """MVTec AD root holding a `bottle` class without any ground truth."""
    return _require(SHARED_DATASETS / "mvtec_ad_bottle_no_masks" / "bottle").parent


@pytest.fixture(scope="session")
def visa_split_csv() -> Path:
    """The real VisA `split_csv/1cls.csv` (no images)."""
    return _require(SHARED_DATASETS / "visa" / "split_csv" / "1cls.csv")
