"""Shared test fixtures: quiet TF logs, seeded runs, the coco128 fixture path."""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# The real COCO fixture lives beside the repo (../shared/data/coco128) and is never copied in.
COCO128_DIR = Path(os.environ.get("HYBRIDNET_COCO128", REPO_ROOT.parent / "shared/data/coco128"))


@pytest.fixture
def coco128_dir():
    """Path to the coco128 fixture; skips the test where it is absent."""
    if not (COCO128_DIR / "annotations/instances_train2017.json").is_file():
        pytest.skip(f"coco128 fixture not found at {COCO128_DIR} (set HYBRIDNET_COCO128)")
    return COCO128_DIR


def _script_module(name):
    """`scripts/<name>.py` as a module (scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def script_module():
    """`script_module(name)`: `scripts/<name>.py` as a module."""
    return _script_module


@pytest.fixture(scope="session")
def yardstick():
    """`scripts/real_data_check.py` as a module."""
    return _script_module("real_data_check")


@pytest.fixture(autouse=True)
def _seed_everything():
    import keras

    keras.utils.set_random_seed(1234)
    yield
