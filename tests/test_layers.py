"""The house holds: three products apart, layers inside the served core, names in one place.

- The served core (`backend/*.py`, `backend/sources/`): the HTTP backend, the rq worker and the
  ops CLI. Inside it a module imports only from its own layer or below: L0 pure core (numpy +
  standard library), L1 one outside world each, L2 jobs, L3 entry points.
- `backend/study/` (the offline study) and `backend/harness/` (local tooling that drives the
  system from outside) import the core and never each other; the core never imports them,
  except `backend/cli.py`, which reaches them lazily (inside a function) for their commands.
- No two modules define the same public name, and a name is imported from the module that
  defines it (no re-exports).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

BACKEND = Path(__file__).resolve().parent.parent / "backend"
PRODUCTS = ("study", "harness")

LAYERS = {
    0: {
        "settings",
        "addresses",
        "label_config",
        "wafers",
        "encoding",
        "uncertainty",
        "routing",
        "calibration",
        "splits",
        "replay",
        "model_card",
        "files",
        "loop_state",
        "project_ids",
        "webhook_auth",
        "picture_structure",
        "audit",
    },
    1: {
        "classifier",
        "training",
        "pretraining",
        "sources",
        "model_store",
        "images",
        "image_client",
        "labelstudio",
        "loop_keys",
        "wafer_store",
        "label_snapshot",
        "allocator",
        "monitoring",
    },
    2: {
        "predictions",
        "wafer_sets",
        "jobs",
        "job_resources",
        "preannotation",
        "retraining",
        "reconcile",
        "first_model",
        "events",
        "projects",
        "set_audits",
        "label_reads",
    },
    3: {
        "cli",
        "cli_labelstudio",
        "cli_reconcile",
        "__main__",
        "app",
        "service",
        "wsgi_bridge",
        "http_worker",
    },
}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}
PURE_ALLOWED = {"numpy"} | set(sys.stdlib_module_names)
#: Names every entry-point module may define for itself.
PRIVATE_BY_CONVENTION = {"log", "main"}


def modules() -> list[Path]:
    return sorted(
        p for p in BACKEND.rglob("*.py") if p.name != "__init__.py" or p.parent != BACKEND
    )


def parts_of(path: Path) -> tuple[str, ...]:
    return path.relative_to(BACKEND).with_suffix("").parts


def product(path: Path) -> str:
    """'study', 'harness' or 'core'."""
    first = parts_of(path)[0]
    return first if first in PRODUCTS else "core"


def core_name(path: Path) -> str:
    return parts_of(path)[0]


def backend_imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported backend module, imported inside a function, line) for every import."""
    tree = ast.parse(path.read_text())
    nested: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            nested |= {id(n) for n in ast.walk(node) if n is not node}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif node.module and node.level == 0:
            names = [node.module]
            if node.module == "backend" or node.module.endswith((".study", ".harness")):
                names += [f"{node.module}.{alias.name}" for alias in node.names]
        found += [(name, id(node) in nested, node.lineno) for name in names]
    return found


def test_every_core_module_has_a_layer() -> None:
    core = {core_name(p) for p in modules() if product(p) == "core"}
    assert not core - set(LAYER_OF), f"give these modules a layer: {core - set(LAYER_OF)}"
    assert not set(LAYER_OF) - core, f"layers name modules that are gone: {set(LAYER_OF) - core}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(BACKEND)))
def test_imports_respect_products_and_layers(path: Path) -> None:
    mine = product(path)
    for name, lazy, line in backend_imports(path):
        parts = name.split(".")
        where = f"{path.relative_to(BACKEND)}:{line} imports {name}"
        if parts[0] != "backend" or len(parts) < 2:
            if mine == "core" and LAYER_OF[core_name(path)] == 0:
                assert parts[0] in PURE_ALLOWED, f"pure module: {where}"
            continue
        theirs = parts[1] if parts[1] in PRODUCTS else "core"
        if theirs != "core":
            if mine == "core":
                assert core_name(path) == "cli" and lazy, (
                    f"the served core never imports the {theirs} (only cli.py, lazily): {where}"
                )
            else:
                assert theirs == mine, f"the study and the harness stay apart: {where}"
        elif mine == "core":
            own, other = LAYER_OF[core_name(path)], LAYER_OF[parts[1]]
            assert other <= own, f"L{own} -> L{other}: {where}"


def test_no_two_modules_define_the_same_public_name() -> None:
    defined: dict[str, list[str]] = defaultdict(list)
    for path in modules():
        for name in top_level_names(ast.parse(path.read_text())):
            if not name.startswith("_") and name not in PRIVATE_BY_CONVENTION:
                defined[name].append(str(path.relative_to(BACKEND)))
    twice = {name: where for name, where in defined.items() if len(where) > 1}
    assert not twice, f"defined in more than one module: {twice}"


def top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def module_file(module: str) -> Path | None:
    if module == "backend":
        return BACKEND / "__init__.py"
    relative = Path(*module.split(".")[1:])
    for candidate in (BACKEND / relative.with_suffix(".py"), BACKEND / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


SOURCES = [*modules(), *sorted((BACKEND.parent / "tests").glob("*.py"))]
SOURCES += [BACKEND.parent / "model.py", BACKEND.parent / "_wsgi.py"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(BACKEND.parent)))
def test_names_are_imported_from_where_they_are_defined(path: Path) -> None:
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0):
            continue
        if not node.module.startswith("backend"):
            continue
        source = module_file(node.module)
        assert source is not None, f"{path.name}:{node.lineno}: no module {node.module}"
        defined = top_level_names(ast.parse(source.read_text()))
        for alias in node.names:
            submodule = module_file(f"{node.module}.{alias.name}")
            assert alias.name in defined or submodule is not None, (
                f"{path.name}:{node.lineno} imports {alias.name} from {node.module}, "
                "which does not define it: import it from where it is defined"
            )
