"""Model versions of one Label Studio project: every version kept, one of them served.

Layer L1 (files + torch through backend.classifier). Layout, one store per project:

    MODEL_DIR/projects/<id>/versions/<version>.pt          weights + card, written atomically
    MODEL_DIR/projects/<id>/versions/<version>.card.json   the card alone, for cheap listings
    MODEL_DIR/projects/<id>/CURRENT                         the served version's name

Versions, CURRENT and the card's "trained through" set therefore belong to one project: a project
never serves, or counts as learnt, another project's model.

A retraining that crashes (even killed) before `publish` returns leaves CURRENT and every old
version as they were; a reader never sees a half-written file. A CURRENT that cannot be served
(a damaged or missing weights file, garbage, a name that is not a version, a path, or anything
but a regular file: a FIFO, a device, a directory) is never trusted, and never read in a way
that could block: the store serves the newest readable version instead, logs the error once and
lists it in `problems()`. No file outside the store's directory is ever read, whatever CURRENT or a
symbolic link in `versions/` says.

Messages meant for HTTP callers (`problems()`, the errors of `card`) name versions, never paths.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from backend.classifier import WaferClassifier, load_version, read_card, save_version
from backend.files import NotARegularFileError, atomic_write_text, fsync_dir, read_regular_file
from backend.model_card import ModelCard

log = logging.getLogger(__name__)

VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_RUNNING_NUMBER = re.compile(r"^v(\d+)-")
_CURRENT_MAX_BYTES = 256
#: More than any card holds (its held-out scores included); read only as a regular file.
_CARD_MAX_BYTES = 256 * 2**20
# what a damaged or unsuitable weights file raises from torch.load / load_state_dict
_UNREADABLE = (OSError, ValueError, RuntimeError, KeyError, TypeError, EOFError)

_warned_legacy: set[Path] = set()
_warned_lock = threading.Lock()


@dataclass(frozen=True)
class _Unusable:
    """CURRENT exists but cannot be read as a version name: why (no path in it)."""

    reason: str


@dataclass
class _Served:
    """The outcome of looking at CURRENT and the weights files, for one state of the directory."""

    fingerprint: tuple[object, ...]
    classifier: WaferClassifier | None
    problems: tuple[str, ...]
    weights: tuple[int, int, int] | None = None  # the served weights file's identity


@dataclass
class ModelStore:
    """The model versions under one directory, with the served one cached in memory.

    Safe to share between threads; several processes may use the same directory (writes are
    atomic renames, and every reader notices a new CURRENT on its next call).
    """

    root: Path
    device: torch.device
    legacy_note: str | None = None
    _served: _Served | None = field(default=None, init=False, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False)

    @classmethod
    def for_project(cls, model_dir: Path, project: int, device: torch.device) -> ModelStore:
        """The store of one Label Studio project: MODEL_DIR/projects/<id>/ (each project its own
        versions, CURRENT and "trained through" state).

        Models stored before they were kept per project (MODEL_DIR/versions and MODEL_DIR/CURRENT)
        are never served to any project, since they may be another project's: a warning (logged
        once per process, and in `problems()`) says which project their card names and how to
        move them.
        """
        if isinstance(project, bool) or not isinstance(project, int) or project < 1:
            raise ValueError(f"not a Label Studio project id: {project!r}")
        model_dir = Path(model_dir)
        return cls(model_dir / "projects" / str(project), device, _legacy_note(model_dir))

    @staticmethod
    def projects(model_dir: Path) -> list[int]:
        """The ids of the projects with a store under MODEL_DIR/projects/, ascending."""
        base = Path(model_dir) / "projects"
        if not base.is_dir():
            return []
        ids = [int(p.name) for p in base.iterdir() if p.name.isdigit() and p.is_dir()]
        return sorted(i for i in ids if i >= 1)

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    def path_of(self, version: str) -> Path:
        """The weights file of a version; a name that is not a version name raises ValueError,
        as does a file that resolves (through a link) outside the store's directory."""
        if not isinstance(version, str) or not VERSION_PATTERN.match(version):
            raise ValueError(f"not a usable model version name: {version!r}")
        return self._inside(self.versions_dir / f"{version}.pt", version)

    def card_path_of(self, version: str) -> Path:
        """The card beside a version's weights (JSON, for reading without the weights)."""
        return self._inside(self.path_of(version).with_suffix(".card.json"), version)

    def versions(self) -> list[str]:
        """Every stored version, oldest first: by the running number of "vNNN-..." names, then by
        file time. Links leading out of the store and non-files are left out."""
        if not self.versions_dir.is_dir():
            return []
        found: list[tuple[int, int, str]] = []
        for p in self.versions_dir.glob("*.pt"):
            name = p.stem
            if not VERSION_PATTERN.match(name):
                continue
            try:
                path = self.path_of(name)
                if not path.is_file():
                    continue
                mtime = path.stat().st_mtime_ns
            except (ValueError, OSError):
                continue
            number = _RUNNING_NUMBER.match(name)
            found.append((int(number.group(1)) if number else -1, mtime, name))
        return [name for _, _, name in sorted(found)]

    def next_version(self, label: str) -> str:
        """A new version name: a running number plus a label (e.g. "v003-set2"), one past the
        highest number stored, so a deleted version never leads to a clash."""
        numbers = [int(m.group(1)) for v in self.versions() if (m := _RUNNING_NUMBER.match(v))]
        return f"v{max(numbers, default=0) + 1:03d}-{label}"

    def publish(self, classifier: WaferClassifier) -> Path:
        """Store a new version and serve it. An existing version is never overwritten (even by a
        second process publishing the same name at the same moment)."""
        version = classifier.card.version
        path = self.path_of(version)
        if path.exists():
            raise ValueError(f"model version {version} exists already")
        staging = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.staging")
        try:
            save_version(classifier, staging)
            try:
                os.link(staging, path)  # fails if the name was taken meanwhile
            except FileExistsError:
                raise ValueError(f"model version {version} exists already") from None
            except OSError:  # a file system without hard links
                if path.exists():
                    raise ValueError(f"model version {version} exists already") from None
                staging.replace(path)
        finally:
            staging.unlink(missing_ok=True)
        fsync_dir(path.parent)
        card = json.dumps(classifier.card.to_dict(), indent=1)
        atomic_write_text(self.card_path_of(version), card)
        atomic_write_text(self.root / "CURRENT", version + "\n")
        with self._lock:
            self._served = _Served(self._fingerprint(), classifier, (), _stat_key(path))
        log.info("model version %s published and served", version)
        return path

    def current_version(self) -> str | None:
        """The served version's name: CURRENT's, or the newest readable version when CURRENT
        cannot be served; None before the first model is published (or when no version is
        readable)."""
        classifier = self.load_current()
        return None if classifier is None else classifier.card.version

    def load_current(self) -> WaferClassifier | None:
        """The served classifier, read again only when CURRENT or a weights file changed."""
        return self._resolve().classifier

    def current_card(self) -> ModelCard | None:
        """The served version's card (None before any model)."""
        classifier = self.load_current()
        return None if classifier is None else classifier.card

    def problems(self) -> list[str]:
        """Short descriptions of what is wrong with this store (for /health): a CURRENT that
        cannot be served, models left in the layout from before per-project stores. Empty when
        all is well. Loads the served version if it is not loaded yet (once per publish)."""
        found = list(self._resolve().problems)
        if self.legacy_note is not None:
            found.append(self.legacy_note)
        return found

    def card(self, version: str) -> ModelCard:
        """A stored version's card: from its JSON beside the weights, else from the weights.

        Raises ValueError (naming the version, not the path) when neither is readable, so a
        damaged card (`{}`, invalid JSON) never breaks a listing of versions.
        """
        path = self.card_path_of(version)
        try:
            return _card_from_json(read_regular_file(path, _CARD_MAX_BYTES))
        except FileNotFoundError:
            pass  # versions written before the JSON card existed
        except (OSError, ValueError) as exc:
            log.warning(
                "the card of model version %s is unreadable (%s); reading it from the weights",
                version,
                exc,
            )
        try:
            return read_card(self.path_of(version))
        except FileNotFoundError:
            raise ValueError(f"model version {version} does not exist") from None
        except _UNREADABLE as exc:
            log.error("model version %s: %s", version, exc)
            raise ValueError(
                f"model version {version} is unreadable (damaged card and weights)"
            ) from None

    # ---- internals ------------------------------------------------------------------------

    def _inside(self, path: Path, version: str) -> Path:
        """`path` if it resolves (following links) to a place under the store's directory."""
        root = self.root.resolve()
        if not path.resolve().is_relative_to(root):
            raise ValueError(f"model version {version} leads outside the model directory")
        return path

    def _fingerprint(self) -> tuple[object, ...]:
        """What the served version depends on: CURRENT's bytes and every weights file's identity."""
        files: list[tuple[str, int, int, int]] = []
        if self.versions_dir.is_dir():
            for p in self.versions_dir.glob("*.pt"):
                try:
                    st = p.stat()
                except OSError:
                    continue
                files.append((p.name, st.st_ino, st.st_size, st.st_mtime_ns))
        return (self._read_current(), tuple(sorted(files)))

    def _read_current(self) -> bytes | _Unusable | None:
        """CURRENT's first bytes; None when there is none; `_Unusable` for anything but a
        regular file (a FIFO would block the reader, holding the store's lock, for good)."""
        current = self.root / "CURRENT"
        if current.is_symlink() and not current.resolve().is_relative_to(self.root.resolve()):
            return b"<a link leading outside the model directory>"
        try:
            return read_regular_file(current, _CURRENT_MAX_BYTES)
        except FileNotFoundError:
            return None
        except NotARegularFileError as exc:
            return _Unusable(str(exc).removeprefix("CURRENT "))
        except OSError as exc:
            return f"<unreadable: {type(exc).__name__}>".encode()

    def _resolve(self) -> _Served:
        with self._lock:
            fingerprint = self._fingerprint()
            if self._served is not None and self._served.fingerprint == fingerprint:
                return self._served
            self._served = self._choose(fingerprint, self._served)
            return self._served

    def _choose(self, fingerprint: tuple[object, ...], before: _Served | None) -> _Served:
        raw = fingerprint[0]
        if raw is None:
            return _Served(fingerprint, None, ())
        problems: list[str] = []
        named = self._current_name(raw) if isinstance(raw, bytes) else None
        if isinstance(raw, _Unusable):
            log.error("%s/CURRENT %s: not read", self.root, raw.reason)
            problems.append(f"CURRENT {raw.reason}")
        elif not isinstance(raw, bytes):
            raise TypeError(f"CURRENT read as {type(raw).__name__}")
        elif named is None:
            log.error("%s/CURRENT does not hold a model version name: %r", self.root, raw[:80])
            problems.append("CURRENT does not name a model version")
        else:
            loaded = self._try_load(named, before)
            if isinstance(loaded, WaferClassifier):
                return _Served(fingerprint, loaded, (), _stat_key(self.path_of(named)))
            problems.append(f"model version {named} named in CURRENT {loaded}")
        for version in reversed(self.versions()):
            if version == named:
                continue
            loaded = self._try_load(version, before)
            if isinstance(loaded, WaferClassifier):
                problems[-1] += f"; serving {version} instead"
                log.error("%s (model directory %s)", problems[-1], self.root)
                weights = _stat_key(self.path_of(version))
                return _Served(fingerprint, loaded, tuple(problems), weights)
        problems[-1] += "; no other version is readable, so no model is served"
        log.error("%s (model directory %s)", problems[-1], self.root)
        return _Served(fingerprint, None, tuple(problems))

    def _current_name(self, raw: bytes) -> str | None:
        try:
            name = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            return None
        if len(raw) > _CURRENT_MAX_BYTES or not VERSION_PATTERN.match(name):
            return None
        return name

    def _try_load(self, version: str, before: _Served | None) -> WaferClassifier | str:
        """The version's classifier, or why it cannot be served (a short text without paths)."""
        try:
            path = self.path_of(version)
        except ValueError:
            return "leads outside the model directory"
        if not path.is_file():
            return "does not exist"
        if (
            before is not None
            and before.classifier is not None
            and before.classifier.card.version == version
            and before.weights == _stat_key(path)
        ):
            return before.classifier  # the same file as loaded before: no need to read it again
        try:
            classifier = load_version(path, self.device)
        except _UNREADABLE as exc:
            log.error("model version %s cannot be loaded: %s", version, exc)
            return "is unreadable (damaged weights file)"
        if classifier.card.version != version:
            return f"holds another version ({classifier.card.version})"
        return classifier


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _card_from_json(data: bytes) -> ModelCard:
    """A card from its JSON; ValueError for invalid JSON or JSON that is not a card."""
    parsed = json.loads(data)
    if not isinstance(parsed, dict):
        raise ValueError(f"a JSON {type(parsed).__name__}, not a card")
    try:
        return ModelCard.from_dict(parsed)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a model card ({type(exc).__name__}: {exc})") from None


