"""An object's large arrays handed to worker processes through shared memory instead of pickled copies.

Spawning a worker process pickles its arguments into a buffer of the main process (``multiprocessing``'s spawn
writes the whole pickle to a ``BytesIO`` before the pipe), once per worker, and every worker unpickles a copy of
its own. Exact's branch and bound with two workers on a restarted C = 512 3×3 problem peaked at 2.24× the
statistics in the main process that way, and each worker held another 0.7×.

:class:`SharedPickle` pickles an object with every array of at least ``SHARE_MIN_BYTES`` copied once into a POSIX
shared-memory segment (``multiprocessing.shared_memory``, so the resource tracker removes segments a crashed
process leaves behind); the pickle itself is small. Unpickling it in a worker maps each segment **read-only** (an
``mmap`` of ``/dev/shm/<name>`` with ``PROT_READ``): the workers share one copy, and any code that wrote into a
shared array would raise ``ValueError`` instead of changing what another process reads. Where ``/dev/shm`` is
missing or lacks room for the arrays (a container's default is often 64 MB, and writing past a full tmpfs is a
SIGBUS, not an error), the object is pickled as before (``SharedPickle.data`` is then the plain pickle).
"""
from __future__ import annotations

import io
import mmap
import os
import pickle

import numpy as np

__all__ = ["SharedPickle", "SHARE_MIN_BYTES"]

SHARE_MIN_BYTES = 1 << 20       # smaller arrays travel in the pickle
SHM_DIR = "/dev/shm"
SHM_HEADROOM = 2.0              # the arrays may take at most this share of /dev/shm's free room (1/2.0)


def _free_shm_bytes() -> int:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return int(st.f_bavail) * int(st.f_frsize)


def _large_arrays(obj) -> int:
    """Bytes of the distinct arrays of at least ``SHARE_MIN_BYTES`` that pickling ``obj`` would write."""
    seen: dict[int, int] = {}

    class _Counter(pickle.Pickler):
        def reducer_override(self, o):
            if type(o) is np.ndarray and o.nbytes >= SHARE_MIN_BYTES and not o.dtype.hasobject:
                seen[id(o)] = o.nbytes
                return _attach, ("", o.shape, o.dtype.str, "C")      # (a placeholder: nothing is written)
            return NotImplemented

    _Counter(io.BytesIO(), protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return sum(seen.values())


class SharedPickle:
    """``obj`` pickled with its large arrays in shared memory (see the module docstring).

    ``data`` (bytes) unpickles to an equal object in any process of this machine while the segments exist;
    :meth:`close` removes them (mappings a worker already holds stay valid). ``shared_bytes``: the bytes placed in
    shared memory (0 where the plain pickle was used)."""

    def __init__(self, obj):
        from multiprocessing import shared_memory

        self._segments: list = []
        self.shared_bytes = 0
        need = _large_arrays(obj)
        if need == 0 or need * SHM_HEADROOM > _free_shm_bytes():
            self.data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            return
        placed: dict[int, tuple] = {}
        owner = self

        class _Sharer(pickle.Pickler):
            def reducer_override(self, o):
                if type(o) is not np.ndarray or o.nbytes < SHARE_MIN_BYTES or o.dtype.hasobject:
                    return NotImplemented
                if id(o) not in placed:
                    order = "F" if o.flags.f_contiguous and not o.flags.c_contiguous else "C"
                    seg = shared_memory.SharedMemory(create=True, size=max(o.nbytes, 1))
                    owner._segments.append(seg)
                    view = np.ndarray(o.shape, o.dtype, buffer=seg.buf, order=order)
                    view[...] = o
                    del view
                    owner.shared_bytes += o.nbytes
                    placed[id(o)] = (seg.name, o.shape, o.dtype.str, order)
                return _attach, placed[id(o)]

        buf = io.BytesIO()
        try:
            _Sharer(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
        except OSError:
            # (no segment could be made, e.g. /dev/shm not writable here: the plain pickle, as without room)
            self.close()
            self.shared_bytes = 0
            self.data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            return
        except BaseException:
            self.close()
            raise
        self.data = buf.getvalue()

    def close(self) -> None:
        """Remove the segments (idempotent)."""
        for seg in self._segments:
            try:
                seg.unlink()
            except FileNotFoundError:                    # (already gone)
                pass
            try:
                seg.close()
            except BufferError:                          # (still viewed in this process: unmapped at exit)
                pass
        self._segments = []

    def __enter__(self) -> "SharedPickle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _attach(name: str, shape: tuple, dtype: str, order: str) -> np.ndarray:
    """A read-only array over the shared segment ``name`` (mapped, not copied; no resource-tracker entry: the
    creating process owns the segment)."""
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if nbytes == 0:
        return np.zeros(shape, dt, order=order)
    fd = os.open(os.path.join(SHM_DIR, name.lstrip("/")), os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, nbytes, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    return np.ndarray(shape, dt, buffer=mm, order=order)      # (read-only: the buffer is)
