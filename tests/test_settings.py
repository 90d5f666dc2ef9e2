from pathlib import Path

import pytest

from backend.settings import DEFAULT_DATA, Settings


def test_defaults_without_environment() -> None:
    settings = Settings.from_env({"HOME": "/home/fab"})
    assert settings.data_path == DEFAULT_DATA
    assert settings.image_size == 64 and settings.backbone == "resnet50"
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
