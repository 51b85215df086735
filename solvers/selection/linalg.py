"""Dense products that stay inside memory and clear of OpenBLAS's large multithreaded SYRK.

numpy turns ``a @ a.T`` into one SYRK call; the OpenBLAS bundled with numpy 2.4 (0.3.31) crashes the
process on some large ones with two or more threads (``W = np.ones((25088, 512)); W @ W.T``
segfaults, ``OPENBLAS_NUM_THREADS=1`` passes). :func:`chunked_product` computes every large product in
row blocks of the result (GEMM on distinct buffers, each output block at most ``MAX_PRODUCT_BYTES``),
and :func:`diagonal_blocks` finds the independent diagonal blocks of a Gram (a channel group's joint
problem stacks one block per consumer), so that products over them need only the blocks.
"""
from __future__ import annotations

import contextlib

import numpy as np

__all__ = ["MAX_PRODUCT_BYTES", "chunked_product", "gram_of_rows", "diagonal_blocks", "one_blas_thread",
           "subtract_product", "symmetrize_in_place"]

#: Largest output of one BLAS product (bytes of float64); larger products are done in row blocks.
MAX_PRODUCT_BYTES = 256 * 2**20


def chunked_product(a: np.ndarray, b: np.ndarray, *, transpose_a: bool = False, out: np.ndarray | None = None,
                    max_bytes: int | None = None) -> np.ndarray:
    """``a @ b`` (or ``aᵀ @ b``) computed in row blocks of the result, each at most ``max_bytes``
    (default :data:`MAX_PRODUCT_BYTES`), written into ``out`` when given (float64)."""
    max_bytes = MAX_PRODUCT_BYTES if max_bytes is None else max_bytes
    rows = a.shape[1] if transpose_a else a.shape[0]
    cols = b.shape[1]
    if out is None:
        out = np.empty((rows, cols))
    step = max(1, int(max_bytes // max(8 * cols, 1)))
    for i in range(0, rows, step):
        j = min(i + step, rows)
        piece = a[:, i:j].T if transpose_a else a[i:j]
        np.matmul(piece, b, out=out[i:j])
    return out


#: Rows of a block of :func:`gram_of_rows`: GEMMs of this height never take the SYRK path.
_GRAM_ROWS = 1024


def gram_of_rows(a: np.ndarray) -> np.ndarray:
    """``a @ aᵀ`` (n×n) as GEMMs of at most ``_GRAM_ROWS`` rows of ``a`` against all of it (never one
    SYRK over a large ``a``, see the module docstring), the lower blocks mirrored from the upper."""
    n = a.shape[0]
    if n <= _GRAM_ROWS:
        return a @ a.T
    out = np.empty((n, n))
    for i in range(0, n, _GRAM_ROWS):
        j = min(i + _GRAM_ROWS, n)
        np.matmul(a[i:j], a[i:].T, out=out[i:j, i:])
        out[j:, i:j] = out[i:j, j:].T
    return out


def subtract_product(A: np.ndarray, U: np.ndarray, X: np.ndarray, *, block_entries: int = 1 << 20) -> None:
    """``A −= U X`` in place: BLAS gemm on A's memory when it is contiguous (no temporary); else (e.g. a strided view
    of a larger buffer, as swap's state) a block of rows at a time, no temporary above ``block_entries`` entries."""
    try:
        from scipy.linalg.blas import dgemm

        if A.flags.c_contiguous and A.dtype == np.float64:
            # A is C-ordered: its transpose is Fortran-ordered, and Aᵀ −= Xᵀ Uᵀ is the same update. Each operand is
            # handed over in whichever orientation is already in BLAS's order (a transposed flag instead of a copy).
            a, ta = (X, 1) if X.flags.f_contiguous and not X.flags.c_contiguous else (X.T, 0)
            b, tb = (U, 1) if U.flags.f_contiguous and not U.flags.c_contiguous else (U.T, 0)
            out = dgemm(alpha=-1.0, a=a, b=b, trans_a=ta, trans_b=tb, beta=1.0, c=A.T, overwrite_c=True)
            if np.shares_memory(out, A):
                return
            A[...] = out.T
            return
    except ImportError:  # pragma: no cover - scipy always ships BLAS
        pass
    rows = max(1, block_entries // max(1, A.shape[1]))
    for i in range(0, A.shape[0], rows):
        A[i:i + rows] -= U[i:i + rows] @ X


def symmetrize_in_place(A: np.ndarray, block: int = 512) -> None:
    """``A ← (A + Aᵀ)/2`` in place, by pairs of square blocks: b×b temporaries where the expression holds two
    more n×n arrays. Each entry is ``0.5·(A_ij + A_ji)``, bit for bit the expression's."""
    n = A.shape[0]
    for i in range(0, n, block):
        for j in range(0, i + 1, block):
            s = 0.5 * (A[i:i + block, j:j + block] + A[j:j + block, i:i + block].T)
            A[i:i + block, j:j + block] = s
            A[j:j + block, i:i + block] = s.T


def diagonal_blocks(gram: np.ndarray) -> list[tuple[int, int]]:
    """The finest split of ``gram``'s columns into contiguous ranges ``[(start, stop)]`` with no
    non-zero entry outside the diagonal blocks they form (one range when it does not split)."""
    n = gram.shape[0]
    if n == 0:
        return []
    last = np.zeros(n, dtype=np.int64)   # last non-zero column of each row (itself at least)
    step = max(1, 2**24 // max(n, 1))
    for i in range(0, n, step):
        rows = np.arange(i, min(i + step, n))
        nz = gram[i:i + step] != 0
        last[i:i + step] = np.maximum(np.where(nz.any(axis=1), n - 1 - np.argmax(nz[:, ::-1], axis=1), rows), rows)
    reach = np.maximum.accumulate(last)
    ends = np.flatnonzero(reach == np.arange(n)) + 1  # a block closes where nothing before reaches further
    starts = np.r_[0, ends[:-1]]
    return list(zip(starts.tolist(), ends.tolist()))


def one_blas_thread():
    """A context in which BLAS runs on one thread (threadpoolctl; a no-op without it), for loops of
    small products: OpenBLAS wakes its threads for every call, and on a busy 2-core machine a
    512×512 triangular solve measured 16 ms with two threads against 0.13 ms with one."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # (threadpoolctl comes with scikit-learn, a dependency)
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")