def _legacy_note(model_dir: Path) -> str | None:
    """A note for the operator when MODEL_DIR still has the single-project layout."""
    legacy = [p.name for p in (model_dir / "versions", model_dir / "CURRENT") if p.exists()]
    if not legacy:
        return None
    owner = "<project id>"
    try:
        raw = read_regular_file(model_dir / "CURRENT", _CURRENT_MAX_BYTES)
        name = raw.decode(errors="replace").strip()
        if VERSION_PATTERN.match(name):
            card_path = model_dir / "versions" / f"{name}.card.json"
            card = _card_from_json(read_regular_file(card_path, _CARD_MAX_BYTES))
            if card.project is not None:
                owner = str(card.project)
    except (OSError, ValueError):
        pass
    note = (
        f"models from before per-project storage ({' and '.join(legacy)} at the top of "
        f"MODEL_DIR) are not served; move them to their project: mkdir -p "
        f"MODEL_DIR/projects/{owner} && mv MODEL_DIR/versions MODEL_DIR/CURRENT "
        f"MODEL_DIR/projects/{owner}/"
    )
    with _warned_lock:
        if model_dir not in _warned_legacy:
            _warned_legacy.add(model_dir)
            log.warning("%s (MODEL_DIR is %s)", note, model_dir)
    return note
