"""The short chaos run that ``make test`` keeps (``make chaos`` runs 100 kills): SIGKILLs of
feed, strategies, risk, execution and the embedded PostgreSQL while strategies and a manual
trader send bracketed orders, then kill switch, flatten and every invariant between the
ledger and the paper broker's own book."""

from __future__ import annotations

import pytest

from tests.chaos import INVARIANTS, TARGETS, run

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(240)
def test_ten_kills_lose_nothing_and_every_bracket_stays_protected() -> None:
    report = run(kills=10, seconds=30.0, seed=20261202, log=None)

    assert report.ok(), report.table()
    assert sum(report.kills.values()) == 10
    assert set(report.kills) <= set(TARGETS) and len(report.kills) >= 3, report.kills
    assert sum(len(v) for v in report.recovery.values()) == 10
    assert report.orders > 50 and report.fills > 20 and report.approved_manual > 3, report.table()
    assert report.protect_checks == 10 and all(report.violations[i] == 0 for i in INVARIANTS)
