"""Model versions in MODEL_DIR: every version kept, one of them served.

Layer L1 (files + torch through backend.classifier). Layout:

    MODEL_DIR/versions/<version>.pt   one file per version, written atomically, never overwritten
    MODEL_DIR/CURRENT                 the served version's name, replaced atomically

A retraining that crashes before `publish` returns leaves CURRENT and every old version as they
were; a reader never sees a half-written file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from backend.classifier import ModelCard, WaferClassifier, load_version, read_card, save_version

VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass
class ModelStore:
    """The model versions under one directory, with the served one cached in memory."""

    root: Path
    device: torch.device
    _loaded: WaferClassifier | None = field(default=None, init=False, repr=False)

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    def path_of(self, version: str) -> Path:
        if not VERSION_PATTERN.match(version):
            raise ValueError(f"not a usable model version name: {version!r}")
        return self.versions_dir / f"{version}.pt"

    def current_version(self) -> str | None:
        """The served version's name, or None before the first model is published."""
        try:
            name = (self.root / "CURRENT").read_text().strip()
        except FileNotFoundError:
            return None
        return name or None

    def versions(self) -> list[str]:
        """Every stored version, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        files = sorted(self.versions_dir.glob("*.pt"), key=lambda p: p.stat().st_mtime_ns)
        return [p.stem for p in files]

    def next_version(self, label: str) -> str:
        """A new version name: a running number plus a label (e.g. "v003-set2")."""
        return f"v{len(self.versions()) + 1:03d}-{label}"

    def publish(self, classifier: WaferClassifier) -> Path:
        """Store a new version and serve it. An existing version is never overwritten."""
        path = self.path_of(classifier.card.version)
        if path.exists():
            raise ValueError(f"model version {classifier.card.version} exists already")
        save_version(classifier, path)
        card = json.dumps(classifier.card.to_dict(), indent=1)
        _write_atomically(self.card_path_of(classifier.card.version), card)
        self._write_current(classifier.card.version)
        self._loaded = classifier
        return path

    def load_current(self) -> WaferClassifier | None:
        """The served classifier, read again only when CURRENT names another version."""
        version = self.current_version()
        if version is None:
            return None
        if self._loaded is None or self._loaded.card.version != version:
            self._loaded = load_version(self.path_of(version), self.device)
        return self._loaded

    def card_path_of(self, version: str) -> Path:
        """The card beside a version's weights (JSON, for reading without the weights)."""
        return self.path_of(version).with_suffix(".card.json")

    def card(self, version: str) -> ModelCard:
        """A stored version's card: from its JSON beside the weights, else from the weights."""
        try:
            return ModelCard.from_dict(json.loads(self.card_path_of(version).read_text()))
        except FileNotFoundError:
            return read_card(self.path_of(version))

    def current_card(self) -> ModelCard | None:
        """The served version's card without loading its network (None before any model)."""
        version = self.current_version()
        return None if version is None else self.card(version)

    def _write_current(self, version: str) -> None:
        _write_atomically(self.root / "CURRENT", version + "\n")


def _write_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
