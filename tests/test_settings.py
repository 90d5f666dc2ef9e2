from pathlib import Path

import pytest

from backend.settings import DEFAULT_DATA, Settings


def test_defaults_without_environment() -> None:
    settings = Settings.from_env({"HOME": "/home/fab"})
    assert settings.data_path == DEFAULT_DATA
    assert settings.image_size == 48 and settings.backbone == "wafercnn"
    assert settings.cache_dir == Path("/home/fab/.cache/wafermap-labeling")


def test_environment_overrides() -> None:
    settings = Settings.from_env(
        {
            "WAFER_DATA": "/d/maps.npz",
            "WAFER_IMAGE_SIZE": "224",
            "WAFER_BACKBONE": "resnet18",
            "WAFER_CACHE_DIR": "/c",
            "WAFER_DEVICE": "cpu",
            "MODEL_DIR": "/m",
        }
    )
    assert settings.data_path == Path("/d/maps.npz")
    assert (settings.image_size, settings.backbone, settings.device) == (224, "resnet18", "cpu")
    assert settings.cache_dir == Path("/c") and settings.model_dir == Path("/m")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WAFER_IMAGE_SIZE": "big"}, "WAFER_IMAGE_SIZE must be an integer"),
        ({"WAFER_IMAGE_SIZE": "4"}, "within 8..512"),
        ({"WAFER_BACKBONE": "vgg"}, "WAFER_BACKBONE must be one of"),
        ({"WAFER_DEVICE": "tpu"}, "WAFER_DEVICE must be one of"),
    ],
)
def test_bad_values_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


def test_service_settings_from_environment() -> None:
    settings = Settings.from_env(
        {
            "LABEL_STUDIO_URL": "http://ls:8080/",
            "LABEL_STUDIO_API_KEY": "abc123",
            "REDIS_URL": "redis://r:6379/3",
            "BASIC_AUTH_USER": "fab",
            "BASIC_AUTH_PASS": "pw",
            "WAFER_TARGET_ACCURACY": "0.99",
            "WAFER_ROUTE_MEASURE": "entropy",
            "WAFER_ROUTE_THRESHOLD": "0.2",
            "WAFER_EPOCHS": "2",
        }
    )
    assert settings.label_studio_url == "http://ls:8080"
    assert settings.require_label_studio() == ("http://ls:8080", "abc123")
    assert settings.redis_url == "redis://r:6379/3" and settings.basic_auth == ("fab", "pw")
    assert (settings.target_accuracy, settings.route_measure) == (0.99, "entropy")
    assert settings.route_threshold == 0.2 and settings.epochs == 2
    assert "abc123" not in repr(settings) and "pw" not in repr(settings)


def test_service_defaults_and_missing_key() -> None:
    settings = Settings.from_env({})
    assert settings.basic_auth is None and settings.route_threshold is None
    assert settings.route_measure == "eight-views-when-unsure" and settings.target_accuracy == 0.995
    with pytest.raises(ValueError, match="LABEL_STUDIO_API_KEY is not set"):
        settings.require_label_studio()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BASIC_AUTH_USER": "fab"}, "set both BASIC_AUTH_USER and BASIC_AUTH_PASS"),
        ({"WAFER_TARGET_ACCURACY": "1.5"}, "target accuracy must be within"),
        ({"WAFER_ROUTE_THRESHOLD": "high"}, "WAFER_ROUTE_THRESHOLD must be a number"),
        ({"WAFER_ROUTE_MEASURE": "variance"}, "WAFER_ROUTE_MEASURE must be one of"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL must start with redis://"),
        ({"LABEL_STUDIO_URL": "ls:8080"}, "LABEL_STUDIO_URL must start with http"),
    ],
)
def test_bad_service_values_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


def test_image_settings() -> None:
    defaults = Settings.from_env({})
    assert defaults.image_hosts == () and defaults.image_max_pixels == 1024 * 1024
    assert defaults.image_max_bytes == 16 * 2**20 and defaults.image_timeout_s == 10.0
    settings = Settings.from_env(
        {
            "WAFER_IMAGE_HOSTS": "Images.Fab.Local, *.cdn.fab.local,10.1.2.3",
            "WAFER_IMAGE_MAX_PIXELS": "1000000",
            "WAFER_IMAGE_MAX_MB": "2",
            "WAFER_IMAGE_TIMEOUT": "2.5",
        }
    )
    assert settings.image_hosts == ("images.fab.local", "*.cdn.fab.local", "10.1.2.3")
    assert (settings.image_max_pixels, settings.image_max_bytes) == (1_000_000, 2 * 2**20)
    assert settings.image_timeout_s == 2.5


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WAFER_IMAGE_HOSTS": "https://images.fab.local"}, "WAFER_IMAGE_HOSTS: .* not a host"),
        ({"WAFER_IMAGE_HOSTS": "images.fab.local:8080"}, "no scheme, port or path"),
        ({"WAFER_IMAGE_MAX_PIXELS": "0"}, "WAFER_IMAGE_MAX_PIXELS and WAFER_IMAGE_MAX_MB"),
        ({"WAFER_IMAGE_MAX_PIXELS": "4M"}, "WAFER_IMAGE_MAX_PIXELS must be an integer"),
        ({"WAFER_IMAGE_MAX_MB": "0"}, "WAFER_IMAGE_MAX_PIXELS and WAFER_IMAGE_MAX_MB"),
        ({"WAFER_IMAGE_TIMEOUT": "0"}, r"WAFER_IMAGE_TIMEOUT must be within \(0, 600\]"),
        ({"WAFER_IMAGE_TIMEOUT": "-1"}, "WAFER_IMAGE_TIMEOUT must be within"),
        ({"WAFER_IMAGE_TIMEOUT": "3600"}, "WAFER_IMAGE_TIMEOUT must be within"),
    ],
)
def test_bad_image_settings_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


def test_the_small_wafer_cnn_is_a_backbone_the_settings_take() -> None:
    from backend.classifier import build_network

    settings = Settings.from_env({"WAFER_BACKBONE": "wafercnn", "WAFER_IMAGE_SIZE": "48"})
    assert settings.backbone == "wafercnn" and settings.image_size == 48
    network = build_network(settings.backbone, 9, seed=0)
    assert sum(p.numel() for p in network.parameters()) < 1_000_000


def test_every_setting_is_documented() -> None:
    """docs/settings.md lists every variable `python -m backend settings` knows, and no other."""
    import re

    from backend.settings import ENVIRONMENT, REPO_ROOT

    table = (REPO_ROOT / "docs" / "settings.md").read_text().split("\n\nCommand-line flags")[0]
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", table))
    assert set(ENVIRONMENT) - {"LOCAL_FILES_DOCUMENT_ROOT"} <= documented
    assert documented - set(ENVIRONMENT) <= {"LOG_LEVEL"}


def test_the_settings_command_prints_no_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from backend.cli import main

    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "tok-0123456789")
    monkeypatch.setenv("BASIC_AUTH_USER", "fab")
    monkeypatch.setenv("BASIC_AUTH_PASS", "pass-0123456789")
    monkeypatch.setenv("REDIS_URL", "redis://:redis-0123456789@redis:6379/0")
    assert main(["settings"]) == 0
    out = capsys.readouterr().out
    assert "0123456789" not in out
    assert "redis://:***@redis:6379/0" in out
