"""Shared test fixtures. ``SHARED`` is the shared folder beside the checkout; tests that need it skip cleanly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CASCADE_SHARED", ROOT.parent / "shared"))
REAL_DIR = SHARED / "data" / "real"

torch.set_num_threads(2)  # fixed, not from the core count: results may not depend on the machine


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """Kaiming-initialised tiny weights (8 classes, ``TINY`` features, seed 0), written once per session."""
    from bundle_utils import save_tiny_weights

    return save_tiny_weights(tmp_path_factory.mktemp("tiny_weights") / "w.pt")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """``tiny_dataset(n_train, n_test, **kw)``: :func:`bundle_utils.write_tiny_dataset` (tiny phantoms, seed 0), written
    once per session for each set of arguments and shared by every module that asks for the same one. Read-only:
    a test that changes files works on a copy."""
    from bundle_utils import write_tiny_dataset

    made: dict[tuple, Path] = {}

    def get(n_train: int = 3, n_test: int = 1, **kw) -> Path:
        key = (n_train, n_test, *sorted(kw.items()))
        if key not in made:
            made[key] = write_tiny_dataset(tmp_path_factory.mktemp("phantoms"), n_train=n_train, n_test=n_test, **kw)
        return made[key]

    return get


@pytest.fixture
def real_dir() -> Path:
    if not REAL_DIR.is_dir():
        pytest.skip(f"real CT folder not found: {REAL_DIR}")
    return REAL_DIR


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
