"""The project's real data (``../shared/data`` beside the checkout, present on dev machines and in CI only)."""
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR100 = SHARED_DATA / "cifar100"
COCO = SHARED_DATA / "coco_subset"

needs_coco = pytest.mark.skipif(
    not (COCO / "annotations" / "instances_val2017_subset.json").is_file(),
    reason=f"COCO subset not found at {COCO} (shared data folder absent)",
)
