"""Opt-in markers: ``--run-slow`` for long tests, ``--run-gpu`` for CUDA tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tiny models run ~100x faster with one BLAS/OpenMP thread on a shared 2-core machine (measured);
# set before torch is first imported by any test module. Users' runs are not affected.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCH = REPO.parent / "shared" / "benchmarks" / "vnncomp2022_mnist_fc"


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")
    parser.addoption("--run-gpu", action="store_true", default=False, help="run tests that need CUDA")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow test: opt in with --run-slow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: opt in with --run-gpu")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not config.getoption("--run-gpu"):
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_bench() -> Path:
    """The VNN-COMP 2022 MNIST-FC folder beside the checkout; skips with a reason where absent."""
    if not SHARED_BENCH.is_dir():
        pytest.skip(f"shared benchmark data not found at {SHARED_BENCH} (CI always has it)")
    return SHARED_BENCH
