"""Verify a VNN-LIB property on an ONNX network with the Python API (any VNN-COMP instance).

Run: ``python examples/verify_onnx.py MODEL.onnx PROPERTY.vnnlib [--timeout S]``, e.g.

    python examples/verify_onnx.py ../shared/benchmarks/vnncomp2022_mnist_fc/onnx/mnist-net_256x2.onnx \
        ../shared/benchmarks/vnncomp2022_mnist_fc/vnnlib/prop_0_0.03.vnnlib

Prints ``result: sat|unsat|timeout|unknown``; for ``sat`` the counterexample is re-checked here.
"""
from __future__ import annotations

import argparse

import numpy as np

import mipprune
import solvers
from solvers.network.vnnlib import result_word


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="ONNX file of a feed-forward ReLU network")
    ap.add_argument("property", help="VNN-LIB 1.0 property")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds for the whole query")
    args = ap.parse_args()

    # 1. The network as a float64 numpy IR, and the property as input box(es) + unsafe outputs.
    net = solvers.Network.from_onnx(args.model)
    specs = solvers.load_vnnlib(args.property, net.n_inputs, net.n_outputs)
    print(f"network: {net}")
    print(f"property: {len(specs)} input box(es), {len(specs[0].disjuncts)} unsafe disjunct(s)")

    # 2. Verify each input box (a property is violated iff some box has a counterexample).
    verdict = solvers.Verdict.VERIFIED
    for spec in specs:
        res = mipprune.verify(net, spec, time_limit=args.timeout)
        print(f"  box {spec.name}: {res.verdict.value} in {res.time:.2f} s, decided by {res.stage} "
              f"(MILP: {res.milp_binaries} binaries, {res.milp_nodes} nodes) - {res.message}")
        if res.verdict is solvers.Verdict.FALSIFIED:
            # 3. A counterexample is a plain input: check it yourself with the float64 forward.
            x = res.counterexample
            y = net.forward(x)
            assert spec.is_counterexample(net, x)
            print(f"  counterexample: inside the box, |x - centre|_inf = "
                  f"{np.abs(x - (spec.lower + spec.upper) / 2).max():.4f}, outputs {np.round(y, 3)}")
            verdict = res.verdict
            break
        if res.verdict is not solvers.Verdict.VERIFIED:
            verdict = res.verdict
    print(f"result: {result_word(verdict)}")


if __name__ == "__main__":
    main()
