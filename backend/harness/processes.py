"""Stopping a child process together with every process it started.

Layer L1 (one outside world: the operating system's processes). Every long-running child here
(Label Studio, the backend, Redis, Chromium) is started with `start_new_session=True`, so it
leads a process group of its own; stopping means stopping that whole group, and waiting until
none of it runs, so that nothing still writes into a directory the caller removes next.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

_POLL_SECONDS = 0.05


def stop_process(process: subprocess.Popen[bytes], grace_seconds: float = 15.0) -> None:
    """SIGTERM the process group `process` leads, SIGKILL whatever is left after
    `grace_seconds`; return once the leader is reaped and no process of the group runs."""
    group = process.pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None and not group_alive(group):
            return
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline:
            if process.poll() is not None and not group_alive(group):
                return
            time.sleep(_POLL_SECONDS)
    process.poll()


def group_alive(group: int) -> bool:
    """Whether any process of `group` still runs (zombies waiting to be reaped do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: ask the kernel, zombies included
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        state, pgrp = fields[0], int(fields[2])
        if pgrp == group and state not in ("Z", "X"):
            return True
    return False
