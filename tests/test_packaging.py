"""The Docker image and the two requirement files hold what the served system runs, and only that.

The served system is the HTTP backend (`_wsgi.py`, `model.py`), the rq worker (`backend.jobs`) and
the ops CLI (`python -m backend`). Its modules are found by following imports with `ast` from those
entry points; the CLI's function-level imports of the offline study (`backend.study`) and the local
tooling (`backend.harness`) are its lazy commands and are not followed. Imports under
`if TYPE_CHECKING:` never run and are not followed either. No network, no Docker daemon: the
Dockerfile's COPY lines and .dockerignore are applied to the checkout here.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = ("_wsgi", "model", "backend.jobs", "backend.cli", "backend.__main__")
# Files the served system reads or its commands load without importing them.
DATA_FILES = ("label_config.xml", "gunicorn.conf.py")
NOT_SERVED = ("backend.study", "backend.harness")
OWN_TOP_LEVEL = frozenset({"backend", "model", "_wsgi", "__future__"})
# Pinned in requirements.txt for a command the image runs, not for an import.
COMMANDS = frozenset({"gunicorn"})
PIN = re.compile(r"(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)==(?P<version>\S+)")
DOTTED_BACKEND = re.compile(r"backend(?:\.[A-Za-z_]\w*)+")


def normalize(distribution: str) -> str:
    """PEP 503's normal form of a distribution name (`Pillow`, `pillow` -> `pillow`)."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


# --- requirement files ------------------------------------------------------------------------


def requirement_lines(name: str) -> list[str]:
    """The lines of a requirement file that say something: comments and blank lines dropped."""
    lines = []
    for raw in (ROOT / name).read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def pins(name: str) -> dict[str, str]:
    """Normalized distribution name -> pinned version, for the `==` lines of one file."""
    found: dict[str, str] = {}
    for line in requirement_lines(name):
        match = PIN.fullmatch(line)
        if match:
            found[normalize(match["name"])] = match["version"]
    return found


@pytest.mark.parametrize("name", ["requirements.txt", "requirements-dev.txt"])
def test_every_requirement_is_pinned_once(name: str) -> None:
    lines = requirement_lines(name)
    includes = ["-r requirements.txt"] if name == "requirements-dev.txt" else []
    assert lines[: len(includes)] == includes, f"{name} must start with {includes}"
    names: list[str] = []
    for line in lines[len(includes) :]:
        match = PIN.fullmatch(line)
        assert match, f"{name}: {line!r} is not pinned with == (name==version)"
        names.append(normalize(match["name"]))
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f"{name} pins {duplicates} more than once"


def test_no_package_is_pinned_in_both_files() -> None:
    both = sorted(pins("requirements.txt").keys() & pins("requirements-dev.txt").keys())
    assert not both, f"pinned in requirements.txt and again in requirements-dev.txt: {both}"


def test_this_environment_has_the_pinned_versions() -> None:
    wrong = {}
    for name in ("requirements.txt", "requirements-dev.txt"):
        for distribution, version in pins(name).items():
            try:
                installed = metadata.version(distribution)
            except metadata.PackageNotFoundError:
                installed = "not installed"
            if installed != version:
                wrong[distribution] = f"{name} pins {version}, .venv has {installed}"
    assert not wrong, f"run scripts/install: {wrong}"


# --- the served system's modules --------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One imported module name, as written in `importer` (a dotted module name)."""

    module: str
    importer: str
    in_function: bool


def module_file(module: str) -> Path | None:
    """The file of a project module (`backend.sources` -> backend/sources/__init__.py)."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_nodes(node: ast.AST, in_function: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Every node below `node` that can run, with whether it sits inside a function."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and is_type_checking(child.test):
            for other in child.orelse:
                yield other, in_function
                yield from runtime_nodes(other, in_function)
            continue
        inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
        yield child, in_function
        yield from runtime_nodes(child, inside)


def imports_of(module: str) -> list[Import]:
    """What `module` imports when it runs, plus the `backend.*` dotted names it spells out
    (rq enqueues job functions by such a name, and the worker imports it)."""
    path = module_file(module)
    assert path is not None, module
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []
    for node, in_function in runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, module, in_function) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.append(Import(base, module, in_function))
            for alias in node.names:  # `from backend import jobs`: a submodule, if one exists
                if module_file(f"{base}.{alias.name}") is not None:
                    found.append(Import(f"{base}.{alias.name}", module, in_function))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and DOTTED_BACKEND.fullmatch(node.value)
        ):
            parts = node.value.split(".")
            named = [".".join(parts[:end]) for end in range(len(parts), 1, -1)]
            resolved = [name for name in named if module_file(name) is not None]
            assert resolved, f"{module} names {node.value!r}: no module of this checkout"
            found.append(Import(resolved[0], module, in_function))
    return found


def is_lazy_command(item: Import) -> bool:
    """The CLI's function-level imports of the study and the tooling: not the served system."""
    return (
        item.importer == "backend.cli"
        and item.in_function
        and any(item.module == p or item.module.startswith(p + ".") for p in NOT_SERVED)
    )


