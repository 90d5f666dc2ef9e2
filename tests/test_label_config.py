import xml.etree.ElementTree as ET

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


def test_labeling_screen_puts_picture_and_failure_types_side_by_side() -> None:
    """The engineer's screen: picture left, guess and choices right, one key per choice."""
    root = ET.fromstring(DEFAULT_LABEL_CONFIG.read_text())
    row = root.find("View[@className='wafer-screen']")
    assert row is not None, "the picture and the choices share one flex row"
    picture, decision = row.findall("View")
    assert picture.find("Image[@name='wafer_map']") is not None
    image = picture.find("Image")
    assert image is not None and image.get("maxWidth") == "600px"
    choices = decision.find("Choices[@name='failure_type']")
    assert choices is not None and choices.get("layout") == "vertical"
    hotkeys = [c.get("hotkey") for c in choices.iter("Choice")]
    assert hotkeys == [str(n) for n in range(1, 10)], "keys 1-9 choose a failure type"
    style = root.find("Style")
    assert style is not None and ".wafer-screen" in (style.text or "")
    assert "display: flex" in (style.text or "") and "nowrap" in (style.text or "")


def test_labeling_screen_says_where_the_wafer_is_from_and_how_to_confirm_the_guess() -> None:
    """Header lines read only fields the import writes (the pre-annotation writes no task data:
    the model's guess is the pre-selected choice, its score the queue's column); unnamed, so
    Label Studio does not demand them in imported tasks (it does for named tags' `$fields`)."""
    root = ET.fromstring(DEFAULT_LABEL_CONFIG.read_text())
    headers = [h.get("value", "") for h in root.iter("Header")]
    shown = " ".join(headers)
    for field in ("$set", "$lot", "$wafer_id"):
        assert field in shown
    for field in ("$predicted", "$score", "$margin", "$entropy"):
        assert field not in shown
    assert "pre-selected" in shown and "Ctrl+Enter" in shown
    assert all(h.get("name") is None for h in root.iter("Header"))
    named_values = {el.get("value") for el in root.iter() if el.get("name") and el.get("value")}
    assert named_values == {"$image"}, "only the picture is required in imported tasks"
