"""The whitened Gram of multi-column groups read from the statistics (BlockGram) against the dense whitening."""
from __future__ import annotations

import numpy as np
import pytest

import solvers.selection.greedy as gr
from solvers import SelectionProblem, Status, select_channels
from solvers.selection.block_gram import BlockGram
from solvers.selection.greedy import densified, whiten
from solvers.selection.scaled_gram import gathered_product
from tests.solvers.selection.test_scaled_gram import forward_selection_peak, planted_problem, read_keys


def _problem(C: int, n: int, *, q: int = 9, seed: int = 0, uneven: bool = True) -> SelectionProblem:
    """C channels of ``q`` columns (with ``uneven`` one of 4 and one of 1), shuffled; a dead channel and a
    rank-deficient one (a column repeated)."""
    rng = np.random.default_rng(seed)
    sizes = np.full(C, q)
    if uneven:
        sizes[2], sizes[5] = 4, 1
    d = int(sizes.sum())
    Z = rng.normal(size=(n, d)) @ (np.eye(d) + 0.05 * rng.normal(size=(d, d)))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    Z[:, starts[3]:starts[4]] = 0.0                                   # a dead channel
    Z[:, starts[7] + 1] = Z[:, starts[7]]                             # a rank-deficient one
    Y = Z[:, : 4 * q] @ rng.normal(size=(4 * q, 5)) + 0.3 * rng.normal(size=(n, 5))
    perm = rng.permutation(C)
    return SelectionProblem.from_data(Z, Y, np.repeat(perm, sizes))


@pytest.fixture
def lazy_always(monkeypatch):
    monkeypatch.setattr(gr, "LAZY_MIN_BLOCK_COLUMNS", 0)


