"""The architecture holds: a module imports only from its own layer or below.

L0 pure core (numpy + standard library), L1 one outside world each, L2 jobs, L3 entry points.
"""

import ast
import sys
from pathlib import Path

import pytest

BACKEND = Path(__file__).resolve().parent.parent / "backend"

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
        "metrics",
        "report",
        "replay",
        "temperature",
        "novelty",
        "symmetric_views",
        "class_errors",
        "routing_methods",
    },
    1: {
        "classifier",
        "training",
        "sources",
        "plots",
        "model_store",
        "images",
        "image_client",
        "browser",
        "processes",
        "labelstudio",
        "label_studio_db",
        "stack",
        "loop_keys",
        "loop_state",
        "wafer_store",
    },
    2: {
        "study",
        "routing_study",
        "size_benchmark",
        "predictions",
        "wafer_sets",
        "jobs",
        "workbench",
        "preannotation",
        "retraining",
        "reconcile",
        "first_model",
        "events",
        "ops",
        "engineers",
    },
    3: {
        "cli",
        "cli_labelstudio",
        "cli_reconcile",
        "__main__",
        "app",
        "service",
        "demo",
        "screenshots",
        "load_test",
        "bench",
        "bench_loop",
    },
}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}
PURE_ALLOWED = {"numpy"} | set(sys.stdlib_module_names)


def modules() -> list[Path]:
    return sorted(
        p for p in BACKEND.rglob("*.py") if p.name != "__init__.py" or p.parent != BACKEND
    )


def top_name(path: Path) -> str:
    return path.relative_to(BACKEND).parts[0].removesuffix(".py")


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "backend":
                found |= {f"backend.{alias.name}" for alias in node.names}
    return found


def test_every_module_has_a_layer() -> None:
    missing = {top_name(p) for p in modules()} - set(LAYER_OF)
    assert not missing, f"give these modules a layer in tests/test_layers.py: {missing}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(BACKEND)))
def test_imports_point_down(path: Path) -> None:
    own = LAYER_OF[top_name(path)]
    for name in imports(path):
        parts = name.split(".")
        if parts[0] == "backend" and len(parts) > 1:
            assert LAYER_OF[parts[1]] <= own, (
                f"{path.name} (L{own}) imports {name} (L{LAYER_OF[parts[1]]})"
            )
        elif own == 0:
            assert parts[0] in PURE_ALLOWED, f"pure module {path.name} imports {name}"
