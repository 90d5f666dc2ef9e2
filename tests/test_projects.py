"""The ops status report."""

from __future__ import annotations

from typing import Any

from backend.loop_state import SetState
from backend.projects import status_table


def state(number: int, **counts: int) -> SetState:
    values = {"auto": 0, "engineer": 0, "known": 0, "waiting": 0, "predicted": 0} | counts
    return SetState(
        number=number,
        total=sum(values[k] for k in ("auto", "engineer", "known", "waiting")),
        **values,
    )


def test_status_table_has_a_row_per_set_and_version() -> None:
    states = {
        0: state(0, known=40),
        1: state(1, auto=30, engineer=5, waiting=15, predicted=50),
        2: state(2, waiting=50),
    }
    versions: list[dict[str, Any]] = [
        {
            "version": "v001-set0",
            "served": False,
            "trained_through_set": 0,
            "validation_wafers": 6.0,
            "validation_accuracy": 0.8333333,
            "route_threshold": 0.02,
        },
        {
            "version": "v002-set1",
            "served": True,
            "trained_through_set": 1,
            "validation_wafers": 12.0,
            "validation_accuracy": 0.9,
            "route_threshold": 0.015,
        },
        {"version": "v003-set2", "error": "not a readable model version"},
    ]
    lines = status_table(states, versions).splitlines()
    assert "| initial | 40 | 0 | 0 | 40 | 0 | 0 |" in lines
    assert "| 1 | 50 | 30 | 5 | 0 | 15 | 50 |" in lines
    assert "| 2 | 50 | 0 | 0 | 0 | 50 | 0 |" in lines
    assert not any(line.startswith("| 0 |") for line in lines)
    assert "| v001-set0 |  | 0 | 6 | 83.33% | 0.02 |" in lines
    assert "| v002-set1 | yes | 1 | 12 | 90.00% | 0.015 |" in lines
    assert "| v003-set2 |  |  | 0 |  |  |" in lines
    # Two Markdown tables: header and rule rows come before their data rows.
    set_header = next(i for i, line in enumerate(lines) if line.startswith("| set |"))
    version_header = next(i for i, line in enumerate(lines) if line.startswith("| version |"))
    assert set_header < lines.index("| initial | 40 | 0 | 0 | 40 | 0 | 0 |") < version_header
    assert lines[version_header + 1].startswith("|---|")
    row_cells = {line.count("|") for line in lines[version_header:] if line}
    assert row_cells == {7}


def test_status_table_without_versions() -> None:
    table = status_table({0: state(0, known=3)}, [])
    assert "| initial | 3 | 0 | 0 | 3 | 0 | 0 |" in table.splitlines()
    assert table.splitlines()[-1] == "|---|---|---:|---:|---:|---:|"
