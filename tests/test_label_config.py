import pytest

from backend.label_config import DEFAULT_LABEL_CONFIG, parse_label_config


def test_project_label_config_lists_the_wm811k_failure_types() -> None:
    config = parse_label_config(DEFAULT_LABEL_CONFIG.read_text())
    assert config.failure_types == (
        "Center",
        "Donut",
        "Edge-Loc",
        "Edge-Ring",
        "Loc",
        "Near-full",
        "Random",
        "Scratch",
        "none",
    )
    assert config.from_name == "failure_type" and config.to_name == "wafer_map"
    assert config.image_value == "image"
    assert config.defect_classes == tuple(range(8))
    assert config.index_of("Scratch") == 7


def test_unknown_failure_type_names_the_known_ones() -> None:
    config = parse_label_config(DEFAULT_LABEL_CONFIG.read_text())
    with pytest.raises(ValueError, match=r"unknown failure type 'Blob'.*Center"):
        config.index_of("Blob")


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<View>", "not valid XML"),
        ("<View><Image name='i' value='$x'/></View>", "no <Choices>"),
        (
            "<View><Choices name='c' toName='i'><Choice value='a'/><Choice value='b'/></Choices></View>",
            "points at no",
        ),
        (
            "<View><Image name='i' value='$x'/><Choices name='c' toName='i'><Choice value='a'/><Choice value='a'/></Choices></View>",
            "duplicate",
        ),
    ],
)
def test_broken_configs_give_clear_errors(xml: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_label_config(xml)