@functools.cache
def served_modules() -> dict[str, list[Import]]:
    """Every project module the served system runs -> what it imports (lazy commands left out)."""
    closure: dict[str, list[Import]] = {}
    todo = list(ENTRY_POINTS)
    while todo:
        module = todo.pop()
        if module in closure:
            continue
        assert module_file(module) is not None, f"the served system imports {module}: no such file"
        closure[module] = [item for item in imports_of(module) if not is_lazy_command(item)]
        parts = module.split(".")
        todo += [".".join(parts[:end]) for end in range(1, len(parts))]  # parent packages run too
        for item in closure[module]:
            if item.module.split(".")[0] in OWN_TOP_LEVEL - {"__future__"}:
                assert module_file(item.module) is not None, (
                    f"{module} imports {item.module}, which is no module of this checkout"
                )
                todo.append(item.module)
    return closure


def relative_file(module: str) -> str:
    path = module_file(module)
    assert path is not None, module
    return path.relative_to(ROOT).as_posix()


def test_the_served_system_never_reaches_the_study_or_the_tooling() -> None:
    reached = {
        f"{item.importer} -> {item.module}"
        for imports in served_modules().values()
        for item in imports
        if any(item.module == p or item.module.startswith(p + ".") for p in NOT_SERVED)
    }
    assert not reached, f"served modules import the study or the tooling: {sorted(reached)}"
    assert "backend.cli_labelstudio" in served_modules(), "the CLI's ops commands were not followed"


# --- the Docker image -------------------------------------------------------------------------


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """A Docker path pattern (.dockerignore, COPY sources) as a regex over slash paths:
    `*` and `?` stay within one path element, `**` spans any number of them."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


@functools.cache
def dockerignore() -> tuple[tuple[re.Pattern[str], bool], ...]:
    """(pattern, excludes) in file order; a `!` line takes an earlier exclusion back."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        excludes = not line.startswith("!")
        cleaned = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((pattern_regex(cleaned), excludes))
    return tuple(rules)


def ignored(path: str) -> bool:
    """Docker's rule: a path is out when the last pattern matching it or a parent excludes it."""
    parts = path.split("/")
    candidates = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
    out = False
    for regex, excludes in dockerignore():
        if any(regex.fullmatch(candidate) for candidate in candidates):
            out = excludes
    return out


@functools.cache
def build_context() -> frozenset[str]:
    """The files `docker build .` sends: the checkout less .dockerignore (slash paths)."""
    files = set()
    for folder, folders, names in os.walk(ROOT):
        relative = Path(folder).relative_to(ROOT).as_posix()
        prefix = "" if relative == "." else relative + "/"
        if all(excludes for _, excludes in dockerignore()):  # a `!` may take a file back out
            folders[:] = [f for f in folders if not ignored(prefix + f)]
        files |= {prefix + n for n in names if not ignored(prefix + n)}
    return frozenset(files)


def dockerfile_instructions() -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    logical = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        instruction, _, arguments = logical.partition(" ")
        yield instruction.upper(), arguments.strip()
        logical = ""


@dataclass(frozen=True)
class Copy:
    sources: tuple[str, ...]
    destination: PurePosixPath  # absolute, in the image
    directory: bool  # the destination is a folder (ends with / or several sources)


def dockerfile_copies() -> list[Copy]:
    copies = []
    workdir = PurePosixPath("/")
    for instruction, arguments in dockerfile_instructions():
        if instruction == "WORKDIR":
            workdir = workdir / arguments
        elif instruction in ("COPY", "ADD"):
            words = shlex.split(arguments)
            assert not any(w.startswith("--from") for w in words), "multi-stage: extend this test"
            *sources, destination = [w for w in words if not w.startswith("--")]
            copies.append(
                Copy(
                    tuple(sources),
                    workdir / destination,
                    destination.endswith("/") or len(sources) > 1,
                )
            )
    return copies


