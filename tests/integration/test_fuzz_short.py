"""The short fuzz run that ``make test`` keeps (``make fuzz`` runs 100,000 cases): hostile
requests at risk's and execution's ROUTERs and hostile tick frames into their subscribers."""

from __future__ import annotations

from tests.fuzz_bus import run


def test_five_thousand_hostile_frames_crash_nothing_wedge_nothing_and_every_refusal_says_why() -> None:
    report = run(cases=5000, seed=20261201)

    assert report.ok(), report.table()
    assert sum(report.sent.values()) + sum(report.oversize.values()) == 5000
    assert sum(report.refused.values()) > 0 and report.ticks > 0
