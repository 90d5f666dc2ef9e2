"""Settings: every environment variable the project reads, read once, in one place.

Layer L0. Entry points call `Settings.from_env(os.environ)` and pass the object down; command-line
flags override single fields with `dataclasses.replace`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from backend.label_config import DEFAULT_LABEL_CONFIG

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "wm811k" / "LSWMD.zip"
BACKBONES = ("resnet50", "resnet18")
DEVICES = ("auto", "cpu", "cuda")

#: Environment variable -> what it sets (printed by `python -m backend settings`, kept in README).
ENVIRONMENT = {
    "WAFER_DATA": "wafer-map file: LSWMD.pkl, LSWMD.zip or .npz (default ../shared/data/wm811k/LSWMD.zip)",
    "WAFER_CACHE_DIR": "where converted wafer data is cached (default ~/.cache/wafermap-labeling)",
    "LABEL_CONFIG": "Label Studio labeling config holding the failure types (default label_config.xml)",
    "WAFER_IMAGE_SIZE": "model input size S in pixels (default 64)",
    "WAFER_BACKBONE": "resnet50 (default) or resnet18",
    "WAFER_DEVICE": "auto (default: cuda when available), cpu or cuda",
    "WAFER_WEIGHTS": "optional local weights file to start the backbone from",
    "MODEL_DIR": "where model versions are written (default ./models)",
}


def _default_cache(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME", "~")) / ".cache")
    return Path(base).expanduser() / "wafermap-labeling"


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    text = environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None


def _choice(environ: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = environ.get(name) or default
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """What the engine needs to know about its surroundings."""

    data_path: Path = DEFAULT_DATA
    cache_dir: Path = field(default_factory=lambda: _default_cache({}))
    label_config_path: Path = DEFAULT_LABEL_CONFIG
    image_size: int = 64
    backbone: str = "resnet50"
    device: str = "auto"
    weights_path: Path | None = None
    model_dir: Path = REPO_ROOT / "models"

    def __post_init__(self) -> None:
        if not 8 <= self.image_size <= 512:
            raise ValueError(f"image size must be within 8..512 pixels, got {self.image_size}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Build settings from environment variables (see ENVIRONMENT); unset ones keep defaults."""
        weights = environ.get("WAFER_WEIGHTS")
        return cls(
            data_path=Path(environ.get("WAFER_DATA") or DEFAULT_DATA).expanduser(),
            cache_dir=Path(environ["WAFER_CACHE_DIR"]).expanduser()
            if environ.get("WAFER_CACHE_DIR")
            else _default_cache(environ),
            label_config_path=Path(environ.get("LABEL_CONFIG") or DEFAULT_LABEL_CONFIG),
            image_size=_int(environ, "WAFER_IMAGE_SIZE", 64),
            backbone=_choice(environ, "WAFER_BACKBONE", "resnet50", BACKBONES),
            device=_choice(environ, "WAFER_DEVICE", "auto", DEVICES),
            weights_path=Path(weights).expanduser() if weights else None,
            model_dir=Path(environ.get("MODEL_DIR") or REPO_ROOT / "models").expanduser(),
        )
