"""VNN-LIB 1.0 reading and writing: the shared MNIST properties, disjunctions over input boxes, linear
output terms, round trips, and errors that name the line."""
from __future__ import annotations

import numpy as np
import pytest

from solvers.errors import InvalidInputError
from solvers.network.spec import Spec
from solvers.network.vnnlib import load_vnnlib, parse_vnnlib, write_vnnlib


def _decls(n_x, n_y):
    return "".join(f"(declare-const X_{i} Real)\n" for i in range(n_x)) + \
        "".join(f"(declare-const Y_{j} Real)\n" for j in range(n_y))


def test_all_shared_properties_parse_to_one_box_in_unit_cube_with_nine_disjuncts(shared_bench):
    files = sorted((shared_bench / "vnnlib").glob("*.vnnlib"))
    assert len(files) == 30
    for f in files:
        specs = load_vnnlib(f, 784, 10)
        assert len(specs) == 1
        (spec,) = specs
        assert spec.lower.min() >= 0.0 and spec.upper.max() <= 1.0
        eps = float(f.stem.split("_")[-1])
        assert np.max(spec.upper - spec.lower) <= 2 * eps + 1e-6
        assert len(spec.disjuncts) == 9
        with open(f) as fh:
            label = int(fh.readline().split("label:")[1].strip().rstrip("."))
        for A, b in spec.disjuncts:   # "Y_j >= Y_label" is  Y_label − Y_j <= 0
            assert A.shape == (1, 10) and b[0] == 0.0
            assert A[0, label] == 1.0 and A.sum() == 0.0 and np.count_nonzero(A) == 2


def test_disjunction_over_input_boxes_gives_one_spec_per_box_and_linear_terms():
    text = _decls(2, 3) + """
; comment
(assert (or
  (and (>= X_0 0) (<= X_0 0.5) (>= X_1 -1) (<= X_1 1) (<= (+ Y_0 (* -1 Y_1)) 0.25))
  (and (>= X_0 0) (<= X_0 0.5) (>= X_1 -1) (<= X_1 1) (>= (- Y_2 Y_0) 2) (< Y_1 3))
  (and (>= X_0 0.5) (<= X_0 1) (>= 1 X_1) (> X_1 0) (= Y_2 (* 2 Y_1)))
))"""
    specs = parse_vnnlib(text, 2, 3, name="p")
    assert len(specs) == 2
    a, b = specs
    np.testing.assert_array_equal(a.lower, [0, -1])
    np.testing.assert_array_equal(a.upper, [0.5, 1])
    assert len(a.disjuncts) == 2
    A0, b0 = a.disjuncts[0]
    np.testing.assert_array_equal(A0, [[1, -1, 0]]) and np.testing.assert_array_equal(b0, [0.25])
    A1, b1 = a.disjuncts[1]
    np.testing.assert_array_equal(A1, [[1, 0, -1], [0, 1, 0]])
    np.testing.assert_array_equal(b1, [-2, 3])
    np.testing.assert_array_equal(b.lower, [0.5, 0]) and np.testing.assert_array_equal(b.upper, [1, 1])
    (A2, b2), = b.disjuncts       # "=" is two inequalities
    np.testing.assert_array_equal(A2, [[0, -2, 1], [0, 2, -1]])
    # semantics: y = (0, 0, 2) is unsafe for disjunct 1 of box a, (0, 1, 2) for box b
    assert a.unsafe_margin([0.0, 0.0, 2.0]) <= 0 and b.unsafe_margin([0.0, 1.0, 2.0]) <= 0
    assert b.unsafe_margin([0.0, 1.0, 2.5]) > 0


def test_write_then_load_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(0)
    c = rng.uniform(size=7)
    spec = Spec.robustness(c, 0.1 / 3, 2, 4, name="rob")
    A = rng.normal(size=(2, 4))
    spec2 = Spec(spec.lower, spec.upper, spec.disjuncts + ((A, rng.normal(size=2)),))
    path = tmp_path / "q.vnnlib"
    write_vnnlib(spec2, path)
    (back,) = load_vnnlib(path, 7, 4)
    np.testing.assert_array_equal(back.lower, spec2.lower)
    np.testing.assert_array_equal(back.upper, spec2.upper)
    assert len(back.disjuncts) == len(spec2.disjuncts)
    for (A1, b1), (A2, b2) in zip(back.disjuncts, spec2.disjuncts):
        np.testing.assert_array_equal(A1, A2)
        np.testing.assert_array_equal(b1, b2)
    with pytest.raises(InvalidInputError, match="box input regions only"):
        write_vnnlib(Spec.robustness(c, 0.5, 0, 4, norm="l1"), tmp_path / "l1.vnnlib")


def test_property_without_output_constraints_marks_every_output_unsafe():
    (spec,) = parse_vnnlib(_decls(1, 2) + "(assert (<= X_0 1))(assert (>= X_0 0))", 1, 2)
    assert spec.unsafe_margin([5.0, -3.0]) <= 0


@pytest.mark.parametrize("body,match", [
    ("(assert (<= X_0 1)) (assert (>= X_0 0)) (assert (or (<= Y_0 0)", r"line 4: unbalanced '\('"),
    ("(assert (<= X_0 1))\n)", r"line 5: unbalanced '\)'"),
    ("(assert (<= X_0 1)) (assert (>= X_0 0))\n(assert (<= Y_7 0))", r"line 5: unknown variable 'Y_7'"),
    ("(assert (<= X_0 1)) (assert (>= X_0 0))\n(assert (<= (* Y_0 Y_1) 0))", "line 5: non-linear product"),
    ("(assert (<= X_0 1)) (assert (>= X_0 0))\n(assert (xor (<= Y_0 0)))", "line 5: unsupported connective"),
    ("(assert (<= X_0 1)) (assert (<= Y_0 0))", "X_0 has no lower bound"),
    ("(assert (<= X_0 1)) (assert (>= X_0 0)) (assert (<= (+ X_0 Y_0) 0))", "not both"),
    ("(assert (<= X_0 0)) (assert (>= X_0 1)) (assert (<= Y_0 0))", "input box must be non-empty"),
    ("(check-sat)", "line 4: unsupported command 'check-sat'"),
])
def test_malformed_properties_raise_with_the_line(body, match):
    with pytest.raises(InvalidInputError, match=match):
        parse_vnnlib(_decls(1, 2) + body, 1, 2)


def test_variable_counts_must_match_the_network(tmp_path):
    path = tmp_path / "p.vnnlib"
    path.write_text(_decls(3, 2) + "(assert (<= X_0 1))")
    with pytest.raises(InvalidInputError, match="must declare 784 inputs .* got 3"):
        load_vnnlib(path, 784, 2)
    with pytest.raises(InvalidInputError, match="must declare 10 outputs .* got 2"):
        load_vnnlib(path, 3, 10)
    with pytest.raises(InvalidInputError, match="VNN-LIB file must exist"):
        load_vnnlib(tmp_path / "missing.vnnlib", 3, 2)
