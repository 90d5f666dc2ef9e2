"""Label Studio project ids, parsed one strict way for every route and every webhook. Layer L0.

Label Studio sends a project as ``"<id>.<created timestamp>"`` (``/setup``, ``/predict``,
``/versions``), as a bare id, or as an object whose ``id`` is an integer (webhooks). Python's
``int()`` takes far more than that (``"-1"``, ``"+9"``, ``" 7"``, ``"1_000"``, other scripts'
digits, ``10**30``): each such spelling became a debounce key and a job of its own. This parser
takes ASCII digits only, from 1 to the largest database id.
"""

from __future__ import annotations

#: Label Studio project ids are database integers (64-bit).
MAX_PROJECT_ID = 2**63 - 1
_MAX_DIGITS = len(str(MAX_PROJECT_ID))


class ProjectIdError(ValueError):
    """A value that is not a Label Studio project id (the message says what is wrong)."""


def parse_project_id(value: object) -> int:
    """The project id in `value`: ``"<id>.<created timestamp>"``, ``"<id>"`` or an int.

    Only ASCII digits before the first dot (no sign, space, underscore or other digits), and
    a value within 1..MAX_PROJECT_ID; ProjectIdError otherwise (None and "" say the project
    is missing; bools, floats and other types are refused).
    """
    if value is None or value == "":
        raise ProjectIdError("the request names no Label Studio project ('project' is missing)")
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ProjectIdError(
            f"'project' must be '<id>.<timestamp>' or an id, not a {type(value).__name__}"
        )
    if isinstance(value, int):
        number = value
    else:
        text = value.split(".", 1)[0]
        if not (text.isascii() and text.isdigit() and len(text) <= _MAX_DIGITS):
            raise ProjectIdError(
                f"'project' must be '<id>.<timestamp>' or an id, got {value[:40]!r}"
            )
        number = int(text)
    if not 1 <= number <= MAX_PROJECT_ID:
        shown = str(number) if abs(number) < 10**40 else f"a {number.bit_length()}-bit number"
        raise ProjectIdError(f"not a Label Studio project id: {shown}")
    return number
