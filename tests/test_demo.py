import os
import signal

import pytest

from backend.demo import SetRow, _stop_on_signals, results_table
from backend.engineers import SetOutcome


def test_sigterm_stops_the_demo_like_ctrl_c() -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        _stop_on_signals()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0.5)  # let the handler run
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def test_results_table_totals() -> None:
    rows = [
        SetRow(SetOutcome(1, 100, 60, 40, 1, 0, "v001-set0"), 5.0, 30.0),
        SetRow(SetOutcome(2, 100, 30, 70, 0, 0, "v002-set1"), 4.0, 25.5),
    ]
    table = results_table(rows)
    assert "| 1 | 100 | 60 (60.0%) | 40 | 1 | 99.00% | v001-set0 | 30.0 s |" in table
    assert "| all | 200 | 90 (45.0%) | 110 | 1 | 99.50% | | |" in table
