"""Read and write VNN-LIB 1.0 properties (the VNN-COMP format) as :class:`solvers.network.spec.Spec` objects.

Why a small parser of our own: the ``vnnlib`` package on PyPI (1.0.2) implements the VNN-LIB *2.0*
grammar (``declare-network`` blocks) and rejects the VNN-COMP 2021-2024 files ("syntax error at line
3" on every property of the shared benchmark); the 1.0 dialect is a tiny s-expression language, so a
tokenizer plus a DNF expansion (~200 lines, ~10 ms per MNIST property) is simpler than a dependency.

Supported: ``(declare-const X_i Real)`` / ``(declare-const Y_j Real)``; ``(assert φ)`` where φ nests
``and`` / ``or`` over atoms ``(<= s t)``, ``(>= s t)``, ``(< s t)``, ``(> s t)``, ``(= s t)`` (strict
inequalities are read as non-strict, as VNN-COMP does); terms are linear: numbers, variables,
``(+ …)``, ``(- a b)``, ``(- a)``, ``(* c t)``. The assertions are conjoined and expanded into a
disjunction of conjunctions; each conjunction must bound every input (``X`` atoms on a single
variable) and may constrain outputs linearly. Conjunctions with the same input box are grouped into
one :class:`Spec` whose disjuncts are their output polytopes, so a usual property gives one Spec.
"""
from __future__ import annotations

import os
import re

import numpy as np

from solvers.errors import InvalidInputError
from solvers.network.spec import Spec

__all__ = ["load_vnnlib", "parse_vnnlib", "write_vnnlib", "format_result", "write_result", "read_result",
           "result_word"]

_TOKEN = re.compile(r";[^\n]*|\(|\)|[^\s()]+|\n")
_VAR = re.compile(r"^([XY])_(\d+)$")
_MAX_TERMS = 100_000   # guard against exponential DNF blow-up


class _Sym(str):
    """An atom of the s-expression with the line it came from."""

    line: int = 0


class _List(list):
    line: int = 0


def _err(line: int, msg: str) -> InvalidInputError:
    return InvalidInputError(f"line {line}: {msg}")


def _parse_sexprs(text: str) -> list:
    stack: list[_List] = [_List()]
    line = 1
    for m in _TOKEN.finditer(text):
        tok = m.group()
        if tok == "\n":
            line += 1
        elif tok.startswith(";"):
            continue
        elif tok == "(":
            lst = _List()
            lst.line = line
            stack[-1].append(lst)
            stack.append(lst)
        elif tok == ")":
            if len(stack) == 1:
                raise _err(line, "unbalanced ')': no matching '('")
            stack.pop()
        else:
            s = _Sym(tok)
            s.line = line
            stack[-1].append(s)
    if len(stack) > 1:
        raise _err(stack[-1].line, "unbalanced '(': missing ')' before the end of the file")
    return stack[0]


# ------------------------------------------------------------------------------ linear terms
def _linear(e, var_index) -> tuple[dict, float]:
    """A linear term as ({var: coef}, constant)."""
    if isinstance(e, _Sym):
        try:
            return {}, float(e)
        except ValueError:
            pass
        if e not in var_index:
            raise _err(e.line, f"unknown variable {e!r} (declare it with declare-const)")
        return {str(e): 1.0}, 0.0
    if not e or not isinstance(e[0], _Sym):
        raise _err(e.line, "expected a term such as (+ a b); got an empty or malformed list")
    op, args = e[0], [_linear(a, var_index) for a in e[1:]]
    if op == "+" and args:
        co: dict = {}
        c0 = 0.0
        for d, c in args:
            for k, v in d.items():
                co[k] = co.get(k, 0.0) + v
            c0 += c
        return co, c0
    if op == "-" and len(args) == 1:
        d, c = args[0]
        return {k: -v for k, v in d.items()}, -c
    if op == "-" and len(args) >= 2:
        co, c0 = dict(args[0][0]), args[0][1]
        for d, c in args[1:]:
            for k, v in d.items():
                co[k] = co.get(k, 0.0) - v
            c0 -= c
        return co, c0
    if op == "*" and args:
        consts = [a for a in args if not a[0]]
        if len(consts) < len(args) - 1:
            raise _err(e.line, "non-linear product: at most one factor of (* …) may contain variables")
        f = float(np.prod([c for _, c in consts]))
        var = [a for a in args if a[0]]
        if not var:
            return {}, f
        d, c = var[0]
        return {k: f * v for k, v in d.items()}, f * c
    raise _err(e.line, f"unsupported term operator {op!r} (expected +, -, *)")


