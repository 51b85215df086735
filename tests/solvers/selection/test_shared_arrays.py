"""Large arrays handed to worker processes through shared memory (solvers.selection.shared_arrays)."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

import solvers.selection.shared_arrays as sa
from solvers.selection.shared_arrays import SharedPickle

needs_shm = pytest.mark.skipif(sa._free_shm_bytes() < (64 << 20), reason="no /dev/shm with 64 MB free here")


def _segments() -> set[str]:
    """Shared-memory segments (not the semaphores a process pool keeps there too)."""
    try:
        return {n for n in os.listdir(sa.SHM_DIR) if n.startswith("psm_")}
    except OSError:
        return set()


@needs_shm
def test_large_arrays_travel_as_read_only_shared_segments_and_are_removed(monkeypatch):
    monkeypatch.setattr(sa, "SHARE_MIN_BYTES", 1000)
    rng = np.random.default_rng(0)
    big_c = rng.normal(size=(60, 50))
    big_f = np.asfortranarray(rng.normal(size=(40, 70)).astype(np.float32))
    small = np.arange(5.0)
    obj = {"a": big_c, "b": [big_f, big_c], "s": small, "t": ("x", 3)}
    before = _segments()
    shared = SharedPickle(obj)
    try:
        assert shared.shared_bytes == big_c.nbytes + big_f.nbytes           # (each array once)
        assert len(shared.data) < big_c.nbytes                               # (the pickle is small)
        assert len(_segments() - before) == 2
        back = pickle.loads(shared.data)
        np.testing.assert_array_equal(back["a"], big_c)
        np.testing.assert_array_equal(back["b"][0], big_f)
        assert back["b"][1] is back["a"]                                    # (shared references stay shared)
        assert back["b"][0].flags.f_contiguous and back["b"][0].dtype == np.float32
        assert not back["a"].flags.writeable and back["s"].flags.writeable
        with pytest.raises(ValueError):
            back["a"][0, 0] = 1.0
        assert back["t"] == ("x", 3)
    finally:
        shared.close()
    assert _segments() - before == set()
    shared.close()                                                          # (idempotent)
    np.testing.assert_array_equal(back["a"], big_c)                         # (a mapping outlives the removal)


def test_without_room_in_dev_shm_the_plain_pickle_is_used(monkeypatch):
    monkeypatch.setattr(sa, "SHARE_MIN_BYTES", 1000)
    monkeypatch.setattr(sa, "_free_shm_bytes", lambda: 10_000)
    x = np.ones((100, 100))
    before = _segments()
    with SharedPickle({"x": x}) as shared:
        assert shared.shared_bytes == 0 and _segments() == before
        back = pickle.loads(shared.data)
    np.testing.assert_array_equal(back["x"], x)
    assert back["x"].flags.writeable


def test_where_no_segment_can_be_made_the_plain_pickle_is_used(monkeypatch):
    from multiprocessing import shared_memory

    def refuse(*args, **kwargs):
        raise PermissionError("simulated: /dev/shm is not writable")

    monkeypatch.setattr(sa, "SHARE_MIN_BYTES", 1000)
    monkeypatch.setattr(sa, "_free_shm_bytes", lambda: 1 << 40)
    monkeypatch.setattr(shared_memory, "SharedMemory", refuse)
    x = np.ones((100, 100))
    with SharedPickle({"x": x, "y": [x]}) as shared:
        assert shared.shared_bytes == 0
        back = pickle.loads(shared.data)
    np.testing.assert_array_equal(back["x"], x)
    assert back["y"][0] is back["x"] and back["x"].flags.writeable


@needs_shm
def test_parallel_branch_and_bound_on_shared_read_only_arrays_proves_the_brute_force_optimum(monkeypatch):
    """Every array of the search's state goes to the two workers through shared memory, mapped read-only: no node
    writes into them (it would raise), and the certified optimum is brute force's."""
    import solvers.selection.exact as ex
    from solvers import Status
    from tests.solvers.selection.bank import BANK, BANK_IDS, brute_force

    monkeypatch.setattr(ex, "ENUMERATE_MAX", 0)             # (the tree, not the enumeration of 66 sets)
    monkeypatch.setattr(sa, "SHARE_MIN_BYTES", 1)
    made = []
    real = SharedPickle.__init__

    def spy(self, obj):
        real(self, obj)
        made.append(self.shared_bytes)

    monkeypatch.setattr(SharedPickle, "__init__", spy)
    before = _segments()
    p, k = BANK[BANK_IDS.index("correlated_C12_k2")]
    _, opt = brute_force(p, k)
    res = ex.select_exact(p, k=k, rel_gap=1e-9, lasso=False, warm_start=False, workers=2)
    assert made and made[0] > 0 and res.info["workers"] == 2
    assert res.status is Status.OPTIMAL and res.iterations > 1
    assert res.objective == pytest.approx(opt, rel=1e-9, abs=1e-13) and res.bound <= opt + 1e-9
    assert _segments() - before == set()
