"""Verification: torch model → numpy IR (:mod:`.export`), sound bounds (:mod:`.bounds`, numpy:
interval / CROWN / LP, the cheap root stages and the tests' reference), the torch bound engine
(:mod:`.crown`: batched CROWN, α-CROWN, β-CROWN on CPU or CUDA), branch and bound (:mod:`.bab`:
ReLU splits and input splits), PGD (:mod:`.attack`), the verify pipeline (:mod:`.verify`, the
MILP encoding is :mod:`solvers.milp`) and benchmark suites in a process pool (:mod:`.suite`).

Kept free of top-level torch imports except :mod:`.export`, :mod:`.crown` and :mod:`.bab` (imported
by :mod:`.verify` only when branch and bound runs), so pool workers that only verify stay light.
"""
