"""The converging Frank–Wolfe of the exact method's root relaxation shortens overshooting steps instead of
stopping: with block shifts on an ill-conditioned layer (n/d ≈ 2.2) a stop at the first failed step left the
root bound at 0 (0.96 of the optimum with the shortened steps). Bounds stay valid (brute force)."""
from __future__ import annotations

import numpy as np

import solvers.selection.exact as ex
from solvers.selection.greedy import whiten
from solvers.selection.perspective import eig_blocks, rotate
from solvers.selection.problem import SelectionProblem
from tests.solvers.selection.bank import brute_force


def _conv_layer(C: int, m: int, n: int, seed: int, cols: int = 9) -> SelectionProblem:
    """bench_lasso's conv-like layer (post-ReLU channels sharing latent factors, 3×3 taps), Y = Z W."""
    rng = np.random.default_rng(seed)
    n_factors = max(4, C // 8)
    F = rng.normal(size=(n, n_factors))
    channel = 0.7 * F @ (rng.normal(size=(n_factors, C)) / np.sqrt(n_factors)) + 0.7 * rng.normal(size=(n, C))
    Z = channel[:, :, None] + 0.5 * rng.normal(size=(n, C, cols))
    Z = (np.maximum(Z, 0.0) * rng.uniform(0.5, 2.0, size=(1, C, 1))).reshape(n, C * cols)
    importance = rng.permutation(np.geomspace(1.0, 0.02, C))
    groups = np.repeat(np.arange(C), cols)
    W = rng.normal(size=(C * cols, m)) * importance[groups][:, None] / np.sqrt(C * cols)
    return SelectionProblem.from_data(Z, Z @ W, groups, weights=W)


def _block_root(p: SelectionProblem, k: int) -> float:
    w = whiten(p)
    t = ex.choose_shift(w)
    S = ex._Search(p, k, None, ex.Relaxation(w, t), None, 1e-4)
    D, _ = ex._block_shift(S, w, t, None, 60)
    assert D is not None
    U, d = eig_blocks(D)
    S.rel = ex.Relaxation(rotate(w, U), d)
    nothing = np.zeros(p.n_channels, bool)
    lb, *_ = ex._relax(S, nothing, nothing, np.full(p.n_channels, 0.5), 300, converge=True)
    return lb / p.target_sq


def test_root_relaxation_with_block_shifts_converges_from_the_centre():
    p = _conv_layer(12, 8, 238, 0)
    opt = brute_force(p, 6)[1]
    lb = _block_root(p, 6)
    assert lb <= opt * (1 + 1e-9) + 1e-12          # valid
    assert lb >= 0.5 * opt                          # 0.0 with LINE_BACKTRACKS = 0 (first failed step ends the run)

