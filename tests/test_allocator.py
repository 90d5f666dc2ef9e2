"""backend.allocator: big freed blocks stay in the process for reuse (glibc), measured by the
page faults a fresh process takes to allocate and free the same big block again and again."""

from __future__ import annotations

import subprocess
import sys

import pytest

from backend.settings import REPO_ROOT, Settings

#: Allocates and frees a 64 MiB block 20 times (numpy touches every page by filling it) and
#: prints the minor page faults of those rounds after the first.
FAULTS = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from backend.allocator import keep_freed_memory
    assert keep_freed_memory() and keep_freed_memory()
np.ones(8 * 2**20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    np.ones(8 * 2**20).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", FAULTS, mode],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_big_freed_blocks_are_reused_instead_of_faulted_in_again() -> None:
    # glibc maps and unmaps each block: every round faults its pages in again (at least one
    # fault per 2 MiB, where numpy's big arrays get huge pages; 544 a round measured here) ...
    assert faults("glibc") >= 20 * 32
    # ... kept, the same memory serves every round (0 measured here).
    assert faults("keep") <= 32


def test_the_setting_is_on_unless_turned_off() -> None:
    assert Settings.from_env({}).keep_freed_memory
    assert not Settings.from_env({"WAFER_KEEP_FREED_MEMORY": "false"}).keep_freed_memory
    with pytest.raises(ValueError, match="WAFER_KEEP_FREED_MEMORY must be true or false"):
        Settings.from_env({"WAFER_KEEP_FREED_MEMORY": "sometimes"})
