"""The house's layout holds: no import circle, components used through their faces, errors at the
bottom, benchmarks independent of the tests. Every import counts, also those inside functions
(a lazy import hides a loop; it does not remove it), and so do the faces' lazy name tables."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from launching import REPO

PACKAGE = REPO / "accel_trainer"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(importer: str, level: int, module: str | None) -> str:
    is_package = MODULES[importer].name == "__init__.py"
    base = importer.split(".")
    base = base if is_package else base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _all_nodes(tree):
    """Every node, those under ``if TYPE_CHECKING:`` included: a type-only import back to a module
    that imports this one is a circle in the design, even if Python never executes it."""
    return ast.walk(tree)


def imports_of(name: str) -> set[str]:
    """Modules of the package that ``name`` imports, anywhere in its text."""
    found = set()
    tree = ast.parse(MODULES[name].read_text())
    for node in _all_nodes(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(name, node.level, node.module) if node.level else node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_WHERE" for t in node.targets):
            # a face's lazy table: name -> ".submodule"
            targets = [resolve(name, 1, v.value[1:]) for v in node.value.values
                       if isinstance(v, ast.Constant) and str(v.value).startswith(".")]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]  # accel_trainer.x.name -> accel_trainer.x
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def test_the_package_has_no_import_cycle():
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            # A package imports its own submodules (its face) and a submodule sees its package's
            # __init__ only through the face's names: that pair is the package, not a loop.
            if nxt.startswith(node + ".") and MODULES[node].name == "__init__.py":
                continue
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def _outside_imports_of(component: str) -> dict[str, set[str]]:
    """What modules outside ``component`` import of it, by importer."""
    return {name: {t for t in targets if t == component or t.startswith(component + ".")}
            for name, targets in GRAPH.items() if not (name == component or name.startswith(component + "."))}


FOLDERS = sorted(name for name, path in MODULES.items() if path.name == "__init__.py" and name != "accel_trainer")


def test_there_are_component_folders_to_check():
    assert {"accel_trainer.checkpoint", "accel_trainer.data", "accel_trainer.models"} <= set(FOLDERS)


@pytest.mark.parametrize("folder", FOLDERS)
def test_code_outside_a_folder_imports_only_its_face(folder):
    reach_ins = {name: sorted(t for t in targets if t != folder)
                 for name, targets in _outside_imports_of(folder).items()}
    assert {k: v for k, v in reach_ins.items() if v} == {}


def test_our_moe_classes_are_named_only_inside_models_and_the_package_face():
    """A new family is a folder and a registration: nothing else names a family's classes."""
    outside = [p for p in PACKAGE.rglob("*.py") if PACKAGE / "models" not in p.parents and p != PACKAGE / "__init__.py"]
    named = [f"{p.relative_to(REPO)}:{i}" for p in outside for i, line in enumerate(p.read_text().splitlines(), 1)
             if "MoEForCausalLM" in line or "MoEConfig" in line or "MoEFeedForward" in line]
    assert named == []


def test_ruff_is_clean():
    """The linter configured in pyproject.toml ([tool.ruff]) finds nothing, in every folder."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--quiet", "."], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_the_checkpoint_component_imports_only_the_bottom_of_the_house():
    allowed = ("accel_trainer.checkpoint", "accel_trainer.errors", "accel_trainer.lazy", "accel_trainer.secrets")
    for name, targets in GRAPH.items():
        if name.startswith("accel_trainer.checkpoint"):
            assert {t for t in targets if not t.startswith(allowed)} == set(), name


def test_errors_are_the_bottom_of_the_house():
    assert GRAPH["accel_trainer.errors"] == set() and GRAPH["accel_trainer.secrets"] == set()
    from accel_trainer import errors
    from accel_trainer.checkpoint import CheckpointError
    from accel_trainer.config import ConfigError
    from accel_trainer.data import DataError, TokenizerError

    for cls in (CheckpointError, ConfigError, DataError, TokenizerError):
        assert issubclass(cls, errors.InputError) and cls.__module__ == "accel_trainer.errors", cls


def test_benchmarks_import_nothing_from_the_tests():
    test_modules = {p.stem for p in (REPO / "tests").rglob("*.py")}
    for script in sorted((REPO / "benchmarks").glob("*.py")):
        text = script.read_text()
        assert '"tests"' not in text and "'tests'" not in text, f"{script.name} reaches into tests/"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not {n.split(".")[0] for n in names} & test_modules, f"{script.name} imports {names}"


def test_every_face_name_resolves():
    import importlib

    for module in [importlib.import_module(name) for name in ["accel_trainer", *FOLDERS]]:
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"
