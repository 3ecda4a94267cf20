"""``segment|token``: one helper builds the instrument key, one splits it."""

from __future__ import annotations

import pytest

from libs.common.instruments import Instrument, MasterData, instrument_key, split_key
from libs.common.messages import Tick


@pytest.mark.parametrize(
    ("segment", "token"),
    [("nse_cm", "2885"), ("nse_fo", "35001"), ("bse_cm", "M&M-EQ"), ("", ""), ("nse_cm", "")],
)
def test_a_key_splits_back_into_its_segment_and_token(segment: str, token: str) -> None:
    key = instrument_key(segment, token)

    assert key == f"{segment}|{token}"
    assert split_key(key) == (segment, token)


def test_split_key_of_text_without_a_separator_is_all_segment() -> None:
    assert split_key("RELIANCE-EQ") == ("RELIANCE-EQ", "")


def test_the_inlined_hot_path_keys_agree_with_the_helper() -> None:
    inst = Instrument(segment="nse_cm", token="2885", symbol="RELIANCE-EQ")
    tick = Tick(segment="nse_cm", token="2885", ltp=1.0)

    assert inst.key == instrument_key(tick.segment, tick.token) == "nse_cm|2885"


def test_the_master_resolves_a_key_written_loosely() -> None:
    master = MasterData.load()
    inst = master.resolve("RELIANCE-EQ")

    assert master.resolve(f" {inst.segment.upper()} | {inst.token} ") is inst
    assert master.get(*split_key(inst.key)) is inst
