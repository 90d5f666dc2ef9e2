"""The labeling interface: which tag holds the failure type and which failure types exist.

Layer L0. The failure-type names are read from `label_config.xml` (the same text Label Studio
holds), never hard-coded, so a fab can add or rename patterns in one place.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LABEL_CONFIG = Path(__file__).resolve().parent.parent / "label_config.xml"

#: The WM-811K label of a wafer without a failure pattern.
NO_PATTERN = "none"


@dataclass(frozen=True)
class LabelConfig:
    """The `<Choices>` tag that holds the failure type and the image tag it labels."""

    from_name: str
    to_name: str
    image_value: str
    failure_types: tuple[str, ...]

    @property
    def defect_classes(self) -> tuple[int, ...]:
        """Indices of the real failure patterns (every class but `none`)."""
        return tuple(i for i, name in enumerate(self.failure_types) if name != NO_PATTERN)

    def index_of(self, failure_type: str) -> int:
        """Class index of a failure-type name; ValueError names the known ones."""
        try:
            return self.failure_types.index(failure_type)
        except ValueError:
            known = ", ".join(self.failure_types)
            raise ValueError(f"unknown failure type {failure_type!r}; known: {known}") from None


def parse_label_config(xml_text: str) -> LabelConfig:
    """Read the first `<Choices>` tag and the image tag it points at (`toName`)."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        raise ValueError(f"label config is not valid XML: {exc}") from exc
    choices = root.find(".//Choices")
    if choices is None:
        raise ValueError("label config has no <Choices> tag for the failure type")
    from_name = choices.get("name")
    to_name = choices.get("toName")
    if not from_name or not to_name:
        raise ValueError("the <Choices> tag needs both 'name' and 'toName'")
    image = next((el for el in root.iter("Image") if el.get("name") == to_name), None)
    if image is None:
        raise ValueError(f"<Choices toName={to_name!r}> points at no <Image name={to_name!r}>")
    names = tuple(c.get("value", "") for c in choices.iter("Choice"))
    if len(names) < 2 or any(not n for n in names):
        raise ValueError("the <Choices> tag needs at least two <Choice value=...> entries")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate failure types in label config: {names}")
    return LabelConfig(
        from_name=from_name,
        to_name=to_name,
        image_value=image.get("value", "$image").lstrip("$"),
        failure_types=names,
    )
