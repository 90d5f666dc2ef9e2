"""Settings: every environment variable the project reads, read once, in one place.

Layer L0. Entry points call `Settings.from_env(os.environ)` and pass the object down; command-line
flags override single fields with `dataclasses.replace`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from backend.addresses import parse_hosts
from backend.label_config import DEFAULT_LABEL_CONFIG

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "wm811k" / "LSWMD.zip"
#: Epochs of a first model (`train`, the demo): wafercnn at 48 for 20 epochs on the study's initial
#: 10% is the measured best within 15 CPU-minutes on a 2-core CPU (docs/recipe.md).
FIRST_MODEL_EPOCHS = 20
BACKBONES = ("resnet50", "resnet18", "wafercnn")
DEVICES = ("auto", "cpu", "cuda")

#: Environment variable -> what it sets (printed by `python -m backend settings`; docs/settings.md lists them).
ENVIRONMENT = {
    "WAFER_DATA": "wafer-map file: LSWMD.pkl, LSWMD.zip or .npz (default ../shared/data/wm811k/LSWMD.zip)",
    "WAFER_CACHE_DIR": "where converted wafer data is cached (default ~/.cache/wafermap-labeling)",
    "LOCAL_FILES_DOCUMENT_ROOT": "Label Studio's local-files root (import --pictures writes there)",
    "LABEL_CONFIG": "Label Studio labeling config holding the failure types (default label_config.xml)",
    "WAFER_IMAGE_SIZE": "model input size S in pixels (default 48)",
    "WAFER_BACKBONE": "wafercnn (default: the measured best, docs/recipe.md), resnet50 or resnet18",
    "WAFER_DEVICE": "auto (default: cuda when available), cpu or cuda",
    "WAFER_WEIGHTS": "optional local weights file to start the backbone from",
    "MODEL_DIR": "where model versions are written (default ./models)",
    "LABEL_STUDIO_URL": "Label Studio base URL (default http://127.0.0.1:8080)",
    "LABEL_STUDIO_API_KEY": "API token of the Label Studio account the backend labels as (its auto labels carry that user)",
    "REDIS_URL": "Redis for the job queues (default redis://127.0.0.1:6379/0)",
    "BASIC_AUTH_USER": "with BASIC_AUTH_PASS: every backend route but /health needs these credentials",
    "BASIC_AUTH_PASS": "see BASIC_AUTH_USER",
    "WAFER_BACKEND_URL": "where Label Studio reaches this backend (default http://127.0.0.1:9090)",
    "WAFER_TARGET_ACCURACY": "labeling accuracy the auto-accept threshold is calibrated to (default 0.995)",
    "WAFER_ROUTE_MEASURE": "uncertainty measure for routing: eight-views-when-unsure (default: the mean over a wafer's 8 symmetric drawings scored by margin x agreement, drawn 8 times only when one drawing's p1 - p2 is under 0.99), eight-views (8 drawings of every wafer), margin, least-confidence or entropy (one drawing)",
    "WAFER_PROMISE_CONFIDENCE": "probability with which each set's labeling accuracy meets WAFER_TARGET_ACCURACY (default 0.95; 0: calibrate the expected accuracy instead)",
    "WAFER_AUDIT_FRACTION": "share of each set's auto-routed wafers held back from auto-accept and labelled blind by engineers, to check the promise (default 0.02; 0 turns audits off)",
    "WAFER_AUDIT_MIN": "fewest audit wafers a set gets, when it has that many auto-routed wafers (default 50)",
    "WAFER_ROUTE_THRESHOLD": "fixed threshold on that measure instead of calibration (engineer when above)",
    "WAFER_EPOCHS": "training epochs per retraining (default 5)",
    "WAFER_VALIDATION_FRACTION": "share of annotated wafers held out to calibrate the threshold (default 0.15)",
    "WAFER_IMAGE_HOSTS": "comma-separated hosts task pictures may come from besides Label Studio (default none; e.g. images.fab.local,*.cdn.fab.local)",
    "WAFER_IMAGE_MAX_PIXELS": "largest task picture decoded, in pixels, checked before decoding (default 1048576: 1024 x 1024, 7 times the largest wafer picture)",
    "WAFER_REQUEST_MAX_PIXELS": "pixels one /predict may hand to a general image decoder, summed over its tasks (default 100000000); later tasks get an error and are asked again; our own palette PNGs are not counted",
    "WAFER_IMAGE_MAX_MB": "largest task picture downloaded, in MiB (default 16)",
    "WAFER_IMAGE_TIMEOUT": "seconds one picture download may take in all, redirects included (default 10)",
    "WAFER_MAX_REQUEST_MB": "largest request body the backend reads, in MiB (default 64; more is answered 413)",
    "WAFER_MAX_TASKS": "most tasks in one /predict (default 20000; more is answered 400)",
    "WAFER_PREDICT_REQUESTS": "/predict requests the backend takes at once (default 20; more are answered 503); keep below gunicorn's --threads (24)",
    "WAFER_REQUIRE_AUTH": "true: refuse to start without BASIC_AUTH_USER/BASIC_AUTH_PASS (set in the Docker image)",
    "WAFER_WEBHOOK_SECRET": "token Label Studio's webhooks carry (Authorization: Bearer), opening /webhook only (default: derived from BASIC_AUTH_PASS; unused without credentials)",
    "WAFER_REQUEST_MEMORY_MB": "memory all request bodies being read and parsed may take together, in MiB (default 1024; a body that alone needs more is answered 413, one that must wait 503)",
    "WAFER_KEEP_FREED_MEMORY": "true (default): the worker, the backend and the CLI keep big freed blocks for reuse instead of handing them back to the kernel (1.65x faster prediction measured on 2 cores; backend/allocator.py); false leaves glibc's allocator as it is",
    "WAFER_RECONCILE_INTERVAL_S": "seconds between the workers' reconciles of every known project, which redo whatever lost webhooks left undone (default 300; 0 turns it off)",
}

#: Uncertainty measures a routing rule can use (the values of backend.uncertainty.Measure).
ROUTE_MEASURES = (
    "margin",
    "least-confidence",
    "entropy",
    "eight-views",
    "eight-views-when-unsure",
)
#: The served routing measure: the study's best (8 views) at under half its prediction work, with
#: the same engineer share on the full-scale demo's first set (docs/loop.md, "Uncertainty scores").
DEFAULT_ROUTE_MEASURE = "eight-views-when-unsure"


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


def _float(environ: Mapping[str, str], name: str, default: float | None) -> float | None:
    text = environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {text!r}") from None
    if value != value:  # NaN
        raise ValueError(f"{name} must be a number, got {text!r}")
    return value


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
    image_size: int = 48
    backbone: str = "wafercnn"
    device: str = "auto"
    weights_path: Path | None = None
    model_dir: Path = REPO_ROOT / "models"
    label_studio_url: str = "http://127.0.0.1:8080"
    label_studio_api_key: str = field(default="", repr=False)
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    basic_auth: tuple[str, str] | None = field(default=None, repr=False)
    backend_url: str = "http://127.0.0.1:9090"
    target_accuracy: float = 0.995
    #: P(a set's labeling accuracy >= target_accuracy) the cut keeps (0: expected accuracy).
    promise_confidence: float = 0.95
    route_measure: str = DEFAULT_ROUTE_MEASURE
    #: Share of a set's auto-routed wafers audited blind, and the fewest (`backend.audit`).
    audit_fraction: float = 0.02
    audit_min: int = 50
    route_threshold: float | None = None
    epochs: int = 5
    validation_fraction: float = 0.15
    image_hosts: tuple[str, ...] = ()
    #: 1024 x 1024: 7 times the largest picture `render_picture` draws (384 x 384).
    image_max_pixels: int = 1024 * 1024
    image_max_bytes: int = 16 * 2**20
    image_timeout_s: float = 10.0
    #: Pixels of one /predict for a general decoder: ~680 pictures of 384 x 384, ~1.5-3 s of
    #: Pillow at 15-30 ns a pixel (`backend.images.request_pixel_budget`).
    request_max_pixels: int = 100_000_000
    max_request_bytes: int = 64 * 2**20
    max_tasks: int = 20_000
    predict_requests: int = 20
    require_auth: bool = False
    webhook_secret: str = field(default="", repr=False)
    #: Bodies being read plus what parsing them will take (`backend.app.parse_cost`), together.
    request_memory_bytes: int = 1024 * 2**20
    #: Label Studio's LOCAL_FILES_DOCUMENT_ROOT, where `--pictures` folders must lie.
    local_files_root: Path | None = None
    #: Seconds between the rq workers' sweeps of every known project (0: none).
    reconcile_interval_s: int = 300
    #: Keep big freed blocks for reuse in the processes that run the model (`backend.allocator`).
    keep_freed_memory: bool = True

    def __post_init__(self) -> None:
        if not 8 <= self.image_size <= 512:
            raise ValueError(f"image size must be within 8..512 pixels, got {self.image_size}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}")
        if self.promise_confidence and not 0.5 <= self.promise_confidence < 1.0:
            raise ValueError(
                "WAFER_PROMISE_CONFIDENCE must be 0 (off) or within [0.5, 1), "
                f"got {self.promise_confidence}"
            )
        if not 0.0 < self.target_accuracy < 1.0:
            raise ValueError(f"target accuracy must be within (0, 1), got {self.target_accuracy}")
        if self.route_measure not in ROUTE_MEASURES:
            raise ValueError(f"route measure must be one of {', '.join(ROUTE_MEASURES)}")
        if not 0.0 <= self.audit_fraction <= 1.0 or self.audit_min < 0:
            raise ValueError(
                "WAFER_AUDIT_FRACTION must be within [0, 1] and WAFER_AUDIT_MIN 0 or more, got "
                f"{self.audit_fraction} and {self.audit_min}"
            )
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(
                f"validation fraction must be within (0, 1), got {self.validation_fraction}"
            )
        if self.max_request_bytes < 2**10:
            raise ValueError(
                f"the request limit must be at least 1 KiB, got {self.max_request_bytes}"
            )
        if self.reconcile_interval_s < 0:
            raise ValueError(
                f"WAFER_RECONCILE_INTERVAL_S must be 0 (off) or more, got {self.reconcile_interval_s}"
            )
        if self.request_memory_bytes < 2**20:
            raise ValueError("WAFER_REQUEST_MEMORY_MB must be at least 1")
        if self.max_tasks < 1 or self.predict_requests < 1:
            raise ValueError("WAFER_MAX_TASKS and WAFER_PREDICT_REQUESTS must be at least 1")
        if self.image_max_pixels < 1 or self.image_max_bytes < 1:
            raise ValueError("WAFER_IMAGE_MAX_PIXELS and WAFER_IMAGE_MAX_MB must be at least 1")
        if self.request_max_pixels < 1:
            raise ValueError(
                f"WAFER_REQUEST_MAX_PIXELS must be at least 1, got {self.request_max_pixels}"
            )
        if not 0.0 < self.image_timeout_s <= 600.0:
            raise ValueError(
                f"WAFER_IMAGE_TIMEOUT must be within (0, 600] seconds, got {self.image_timeout_s}"
            )
        for name, url in (
            ("LABEL_STUDIO_URL", self.label_studio_url),
            ("WAFER_BACKEND_URL", self.backend_url),
        ):
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{name} must start with http:// or https://, got {url!r}")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"REDIS_URL must start with redis://, got {self.redis_url!r}")

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
            image_size=_int(environ, "WAFER_IMAGE_SIZE", 48),
            backbone=_choice(environ, "WAFER_BACKBONE", "wafercnn", BACKBONES),
            device=_choice(environ, "WAFER_DEVICE", "auto", DEVICES),
            weights_path=Path(weights).expanduser() if weights else None,
            model_dir=Path(environ.get("MODEL_DIR") or REPO_ROOT / "models").expanduser(),
            label_studio_url=(environ.get("LABEL_STUDIO_URL") or cls.label_studio_url).rstrip("/"),
            label_studio_api_key=environ.get("LABEL_STUDIO_API_KEY", ""),
            redis_url=environ.get("REDIS_URL") or cls.redis_url,
            basic_auth=_basic_auth(environ),
            backend_url=(environ.get("WAFER_BACKEND_URL") or cls.backend_url).rstrip("/"),
            target_accuracy=_float(environ, "WAFER_TARGET_ACCURACY", 0.995) or 0.995,
            promise_confidence=_float(environ, "WAFER_PROMISE_CONFIDENCE", 0.95) or 0.0,
            route_measure=_choice(
                environ, "WAFER_ROUTE_MEASURE", DEFAULT_ROUTE_MEASURE, ROUTE_MEASURES
            ),
            route_threshold=_float(environ, "WAFER_ROUTE_THRESHOLD", None),
            audit_fraction=_float(environ, "WAFER_AUDIT_FRACTION", 0.02) or 0.0,
            audit_min=_int(environ, "WAFER_AUDIT_MIN", 50),
            epochs=_int(environ, "WAFER_EPOCHS", 5),
            validation_fraction=_float(environ, "WAFER_VALIDATION_FRACTION", 0.15) or 0.15,
            image_hosts=parse_hosts(environ.get("WAFER_IMAGE_HOSTS", "")),
            image_max_pixels=_int(environ, "WAFER_IMAGE_MAX_PIXELS", cls.image_max_pixels),
            image_max_bytes=_int(environ, "WAFER_IMAGE_MAX_MB", 16) * 2**20,
            image_timeout_s=_float(environ, "WAFER_IMAGE_TIMEOUT", 10.0) or 0.0,
            request_max_pixels=_int(environ, "WAFER_REQUEST_MAX_PIXELS", cls.request_max_pixels),
            max_request_bytes=_int(environ, "WAFER_MAX_REQUEST_MB", 64) * 2**20,
            max_tasks=_int(environ, "WAFER_MAX_TASKS", 20_000),
            predict_requests=_int(environ, "WAFER_PREDICT_REQUESTS", 20),
            require_auth=_flag(environ, "WAFER_REQUIRE_AUTH"),
            webhook_secret=environ.get("WAFER_WEBHOOK_SECRET", ""),
            request_memory_bytes=_int(environ, "WAFER_REQUEST_MEMORY_MB", 1024) * 2**20,
            reconcile_interval_s=_int(environ, "WAFER_RECONCILE_INTERVAL_S", 300),
            keep_freed_memory=_flag(environ, "WAFER_KEEP_FREED_MEMORY", default=True),
            local_files_root=Path(environ["LOCAL_FILES_DOCUMENT_ROOT"]).expanduser()
            if environ.get("LOCAL_FILES_DOCUMENT_ROOT")
            else None,
        )

    def require_label_studio(self) -> tuple[str, str]:
        """(LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY), or a ValueError saying what to set."""
        if not self.label_studio_api_key:
            raise ValueError(
                "LABEL_STUDIO_API_KEY is not set: use the token of the Label Studio account "
                "the backend should label as (Account & Settings -> Access Token)"
            )
        return self.label_studio_url, self.label_studio_api_key


def _flag(environ: Mapping[str, str], name: str, *, default: bool = False) -> bool:
    text = (environ.get(name) or str(default)).strip().lower()
    if text not in ("true", "1", "yes", "false", "0", "no"):
        raise ValueError(f"{name} must be true or false, got {text!r}")
    return text in ("true", "1", "yes")


def _basic_auth(environ: Mapping[str, str]) -> tuple[str, str] | None:
    user, password = environ.get("BASIC_AUTH_USER", ""), environ.get("BASIC_AUTH_PASS", "")
    if bool(user) != bool(password):
        raise ValueError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
    return (user, password) if user else None
