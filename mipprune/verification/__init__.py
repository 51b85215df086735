"""Verification: torch model → numpy IR (:mod:`.export`), sound bounds (:mod:`.bounds`), PGD
(:mod:`.attack`), the verify pipeline (:mod:`.verify`, the MILP encoding is :mod:`solvers.milp`)
and benchmark suites in a process pool (:mod:`.suite`).

Kept free of top-level torch imports except :mod:`.export`, so pool workers that only verify stay light.
"""