@pytest.mark.parametrize("uneven", [False, True])
def test_reads_equal_the_dense_whitening(uneven, lazy_always):
    p = _problem(30, 600, uneven=uneven)
    (lazy, T_lazy), (dense, T_dense) = whiten(p, lazy=True, transforms=True), whiten(p, transforms=True)
    M, D = lazy.M, dense.M
    assert isinstance(M, BlockGram) and isinstance(D, np.ndarray) and M.shape == D.shape
    assert all(np.array_equal(a, b) for a, b in zip(T_lazy, T_dense))          # the same transforms
    assert np.array_equal(lazy.starts, dense.starts) and np.array_equal(lazy.col_group, dense.col_group)
    np.testing.assert_allclose(lazy.B, dense.B, rtol=1e-12, atol=1e-12 * np.abs(dense.B).max())
    full = M.dense()
    assert np.array_equal(full, full.T)
    np.testing.assert_allclose(full, D, rtol=0, atol=1e-13)
    for g in range(lazy.n_channels):                                          # identity diagonal blocks, exactly
        sl = lazy.cols(g)
        assert np.array_equal(full[sl, sl], np.eye(sl.stop - sl.start))
    r = D.shape[0]
    rng = np.random.default_rng(1)
    cols = rng.choice(r, 9, replace=False)
    rows = rng.choice(r, 40, replace=False)
    mask = rng.random(r) < 0.4
    for key in read_keys(rows, cols, mask):
        got = M[key]
        assert np.shape(got) == np.shape(D[key]), key
        np.testing.assert_allclose(got, D[key], rtol=0, atol=1e-13, err_msg=str(key))
    sub = M[np.ix_(cols, cols)]
    assert np.all(np.diag(sub) == 1.0)
    np.testing.assert_allclose(M.astype(np.float32), D.astype(np.float32), rtol=1e-6, atol=1e-7)
    X = rng.normal(size=(r, 3))
    np.testing.assert_allclose(M @ X, D @ X, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(M @ X[:, 0], D @ X[:, 0], rtol=1e-12, atol=1e-12)
    idx = np.flatnonzero(mask)
    np.testing.assert_allclose(gathered_product(M, rows, idx, X[idx]), D[np.ix_(rows, idx)] @ X[idx],
                               rtol=1e-12, atol=1e-12)
    assert np.array_equal(densified(lazy).M, full)


def test_reads_in_tiny_blocks_equal_one_block(lazy_always, monkeypatch):
    """Reads gathered a few channels at a time (tiny blocks: every read spans many) give what one block gives."""
    import solvers.selection.block_gram as bg

    p = _problem(25, 500)
    M = whiten(p, lazy=True).M
    whole = M.dense()
    monkeypatch.setattr(bg, "_block_entries", lambda r: 1)
    rng = np.random.default_rng(2)
    rows = rng.permutation(M.shape[0])[:60]
    np.testing.assert_allclose(M[np.ix_(rows, rows)], whole[np.ix_(rows, rows)], rtol=0, atol=1e-14)
    np.testing.assert_allclose(M.dense(), whole, rtol=0, atol=1e-14)


def test_only_large_multi_column_groups_are_read_lazily():
    """Below ``LAZY_MIN_BLOCK_COLUMNS`` columns the dense whitening (and its arithmetic) is kept."""
    p = _problem(20, 400)
    assert p.gram.shape[0] < gr.LAZY_MIN_BLOCK_COLUMNS
    assert isinstance(whiten(p, lazy=True).M, np.ndarray)


def test_the_statistics_are_never_written(lazy_always):
    p = _problem(20, 400)
    before, cross = p.gram.copy(), p.cross.copy()
    M = whiten(p, lazy=True).M
    M[:, np.arange(5)][0, 0] = 7.0
    M.dense()[1, 1] = 7.0
    _ = M @ np.ones(M.shape[0])
    assert np.array_equal(p.gram, before) and np.array_equal(p.cross, cross)


@pytest.mark.parametrize("method", ["greedy", "backward", "swap", "exact"])
def test_methods_choose_the_same_channels_with_the_lazy_gram(method, monkeypatch):
    """Every method whitens large multi-column groups lazily: the same sets as with the dense matrix (exact: the
    view throughout, warm start, shifts, root and tree; the same proof)."""
    p = _problem(20, 2000, seed=3)
    dense = select_channels(p, method=method, k=6, time_limit=30)
    monkeypatch.setattr(gr, "LAZY_MIN_BLOCK_COLUMNS", 0)
    lazy = select_channels(p, method=method, k=6, time_limit=30)
    assert np.array_equal(lazy.mask, dense.mask)
    assert lazy.objective == pytest.approx(dense.objective, rel=1e-9)
    if method == "exact":
        assert lazy.status == dense.status == Status.OPTIMAL
        assert lazy.bound == pytest.approx(dense.bound, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("method", ["greedy", "swap"])
def test_forward_selection_and_swaps_never_densify_it(method, lazy_always, monkeypatch):
    p = _problem(24, 500, seed=4)
    monkeypatch.setattr(BlockGram, "dense", lambda *a, **k: pytest.fail("the lazy Gram was densified"))
    monkeypatch.setattr(BlockGram, "__array__", lambda *a, **k: pytest.fail("the lazy Gram was densified"))
    res = select_channels(p, method=method, k=9, time_limit=30)
    assert res.mask.sum() == 9


def test_forward_selection_keeps_no_copy_of_the_gram():
    """C = 400 channels of 9 columns (3,600 columns, Gram 104 MB): forward selection of 40 channels traces well
    under the statistics (the dense whitened copy alone was as large as them)."""
    C, q = 400, 9
    p = planted_problem(np.repeat(np.arange(C), q), C * q // 8)
    assert p.gram.shape[0] >= gr.LAZY_MIN_BLOCK_COLUMNS
    mask, peak = forward_selection_peak(p, 40)
    assert mask.sum() == 40
    assert peak < 0.2 * p.gram.nbytes, (peak, p.gram.nbytes)


def test_rotating_a_lazy_problem_keeps_it_lazy_and_equal_to_the_dense_rotation(lazy_always):
    """``rotate`` of a problem read from the statistics folds the rotation into the whitening transforms."""
    from solvers.selection.perspective import inverse_basis, rotate

    p = _problem(20, 500, seed=6)
    lazy, dense = whiten(p, lazy=True), whiten(p)
    U = inverse_basis(dense)
    rl, rd = rotate(lazy, U), rotate(dense, U)
    assert isinstance(rl.M, BlockGram) and isinstance(rd.M, np.ndarray)
    np.testing.assert_allclose(rl.M.dense(), rd.M, rtol=0, atol=1e-12)
    np.testing.assert_allclose(rl.B, rd.B, rtol=0, atol=1e-12 * np.abs(rd.B).max())
    np.testing.assert_allclose(lazy.M.dense(), dense.M, rtol=0, atol=1e-13)      # (the original view is unchanged)


@pytest.mark.parametrize("single", [False, True])
def test_block_sizes_on_the_view_match_the_dense_matrix(single, lazy_always):
    """The interior-point sizes read a lazy rotated problem (float32 copies, float64 checks factored in panels from
    the view): the same bound as on the dense matrix up to round-off, and a feasible shift."""
    import solvers.selection.exact as ex
    from solvers.selection.perspective import inverse_basis, rotate, saddle_sizes

    p = _problem(16, 600, seed=7)
    lazy, dense = whiten(p, lazy=True), whiten(p)
    t = ex.choose_shift(dense)
    S = ex._Search(p, 8, None, ex.Relaxation(dense, t), None, 1e-4)
    nothing = np.zeros(p.n_channels, bool)
    U = inverse_basis(dense)
    out = []
    for w in (lazy, dense):
        out.append(saddle_sizes(rotate(w, U), 0.9 * t[w.col_group], lambda L, a: S.bound(L, a, nothing, ~nothing)[0],
                                k=8, iterations=15, single=single))
    (d_l, val_l, _, info_l), (d_d, val_d, _, _) = out
    assert info_l["feasibility_checks"] >= 1
    assert val_l == pytest.approx(val_d, rel=1e-3)
    assert np.all(d_l > 0) and np.linalg.eigvalsh(rotate(dense, U).M - np.diag(d_l))[0] >= -1e-10


def test_single_precision_sizes_on_the_view_keep_no_float32_copy_of_it(lazy_always):
    """In single precision the sizes read ``M`` from the view each time they factor it: no float32 copy is kept
    beside the iteration's r×r arrays (peak 4.2 float32 r×r here; 5.2 with the copy kept, session 22's code)."""
    import tracemalloc

    import solvers.selection.exact as ex
    from solvers.selection.perspective import inverse_basis, rotate, saddle_sizes

    p = _problem(60, 3000, seed=7, uneven=False)
    lazy, dense = whiten(p, lazy=True), whiten(p)
    t = ex.choose_shift(dense)
    S = ex._Search(p, 30, None, ex.Relaxation(dense, t), None, 1e-4)
    nothing = np.zeros(p.n_channels, bool)
    wr = rotate(lazy, inverse_basis(dense))
    r = wr.M.shape[0]
    tracemalloc.start()
    try:
        d, val, _, info = saddle_sizes(wr, 0.9 * t[lazy.col_group], lambda L, a: S.bound(L, a, nothing, ~nothing)[0],
                                       k=30, iterations=4, single=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info["iterations"] == 4 and val > 0
    assert peak < 4.7 * (4 * r * r), peak / (4 * r * r)


def test_a_checked_factor_from_the_view_is_the_float64_factor_in_the_asked_precision(lazy_always):
    from solvers.selection.perspective import _checked_factor

    p = _problem(20, 500, seed=8)
    M = whiten(p, lazy=True).M
    D = M.dense()
    lam = np.linalg.eigvalsh(D)[0]
    shift = np.full(D.shape[0], 0.5 * lam)
    want = np.linalg.cholesky(D - np.diag(shift))
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-6)):
        L = _checked_factor(M, shift, dtype)
        assert L.dtype == dtype and L.flags.f_contiguous and np.all(np.triu(L, 1) == 0)
        np.testing.assert_allclose(L, want, rtol=0, atol=tol * np.abs(want).max())
    assert _checked_factor(M, np.full(D.shape[0], 1.5 * lam), np.float32) is None      # not positive definite


def test_exact_with_block_sizes_on_the_view_proves_the_brute_force_optimum(monkeypatch):
    """The bank's 3×3 layer (C = 8, k = 4) on the view: warm start, interior-point sizes, the ascent's rotated
    problems, the block root and the tree read it: the brute-force optimum, proven, as on the array."""
    import solvers.selection.exact as ex
    from tests.solvers.selection.bank import BANK, BANK_IDS, brute_force

    monkeypatch.setattr(ex, "ENUMERATE_MAX", 0)
    p, k = BANK[BANK_IDS.index("conv3x3_C8_k4")]
    _, opt = brute_force(p, k)
    dense = ex.select_exact(p, k=k, time_limit=30.0, lasso=False)
    monkeypatch.setattr(gr, "LAZY_MIN_BLOCK_COLUMNS", 0)
    lazy = ex.select_exact(p, k=k, time_limit=30.0, lasso=False)
    assert lazy.status == dense.status == Status.OPTIMAL
    assert lazy.info["shift_used"] == dense.info["shift_used"] == "block" and lazy.info["sizes_iterations"] > 0
    assert lazy.objective == pytest.approx(opt, rel=1e-6) and np.array_equal(lazy.mask, dense.mask)
    assert lazy.bound <= opt + 1e-9


def test_exact_keeps_a_view_a_view(monkeypatch):
    """Exact keeps a multi-column group read from the statistics as a view through the scalar shift, the root, the
    block shifts and the tree (a densified copy was a second copy of the statistics beside them: exact at C = 1,024
    3×3 peaked at 1.57× the statistics with it, 0.60× without), skips LASSO's group problem on it, and proves what
    the array proves."""
    import solvers.selection.exact as ex
    from tests.solvers.selection.bank import BANK, BANK_IDS, brute_force

    monkeypatch.setattr(ex, "ENUMERATE_MAX", 0)
    p, k = BANK[BANK_IDS.index("conv3x3_C8_k4")]
    _, opt = brute_force(p, k)
    monkeypatch.setattr(gr, "LAZY_MIN_BLOCK_COLUMNS", 0)
    real = ex.densified

    def densified(w):
        assert not isinstance(w.M, BlockGram), "exact densified a view of the statistics"
        return real(w)

    monkeypatch.setattr(ex, "densified", densified)
    res = ex.select_exact(p, k=k, time_limit=30.0)
    assert res.status == Status.OPTIMAL and res.info["shift_used"] == "block"
    assert res.objective == pytest.approx(opt, rel=1e-6) and res.bound <= opt + 1e-9
    assert "lasso" not in res.info["incumbents"] and "greedy" in res.info["incumbents"]
