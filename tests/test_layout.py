"""The architecture's dependency rules (DESIGN.md, "Layout"), read from the import statements.

Every ``import`` / ``from … import`` statement counts, at module level or inside a function (a lazy
import is still a dependency): ``solvers`` imports neither torch nor mipprune; the training, data
and model helpers import nothing of pruning, verification, experiment or cli; arrows run from cli →
experiment → pruning/verification → solvers, never back; and no two modules import each other,
directly or through others.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("solvers", "mipprune")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


MODULES = _modules()


def imports_of(name: str) -> set[str]:
    """Absolute names imported by module ``name`` (``from a import b`` gives ``a.b`` when that is a
    module of ours, else ``a``)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in MODULES else base)
    return out


def test_the_tree_has_the_designed_subsystems():
    for folder in ("solvers/selection", "solvers/network", "mipprune/pruning", "mipprune/verification",
                   "mipprune/experiment", "mipprune/cli"):
        assert (REPO / folder / "__init__.py").is_file(), f"{folder} must be a package"
    for module in ("solvers.selection.exact", "solvers.network.ir", "solvers.network.onnx", "solvers.milp",
                   "mipprune.pruning.selector", "mipprune.verification.verify", "mipprune.experiment.run"):
        assert module in MODULES, f"{module} is missing"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.split(".")[0] == "solvers"))
def test_solvers_imports_neither_torch_nor_mipprune(name):
    bad = sorted(i for i in imports_of(name) if i.split(".")[0] in ("torch", "mipprune"))
    assert not bad, f"{name} imports {bad}; solvers must stay torch-free and below mipprune"


BASE_MODULES = ("mipprune.train", "mipprune.data", "mipprune.models", "mipprune.torch_utils")
# a subsystem may import only itself, the base helpers and the layers below it
ALLOWED_BELOW = {
    "mipprune.pruning": ("mipprune.pruning",),
    "mipprune.verification": ("mipprune.verification",),
    "mipprune.experiment": ("mipprune.experiment", "mipprune.pruning", "mipprune.verification"),
}


@pytest.mark.parametrize("name", BASE_MODULES)
def test_training_data_and_model_helpers_import_no_subsystem(name):
    bad = sorted(i for i in imports_of(name)
                 if i.startswith(("mipprune.pruning", "mipprune.verification", "mipprune.experiment", "mipprune.cli")))
    assert not bad, f"{name} imports {bad}; it must depend on nothing but torch, solvers and the base helpers"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith(tuple(ALLOWED_BELOW))))
def test_arrows_run_from_cli_to_experiment_to_pruning_and_verification_never_back(name):
    subsystem = ".".join(name.split(".")[:2])
    allowed = ALLOWED_BELOW[subsystem] + BASE_MODULES + ("mipprune",)
    bad = sorted(i for i in imports_of(name) if i.startswith("mipprune")
                 and not any(i == a or i.startswith(a + ".") for a in allowed))
    assert not bad, f"{name} ({subsystem}) imports {bad}"


def test_no_import_cycles():
    graph = {n: sorted(i for i in imports_of(n) if i in MODULES and i != n) for n in MODULES}
    state: dict[str, int] = {}   # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in graph[n]:
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            pytest.fail("import cycle: " + " -> ".join(cycle))