def copied_by(copy: Copy, source: str) -> dict[str, str]:
    """Context file -> absolute image path, for one source of a COPY line."""
    regex = pattern_regex(os.path.normpath(source))
    placed = {}
    for file in build_context():
        parts = file.split("/")
        if regex.fullmatch(file):  # a file itself: into the folder, or as the destination
            directory = copy.directory or any(c in source for c in "*?")
            target = copy.destination / parts[-1] if directory else copy.destination
            placed[file] = target.as_posix()
            continue
        for end in range(1, len(parts)):  # inside a matched folder: its contents are copied
            if regex.fullmatch("/".join(parts[:end])):
                placed[file] = (copy.destination / "/".join(parts[end:])).as_posix()
                break
    return placed


@functools.cache
def image_files() -> dict[str, str]:
    """Context file (slash path in the checkout) -> where the image holds it."""
    files: dict[str, str] = {}
    for copy in dockerfile_copies():
        for source in copy.sources:
            files |= copied_by(copy, source)
    return files


def app_files() -> set[str]:
    """The image's files under WORKDIR /app (where gunicorn, rq and python -m start), relative."""
    return {
        PurePosixPath(target).relative_to("/app").as_posix()
        for target in image_files().values()
        if PurePosixPath(target).is_relative_to("/app")
    }


def test_the_build_context_leaves_out_the_big_folders() -> None:
    for folder in (".git", ".venv", "runs", "models", "backend/study", "backend/harness"):
        assert ignored(folder), f".dockerignore must leave {folder} out of the build context"


def test_every_copied_path_exists() -> None:
    copies = dockerfile_copies()
    assert copies, "the Dockerfile copies nothing"
    for copy in copies:
        for source in copy.sources:
            assert copied_by(copy, source), (
                f"COPY {source}: nothing in the build context (missing, or in .dockerignore)"
            )


def test_the_image_holds_every_served_module_and_nothing_else_of_backend() -> None:
    in_image = app_files()
    needed = {relative_file(module) for module in served_modules()} | set(DATA_FILES)
    missing = sorted(needed - in_image)
    assert not missing, (
        f"the served system needs these, the Dockerfile does not copy them: {missing}"
    )
    not_served = sorted(
        file
        for file in in_image
        for package in NOT_SERVED
        if file.startswith(package.replace(".", "/") + "/")
    )
    assert not not_served, f"the image holds the study or the tooling: {not_served}"
    for file in ("requirements-dev.txt", "requirements.txt"):
        assert (file in image_files()) == (file == "requirements.txt"), file
    assert not any(file.startswith("tests/") for file in image_files()), "tests in the image"


def test_the_image_installs_requirements_txt_only() -> None:
    runs = " ".join(
        arguments for instruction, arguments in dockerfile_instructions() if instruction == "RUN"
    )
    assert re.findall(r"-r\s+(\S+)", runs) == ["requirements.txt"]
    commands = [
        arguments for instruction, arguments in dockerfile_instructions() if instruction == "CMD"
    ]
    assert commands and all(c in commands[-1] for c in COMMANDS), commands


# --- the served system's third-party imports ---------------------------------------------------


def third_party_imports() -> dict[str, set[str]]:
    """Top-level import name -> the served modules importing it (top- and function-level)."""
    found: dict[str, set[str]] = {}
    for module, imports in served_modules().items():
        for item in imports:
            top = item.module.split(".")[0]
            if top and top not in OWN_TOP_LEVEL and top not in sys.stdlib_module_names:
                found.setdefault(top, set()).add(module)
    return found


def test_the_served_system_imports_what_requirements_txt_pins() -> None:
    runtime = pins("requirements.txt")
    provider = metadata.packages_distributions()
    unpinned = {}
    used = set()
    for name, importers in sorted(third_party_imports().items()):
        distributions = {normalize(d) for d in provider.get(name, [])}
        assert distributions, f"{name} (imported by {sorted(importers)}) is not installed"
        used |= distributions & runtime.keys()
        if not distributions & runtime.keys():
            unpinned[name] = (
                f"distribution {sorted(distributions)}, imported by {sorted(importers)}"
            )
    assert not unpinned, f"served imports that requirements.txt does not pin: {unpinned}"
    unused = sorted(runtime.keys() - used - COMMANDS)
    assert not unused, f"requirements.txt pins what the served system never imports: {unused}"
