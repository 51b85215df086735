"""The core contract: torch-free import, our own `solvers` package, error hierarchy, problem maths."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import solvers
from solvers import InvalidInputError, MipPruneError, SelectionProblem, Status

REPO = Path(__file__).resolve().parents[2]


def test_import_solvers_does_not_import_torch():
    code = ("import sys, solvers, solvers.selection.problem, solvers.selection.select, solvers.network.ir, solvers.result\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "print(solvers.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    # The PyPI project also called `solvers` must not shadow ours.
    assert Path(out.stdout.strip()).resolve().parent == (REPO / "solvers").resolve()


def test_every_solvers_module_and_the_solver_tests_import_without_torch():
    """Every submodule of ``solvers`` and every module of ``tests/solvers`` imports with torch
    made unimportable (a meta-path finder that refuses it)."""
    code = (
        "import sys, importlib, pkgutil\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "import solvers, tests.solvers\n"
        "mods = [m.name for m in pkgutil.walk_packages(solvers.__path__, 'solvers.')]\n"
        "mods += [m.name for m in pkgutil.walk_packages(tests.solvers.__path__, 'tests.solvers.')]\n"
        "for m in mods:\n"
        "    importlib.import_module(m)\n"
        "assert 'torch' not in sys.modules\n"
        "print(len(mods))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 30


def test_no_nvidia_packages_are_installed():
    """With the CPU torch wheel the constraints resolve to here, no CUDA runtime packages came along
    (a user's own CUDA build of torch legitimately brings them: then there is nothing to check)."""
    from importlib import metadata

    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "+cpu (absent)"
    if "+cpu" not in torch_version:
        pytest.skip(f"torch {torch_version} is not the CPU build; nvidia packages may belong to it")
    nvidia = sorted({d.metadata["Name"] for d in metadata.distributions()
                     if (d.metadata["Name"] or "").lower().startswith("nvidia")})
    assert not nvidia, f"nvidia packages installed: {nvidia}"


def test_error_hierarchy_and_value_error_compat():
    assert issubclass(InvalidInputError, MipPruneError) and issubclass(InvalidInputError, ValueError)
    for name in ("UnsupportedLayerError", "InfeasibleBudgetError", "SolverNotAvailableError", "SolverError"):
        assert issubclass(getattr(solvers, name), MipPruneError)


def test_status_is_a_string_enum():
    assert Status.OPTIMAL == "optimal" and Status("time_limit") is Status.TIME_LIMIT


def test_refit_error_matches_materialized_least_squares():
    rng = np.random.default_rng(0)
    Z, Y = rng.normal(size=(200, 12)), rng.normal(size=(200, 3))
    groups = np.repeat(np.arange(4), 3)
    p = SelectionProblem.from_data(Z, Y, groups)
    mask = np.array([True, False, True, False])
    cols = mask[groups]
    W_ls = np.linalg.lstsq(Z[:, cols], Y, rcond=None)[0]
    expected = np.sum((Y - Z[:, cols] @ W_ls) ** 2) / np.sum(Y ** 2)
    assert p.error(mask) == pytest.approx(expected, rel=1e-9)
    np.testing.assert_allclose(p.refit(mask)[cols], W_ls, rtol=1e-8, atol=1e-10)
    assert np.all(p.refit(mask)[~cols] == 0)
    assert p.error(mask) <= p.error(mask, refit=False) + 1e-12
    assert p.error(np.ones(4, bool)) < p.error(mask)


def test_the_full_fit_is_computed_on_first_use_only():
    """``SelectionProblem.weights`` (the full least-squares fit unless given) is refitted on first use, not at
    construction: exact selection's restarts build problems whose full fit nobody reads (a factorization of the
    whole Gram each). Given weights are checked at construction as before."""
    rng = np.random.default_rng(0)
    Z, Y = rng.normal(size=(50, 6)), rng.normal(size=(50, 2))
    p = SelectionProblem.from_data(Z, Y, [0, 0, 1, 1, 2, 2])
    assert p._weights is None
    np.testing.assert_allclose(p.weights, np.linalg.lstsq(Z, Y, rcond=None)[0], rtol=1e-9, atol=1e-12)
    assert p.weights is p.weights
    given = SelectionProblem.from_data(Z, Y, [0, 0, 1, 1, 2, 2], weights=np.ones((6, 2)))
    assert np.array_equal(given.weights, np.ones((6, 2)))
    with pytest.raises(InvalidInputError, match="weights must have shape"):
        SelectionProblem.from_data(Z, Y, [0, 0, 1, 1, 2, 2], weights=np.ones((5, 2)))


def test_problem_rejects_bad_shapes_with_clear_messages():
    rng = np.random.default_rng(1)
    Z, Y = rng.normal(size=(10, 4)), rng.normal(size=(10, 2))
    with pytest.raises(InvalidInputError, match="same number of rows"):
        SelectionProblem.from_data(Z, Y[:5], [0, 1, 2, 3])
    with pytest.raises(InvalidInputError, match=r"groups must have shape \(4,\)"):
        SelectionProblem.from_data(Z, Y, [0, 1, 2])
    with pytest.raises(InvalidInputError, match="must own a column"):
        SelectionProblem.from_data(Z, Y, [0, 0, 2, 2])
    with pytest.raises(InvalidInputError, match="finite"):
        SelectionProblem.from_data(np.full((10, 4), np.nan), Y, [0, 1, 2, 3])
    p = SelectionProblem.from_data(Z, Y, [0, 1, 2, 3])
    with pytest.raises(InvalidInputError, match=r"k must satisfy 1 <= k <= 4; got 5"):
        solvers.select_channels(p, k=5, method="magnitude")
    with pytest.raises(InvalidInputError, match=r"k must satisfy 1 <= k <= 4; got 0"):
        solvers.select_channels(p, k=0, method="magnitude")
    with pytest.raises(InvalidInputError, match="method must be one of"):
        solvers.select_channels(p, k=2, method="nope")