# ------------------------------------------------------------------------------ formulas → DNF
def _atoms(e, var_index) -> list[tuple[dict, float, int]]:
    """An atom as a list of ``(coefs, rhs, line)`` meaning ``Σ coefs·vars <= rhs``."""
    op = e[0]
    if len(e) != 3:
        raise _err(e.line, f"comparison {op!r} needs exactly two operands; got {len(e) - 1}")
    (dl, cl), (dr, cr) = _linear(e[1], var_index), _linear(e[2], var_index)
    diff = dict(dl)
    for k, v in dr.items():
        diff[k] = diff.get(k, 0.0) - v
    rhs = cr - cl                      # lhs − rhs (op) 0  ⇔  Σ diff·v (op) cr − cl
    neg = ({k: -v for k, v in diff.items()}, -rhs, e.line)
    pos = (diff, rhs, e.line)
    if op in ("<=", "<"):
        return [pos]
    if op in (">=", ">"):
        return [neg]
    return [pos, neg]                  # "="


def _dnf(e, var_index) -> list[list]:
    if not isinstance(e, _List) or not e or not isinstance(e[0], _Sym):
        line = getattr(e, "line", 0)
        raise _err(line, f"expected a formula such as (<= X_0 1); got {e!r}")
    op = e[0]
    if op in ("<=", ">=", "<", ">", "="):
        return [_atoms(e, var_index)]
    if op == "and":
        terms: list[list] = [[]]
        for sub in e[1:]:
            d = _dnf(sub, var_index)
            terms = [t + u for t in terms for u in d] if len(d) > 1 else [t + d[0] for t in terms]
            if len(terms) > _MAX_TERMS:
                raise _err(e.line, f"the formula expands to more than {_MAX_TERMS} disjuncts")
        return terms
    if op == "or":
        out: list[list] = []
        for sub in e[1:]:
            out.extend(_dnf(sub, var_index))
        if not out:
            raise _err(e.line, "(or) needs at least one operand")
        return out
    raise _err(e.line, f"unsupported connective {op!r} (expected and, or, <=, >=, <, >, =)")


