"""Telling Label Studio's prediction import paths apart (issue 15 row 18), at the transport seam.

The batched path (`BATCHED_PREDICTION_IMPORT_FLAG` on) recounts only the tasks it touches; the
legacy path recounts every task of the project without a lock, which loses labels saved
meanwhile. The backend asks which path runs by importing a prediction for task 0, which every
path refuses before writing, in its own words (Label Studio 1.23.2, `data_import/api.py`). The
session's Label Studio runs the batched path (tests/test_loop_repairs.py asks it for real); the
legacy answers are faked here with `httpx.MockTransport`.
"""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from backend.labelstudio import RECOUNT_VERSION, LabelStudioClient


def answering(status: int, body: object) -> tuple[LabelStudioClient, list[httpx.Request]]:
    sent: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(status, json=body)

    http = httpx.Client(transport=httpx.MockTransport(handle))
    return LabelStudioClient("http://ls.test", "secret-key-0123456789", http_client=http), sent


def refusal(message: str) -> dict[str, object]:
    """Label Studio 1.23.2's body for a ValidationError raised by the import view."""
    return {
        "id": "5f0c",
        "status_code": 400,
        "detail": "Validation error",
        "validation_errors": {"non_field_errors": [message]},
    }


BATCHED = (
    "{'task': 0, 'result': [], 'score': 0.0, 'model_version': 'wafermap-recount'} contains "
    'invalid "task" field: task ID 0 not found in project 5'
)
LEGACY = (
    "{'task': 0, 'result': []} contains invalid \"task\" field: corresponding task ID couldn't "
    "be retrieved from project 5 tasks"
)
LEGACY_VALIDATING = "Prediction 0: Invalid task ID 0 - task not found in project"


@pytest.mark.parametrize(
    ("message", "batched"),
    [(BATCHED, True), (LEGACY, False), (LEGACY_VALIDATING, False)],
    ids=["batched", "legacy", "legacy-validating"],
)
def test_the_prediction_import_path_is_told_by_label_studios_own_words(
    message: str, batched: bool
) -> None:
    client, sent = answering(400, refusal(message))
    assert client.prediction_import_batched(5) is batched
    [request] = sent
    assert (request.method, request.url.path) == ("POST", "/api/projects/5/import/predictions")
    assert json.loads(request.content) == [
        {"task": 0, "result": [], "score": 0.0, "model_version": RECOUNT_VERSION}
    ]


def test_an_answer_of_neither_path_is_unknown_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    client, _ = answering(403, {"detail": "You do not have permission to perform this action."})
    with caplog.at_level(logging.WARNING, logger="backend.labelstudio"):
        assert client.prediction_import_batched(5) is None
    assert "could not tell Label Studio's prediction import path" in caplog.text
