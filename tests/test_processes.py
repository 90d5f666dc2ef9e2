"""Stopping a child: no process of its group runs once stop_process returns (a Chromium helper
still writing into its profile once made the profile's removal fail with 'Directory not empty')."""

from __future__ import annotations

import subprocess
import sys

from backend.harness.processes import group_alive, stop_process

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
    assert group_alive(process.pid)
    stop_process(process, grace_seconds=0.5)
    assert not group_alive(process.pid)
    assert process.returncode is not None


def test_a_group_that_already_ended_is_stopped_without_error() -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    process.wait()
    stop_process(process, grace_seconds=0.5)
    assert not group_alive(process.pid)