# ------------------------------------------------------------------------------ public API
def parse_vnnlib(text: str, n_inputs: int, n_outputs: int, name: str = "") -> list[Spec]:
    """Parse VNN-LIB 1.0 ``text``; see :func:`load_vnnlib`."""
    exprs = _parse_sexprs(text)
    var_index: dict[str, int] = {}
    asserts = []
    n_x = n_y = 0
    for e in exprs:
        if not isinstance(e, _List) or not e:
            raise _err(getattr(e, "line", 0), f"expected a command such as (assert …); got {e!r}")
        head = e[0]
        if head == "declare-const":
            if len(e) != 3 or not isinstance(e[1], _Sym) or e[2] != "Real":
                raise _err(e.line, "expected (declare-const NAME Real)")
            m = _VAR.match(e[1])
            if not m:
                raise _err(e.line, f"variables must be named X_<i> (inputs) or Y_<j> (outputs); got {e[1]!r}")
            if e[1] in var_index:
                raise _err(e.line, f"variable {e[1]} declared twice")
            var_index[str(e[1])] = int(m.group(2))
            if m.group(1) == "X":
                n_x += 1
            else:
                n_y += 1
        elif head == "assert":
            if len(e) != 2:
                raise _err(e.line, f"(assert …) takes one formula; got {len(e) - 1}")
            asserts.append(e[1])
        else:
            raise _err(e.line, f"unsupported command {head!r} (expected declare-const or assert)")
    if n_x != n_inputs:
        raise InvalidInputError(f"the property must declare {n_inputs} inputs X_0 … X_{n_inputs - 1} to match "
                                f"the network; got {n_x}")
    if n_y != n_outputs:
        raise InvalidInputError(f"the property must declare {n_outputs} outputs Y_0 … Y_{n_outputs - 1} to "
                                f"match the network; got {n_y}")
    for v, i in var_index.items():
        if i >= (n_inputs if v[0] == "X" else n_outputs):
            raise InvalidInputError(f"variable {v} is out of range: the property has "
                                    f"{n_inputs if v[0] == 'X' else n_outputs} of its kind")
    if not asserts:
        raise InvalidInputError("the property must contain at least one (assert …); got none")

    # pure conjunctions are shared by every term; only disjunctive asserts multiply out
    common: list = []
    terms: list[list] = [[]]
    for a in asserts:
        d = _dnf(a, var_index)
        if len(d) == 1:
            common.extend(d[0])
        else:
            terms = [t + u for t in terms for u in d]
            if len(terms) > _MAX_TERMS:
                raise _err(a.line, f"the property expands to more than {_MAX_TERMS} disjuncts")

    def apply(atoms, lo, hi, rows, rhs) -> bool:
        """Add ``atoms`` to the box (lo, hi) and output rows; False if a constant atom is false."""
        ok = True
        for coefs, r, line in atoms:
            coefs = {k: v for k, v in coefs.items() if v != 0.0}
            xs = [k for k in coefs if k[0] == "X"]
            if xs and len(xs) < len(coefs):
                raise _err(line, "an atom must constrain inputs or outputs, not both")
            if xs:
                if len(xs) != 1:
                    raise _err(line, "input constraints must be bounds on one variable (a box); got a "
                                     f"linear constraint over {', '.join(sorted(xs))}")
                i, c = var_index[xs[0]], coefs[xs[0]]
                if c > 0:
                    hi[i] = min(hi[i], r / c)
                else:
                    lo[i] = max(lo[i], r / c)
            elif coefs:
                row = np.zeros(n_outputs)
                for k, v in coefs.items():
                    row[var_index[k]] += v
                rows.append(row)
                rhs.append(r)
            elif r < 0:            # constant atom 0 <= r that is false
                ok = False
        return ok

    base_lo, base_hi = np.full(n_inputs, -np.inf), np.full(n_inputs, np.inf)
    base_rows: list = []
    base_rhs: list = []
    base_ok = apply(common, base_lo, base_hi, base_rows, base_rhs)   # shared atoms: once
    boxes: dict[bytes, tuple] = {}
    order: list[bytes] = []
    for term in terms:
        lo, hi, rows, rhs = base_lo.copy(), base_hi.copy(), list(base_rows), list(base_rhs)
        if not (apply(term, lo, hi, rows, rhs) and base_ok):
            continue
        missing = np.flatnonzero(~np.isfinite(lo) | ~np.isfinite(hi))
        if missing.size:
            i = int(missing[0])
            side = "lower" if not np.isfinite(lo[i]) else "upper"
            raise InvalidInputError(f"every input needs a lower and an upper bound; X_{i} has no {side} "
                                    f"bound ({missing.size} input(s) incomplete)")
        if np.any(lo > hi):
            i = int(np.flatnonzero(lo > hi)[0])
            raise InvalidInputError(f"the input box must be non-empty; got X_{i} in [{lo[i]}, {hi[i]}]")
        if rows:
            A, b = np.array(rows), np.array(rhs)
        else:                      # no output constraint: every output is unsafe
            A, b = np.zeros((1, n_outputs)), np.zeros(1)
        key = lo.tobytes() + hi.tobytes()
        if key not in boxes:
            boxes[key] = (lo, hi, [])
            order.append(key)
        boxes[key][2].append((A, b))
    if not order:
        raise InvalidInputError("the property is unsatisfiable as written (every disjunct has a false "
                                "constant atom)")
    specs = []
    for k, key in enumerate(order):
        lo, hi, ds = boxes[key]
        nm = name if len(order) == 1 else f"{name}#{k}"
        specs.append(Spec(lo, hi, tuple(ds), name=nm))
    return specs


