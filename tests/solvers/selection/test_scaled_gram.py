"""The whitened Gram of one-column groups read from the statistics (ScaledGram) against the dense matrix."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import solvers.selection.greedy as gr
from solvers import SelectionProblem, select_channels
from solvers.selection.greedy import densified, forward_mask, whiten
from solvers.selection.scaled_gram import ScaledGram


def _problem(C: int, n: int, *, dead: bool, shuffled: bool, seed: int = 0, mix: float = 0.1,
             used: int = 6) -> SelectionProblem:
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, C)) @ (np.eye(C) + mix * rng.normal(size=(C, C)))
    if dead:
        Z[:, [3, 7]] = 0.0
    Y = Z[:, :used] @ rng.normal(size=(used, 5)) + 0.3 * rng.normal(size=(n, 5))
    return SelectionProblem.from_data(Z, Y, rng.permutation(C) if shuffled else np.arange(C))


@pytest.mark.parametrize("dead", [False, True])
@pytest.mark.parametrize("shuffled", [False, True])
def test_reads_equal_the_dense_whitened_gram_bit_for_bit(dead, shuffled, monkeypatch):
    monkeypatch.setattr(gr, "WHITEN_VECTOR_MIN_CHANNELS", 0)
    p = _problem(40, 160, dead=dead, shuffled=shuffled)
    lazy, dense = whiten(p, lazy=True), whiten(p)
    M, D = lazy.M, dense.M
    assert isinstance(M, ScaledGram) and isinstance(D, np.ndarray) and M.shape == D.shape
    assert np.array_equal(M.dense(), D) and np.array_equal(np.asarray(M), D) and np.array_equal(M.copy(), D)
    r = D.shape[0]
    rng = np.random.default_rng(1)
    cols = rng.choice(r, 9, replace=False)
    rows = rng.choice(r, 7, replace=False)
    mask = rng.random(r) < 0.4
    for key in read_keys(rows, cols, mask):
        assert np.array_equal(M[key], D[key]), key
    assert np.array_equal(M.astype(np.float32), D.astype(np.float32))
    sub = M[np.ix_(cols, cols)]
    assert np.array_equal(sub, sub.T) and np.all(np.diag(sub) == 1.0)
    X = rng.normal(size=(r, 3))
    np.testing.assert_allclose(M @ X, D @ X, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(M @ X[:, 0], D @ X[:, 0], rtol=1e-12, atol=1e-12)
    assert np.array_equal(densified(lazy).M, D) and densified(dense) is dense


def read_keys(rows: np.ndarray, cols: np.ndarray, mask: np.ndarray) -> list:
    """Every kind of read a lazy Gram answers: slices, gathers, masks, scalars, repeated columns."""
    return [(slice(None), cols), slice(3, 17), np.ix_(rows, cols), np.ix_(cols, cols), np.ix_(mask, mask),
            (slice(None), slice(5, 9)), (mask, slice(None)), (rows, slice(2, 30, 3)), (4, slice(None)),
            (slice(None), 6), (5, 5), (slice(None), np.array([2, 2, 8]))]


def test_the_statistics_are_never_written(monkeypatch):
    monkeypatch.setattr(gr, "WHITEN_VECTOR_MIN_CHANNELS", 0)
    p = _problem(30, 120, dead=True, shuffled=True)
    before = p.gram.copy()
    M = whiten(p, lazy=True).M
    M[:, np.arange(5)][0, 0] = 7.0
    M.dense()[1, 1] = 7.0
    _ = M @ np.ones(M.shape[0])
    assert np.array_equal(p.gram, before)


@pytest.mark.parametrize("method", ["greedy", "backward", "swap", "exact", "exact-ascent", "exact-one-column"])
@pytest.mark.parametrize("budget", [False, True])
def test_methods_choose_the_same_channels_with_the_lazy_gram(method, budget, monkeypatch):
    """Every method whitens one-column groups lazily past the threshold: the same sets as with the dense matrix
    (exact's fallback ascent, which keeps the lazy one to the end, the same bound)."""
    import solvers.selection.exact as ex

    p = _problem(24, 120, dead=True, shuffled=True, seed=3)
    if method == "exact-one-column":      # (the Newton shifts, root, cuts and tree of large one-column layers: lazy M)
        monkeypatch.setattr(ex, "ONE_COLUMN_ASCENT_MIN", 0)
        method = "exact"
    if method == "exact-ascent":          # (as if no root relaxation fitted the limit: test_exact's _root_never_fits)
        monkeypatch.setattr(ex, "FLOP_RATE", 1e-3)
        method = "exact"
        p = _problem(24, 2000, dead=True, shuffled=True, seed=3, mix=0.0, used=24)   # (conditioned: a bound > 0)
    kw = dict(budget=0.5 * float(p.costs.sum())) if budget else dict(k=9)
    monkeypatch.setattr(gr, "WHITEN_VECTOR_MIN_CHANNELS", 10**9)
    dense = select_channels(p, method=method, time_limit=30, **kw)
    monkeypatch.setattr(gr, "WHITEN_VECTOR_MIN_CHANNELS", 0)
    lazy = select_channels(p, method=method, time_limit=30, **kw)
    assert np.array_equal(lazy.mask, dense.mask)
    assert lazy.objective == pytest.approx(dense.objective, rel=1e-9)
    if method == "exact":
        # both proven to the default gap (where each search stops turns on BLAS round-off: the bounds differed by
        # 2.4e-6 relative with one OpenBLAS thread and 5.2e-5 with two, on an AMD EPYC)
        assert lazy.status == dense.status
        if lazy.status.value == "optimal":
            for r in (lazy, dense):
                assert r.objective * (1 - ex.DEFAULT_GAP) - 1e-12 <= r.bound <= r.objective + 1e-12
        else:   # (the fallback ascent: the same steps on the same numbers)
            assert lazy.bound == pytest.approx(dense.bound, rel=1e-6, abs=1e-12)
        assert lazy.info.get("skipped_root") == dense.info.get("skipped_root")
        assert lazy.info.get("cut_steps") == dense.info.get("cut_steps")
        if lazy.info.get("skipped_root") and not budget:
            assert lazy.info["cut_steps"] > 0 and lazy.bound > 0.5 * lazy.objective


def test_forward_selection_keeps_no_copy_of_the_gram():
    """C = 2,400 one-column channels (Gram 46 MB): forward selection of 40 channels traces well under the
    statistics (the dense whitened copy alone was as large as them)."""
    C = 2400
    p = planted_problem(np.arange(C), C // 4)
    assert C > gr.WHITEN_VECTOR_MIN_CHANNELS
    mask, peak = forward_selection_peak(p, 40)
    assert mask.sum() == 40
    assert peak < 0.2 * p.gram.nbytes, (peak, p.gram.nbytes)


def planted_problem(groups: np.ndarray, rank: int, m: int = 8, seed: int = 0) -> SelectionProblem:
    """Statistics of a low-rank-plus-identity Gram over ``groups``' columns, ``Y`` planted on 5 % of the columns."""
    rng = np.random.default_rng(seed)
    d = groups.size
    A = rng.normal(size=(d, rank))
    G = A @ A.T + 0.5 * np.eye(d)
    del A
    W = rng.normal(size=(d, m)) * (rng.random((d, 1)) < 0.05)
    cross = G @ W
    return SelectionProblem(G, cross, 1.1 * float(np.sum(W * cross)), groups)


def forward_selection_peak(p: SelectionProblem, k: int) -> tuple[np.ndarray, int]:
    """Forward selection's set of ``k`` channels and the peak memory it traced."""
    tracemalloc.start()
    try:
        mask = forward_mask(p, k, None)
        return mask, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_exacts_warm_start_keeps_a_lazy_gram_uncopied(monkeypatch):
    """With the Gram read lazily exact's warm start is forward selection and swaps: backward's r×r inverse and
    LASSO's C×C channel Gram would each be a second copy of the statistics. The dense path keeps both."""
    from solvers.selection.exact import select_exact

    p = _problem(24, 120, dead=True, shuffled=True, seed=5)
    monkeypatch.setattr(gr, "WHITEN_VECTOR_MIN_CHANNELS", 10**9)
    dense = select_exact(p, k=9, time_limit=30)
    monkeypatch.setattr(gr, "WHITEN_VECTOR_MIN_CHANNELS", 0)
    lazy = select_exact(p, k=9, time_limit=30)
    assert "backward" in dense.info["incumbents"]
    assert not {"backward", "lasso"} & set(lazy.info["incumbents"]) and "greedy" in lazy.info["incumbents"]
    assert lazy.objective == pytest.approx(dense.objective, rel=1e-9)


def test_gathered_products_read_the_lazy_gram_in_blocks(monkeypatch):
    """``M[rows][:, cols] @ X`` from a ScaledGram comes a block of rows at a time (tiny blocks here: every product
    spans many), equal to the dense matrix's product; on an array it is the one-gather expression itself."""
    import solvers.selection.scaled_gram as sg
    from solvers.selection.scaled_gram import gathered_product

    monkeypatch.setattr(gr, "WHITEN_VECTOR_MIN_CHANNELS", 0)
    monkeypatch.setattr(sg, "_BLOCK_ENTRIES", 50)
    monkeypatch.setattr(sg, "_block_entries", lambda r: 50)
    p = _problem(40, 160, dead=True, shuffled=True)
    M, D = whiten(p, lazy=True).M, whiten(p).M
    r = D.shape[0]
    rng = np.random.default_rng(3)
    T = rng.random(r) < 0.6
    idx = np.flatnonzero(T)
    X = rng.normal(size=(idx.size, 4))
    for rows, cols in [(~T, T), (slice(None), idx), (np.flatnonzero(~T), idx)]:
        want = (D[:, cols] if isinstance(rows, slice) else D[np.ix_(rows, cols)]) @ X
        np.testing.assert_allclose(gathered_product(M, rows, cols, X), want, rtol=1e-12, atol=1e-13)
        assert np.array_equal(gathered_product(D, rows, cols, X), want)


def test_lambda_min_of_a_lazy_gram_never_densifies_it(monkeypatch):
    """The smallest eigenvalue of a lazily read Gram comes from inverse iteration on its (panel) factor: eigvalsh
    would build the dense r×r first. The estimate is never below the true value and close to it."""
    from solvers.selection import exact as ex

    monkeypatch.setattr(gr, "WHITEN_VECTOR_MIN_CHANNELS", 0)
    p = _problem(60, 300, dead=False, shuffled=True, mix=0.3)
    M = whiten(p, lazy=True).M
    true = float(np.linalg.eigvalsh(M.dense())[0])
    monkeypatch.setattr(ScaledGram, "dense", lambda *a, **k: pytest.fail("the lazy Gram was densified"))
    est = ex._lambda_min(M)
    assert true * (1 - 1e-9) <= est <= 1.01 * true
