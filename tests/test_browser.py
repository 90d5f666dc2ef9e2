"""Stopping the browser: every process of Chromium's group is gone before its profile is removed
(a helper still writing into the profile once made the cleanup fail with 'Directory not empty')."""

from __future__ import annotations

import subprocess
import sys

from backend.browser import _group_alive, _stop_process_group

#: A leader that starts a helper ignoring SIGTERM, as a stubborn Chromium helper would, then waits.
STUBBORN_HELPER = (
    "import signal, subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', "
    "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); "
    "time.sleep(60)'])\n"
    "time.sleep(60)\n"
)


def start_group(code: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == b"1"  # the helper is up and ignores SIGTERM
    return process


def test_stopping_the_group_ends_helpers_that_ignore_sigterm() -> None:
    process = start_group(STUBBORN_HELPER)
    assert _group_alive(process.pid)
    _stop_process_group(process, grace=0.5)
    assert not _group_alive(process.pid)
    assert process.returncode is not None


def test_a_group_that_already_ended_is_stopped_without_error() -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    process.wait()
    _stop_process_group(process, grace=0.5)
    assert not _group_alive(process.pid)