def load_vnnlib(path, n_inputs: int, n_outputs: int) -> list[Spec]:
    """Read a VNN-LIB 1.0 property file.

    Parameters
    ----------
    path : str or Path
    n_inputs, n_outputs : int
        The network's flat input and output sizes; the file must declare exactly ``X_0 … X_{n_inputs−1}``
        and ``Y_0 … Y_{n_outputs−1}``.

    Returns
    -------
    list of Spec
        One per distinct input box (usually one); each Spec's disjuncts are the unsafe output
        polytopes ``A y <= b`` for that box. A property is violated (``sat``) iff some Spec has a
        counterexample.

    Raises ``InvalidInputError`` (with the line number where it applies) for a missing file,
    malformed s-expressions, unsupported constructs, inputs without bounds or wrong variable counts.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise InvalidInputError(f"VNN-LIB file must exist; got {p!r} (not found)")
    with open(p, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    try:
        return parse_vnnlib(text, int(n_inputs), int(n_outputs), name=os.path.basename(p))
    except InvalidInputError as exc:
        raise InvalidInputError(f"{os.path.basename(p)}: {exc}") from None


def _term(coefs: np.ndarray, var: str) -> str:
    parts = []
    for j in np.flatnonzero(coefs):
        c = float(coefs[j])
        parts.append(f"{var}_{j}" if c == 1.0 else f"(* {c!r} {var}_{j})")
    if not parts:
        return "0.0"
    return parts[0] if len(parts) == 1 else "(+ " + " ".join(parts) + ")"


def write_vnnlib(spec: Spec, path) -> None:
    """Write ``spec`` (box input region, output disjunction) as a VNN-LIB 1.0 file at ``path``.

    Values are written with ``repr`` (shortest round-trip floats), so ``load_vnnlib`` gives the same
    box and polytopes back. An L1 ball has no VNN-LIB form without auxiliary variables and raises
    ``InvalidInputError``.
    """
    if spec.l1_center is not None:
        raise InvalidInputError("write_vnnlib supports box input regions only; got a spec with an L1 ball")
    lines = [f"; {spec.name or 'property'} written by mipprune", ""]
    lines += [f"(declare-const X_{i} Real)" for i in range(spec.n_inputs)]
    lines.append("")
    lines += [f"(declare-const Y_{j} Real)" for j in range(spec.n_outputs)]
    lines += ["", "; Input constraints:"]
    for i, (lo, hi) in enumerate(zip(spec.lower, spec.upper)):
        lines.append(f"(assert (<= X_{i} {float(hi)!r}))")
        lines.append(f"(assert (>= X_{i} {float(lo)!r}))")
    lines += ["", "; Output constraints (unsafe region):", "(assert (or"]
    for A, b in spec.disjuncts:
        atoms = " ".join(f"(<= {_term(row, 'Y')} {float(r)!r})" for row, r in zip(A, b))
        lines.append(f"    (and {atoms})")
    lines += ["))", ""]
    with open(os.fspath(path), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))


# ------------------------------------------------------------------------------ VNN-COMP result files
_RESULT_WORDS = {"falsified": "sat", "verified": "unsat", "timeout": "timeout", "unknown": "unknown"}


def result_word(verdict) -> str:
    """The VNN-COMP word for a :class:`~solvers.result.Verdict`: sat, unsat, timeout or unknown."""
    return _RESULT_WORDS[str(getattr(verdict, "value", verdict))]


def format_result(verdict, counterexample=None, output=None) -> str:
    """The text of a VNN-COMP result file.

    ``sat`` is followed by the assignment ``((X_0 v) … (Y_0 v) …)`` of the counterexample
    (n_inputs,) and its float64 output (n_outputs,); the other verdicts are one word.
    """
    word = result_word(verdict)
    if word != "sat":
        return word + "\n"
    if counterexample is None or output is None:
        raise InvalidInputError("a sat result needs the counterexample and its output; got None")
    pairs = [f"(X_{i} {float(v)!r})" for i, v in enumerate(np.ravel(counterexample))]
    pairs += [f"(Y_{j} {float(v)!r})" for j, v in enumerate(np.ravel(output))]
    return "sat\n(" + "\n ".join(pairs) + ")\n"


def write_result(path, verdict, counterexample=None, output=None) -> None:
    """Write :func:`format_result` to ``path``."""
    with open(os.fspath(path), "w", encoding="utf-8") as fh:
        fh.write(format_result(verdict, counterexample, output))


def read_result(path) -> tuple[str, np.ndarray | None, np.ndarray | None]:
    """Read a VNN-COMP result file: ``(word, x, y)`` with ``x``/``y`` for ``sat`` (else ``None``)."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise InvalidInputError(f"result file must exist; got {p!r} (not found)")
    with open(p, encoding="utf-8") as fh:
        text = fh.read()
    head, _, rest = text.strip().partition("\n")
    word = head.strip()
    if word not in ("sat", "unsat", "timeout", "unknown", "error"):
        raise InvalidInputError(f"line 1: result must be sat, unsat, timeout, unknown or error; got {word!r}")
    if word != "sat":
        return word, None, None
    vals: dict[str, dict[int, float]] = {"X": {}, "Y": {}}
    for m in re.finditer(r"\(\s*([XY])_(\d+)\s+([^\s()]+)\s*\)", rest):
        vals[m.group(1)][int(m.group(2))] = float(m.group(3))
    arrays = []
    for k in ("X", "Y"):
        d = vals[k]
        if not d or sorted(d) != list(range(len(d))):
            raise InvalidInputError(f"a sat result must assign {k}_0 … {k}_n consecutively; got {len(d)} values")
        arrays.append(np.array([d[i] for i in range(len(d))]))
    return word, arrays[0], arrays[1]
