"""Instrument master sync: download the day's scrip master into ``$NEOPULSE_HOME/master/``.

``MasterData.load_for_home(home)`` reads the CSVs cached here (and falls back to the bundled
sample when there are none). Kotak's file URLs are date-stamped and come from the SDK's
``scrip_master()``; they are never hard-coded (docs/kotak-rest.md §8).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from services.execution.brokers.base import BrokerTemporary

if TYPE_CHECKING:
    from services.execution.brokers.base import LiveBroker


def _segment_of(url: str) -> str:
    """``…/transformed-v1/nse_cm-v1.csv`` → ``nse_cm``; ``…/transformed/nse_fo.csv`` → ``nse_fo``."""
    name = Path(urlsplit(url).path).name
    return name.removesuffix(".csv").removesuffix("-v1")


def fetch_kotak_master(broker: LiveBroker, home: Path, segments: Iterable[str] | None = None) -> list[Path]:
    """Download every scrip-master CSV Kotak lists today (or only ``segments``) through the
    broker's transport (pinned to ``kotak.base_url`` in sandbox mode) and cache each as
    ``master/<segment>.csv``. Returns the paths written. A file is replaced only once its
    download is complete and looks like a scrip master, so a failed sync keeps yesterday's."""
    wanted = {s.strip().lower() for s in segments} if segments is not None else None
    urls = [u for u in broker.scrip_master_urls() if wanted is None or _segment_of(u) in wanted]
    if not urls:
        raise BrokerTemporary("scrip master: no files listed" + (f" for {sorted(wanted)}" if wanted else ""))
    out_dir = home / "master"
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with broker.http_client() as http:
        for url in urls:
            segment = _segment_of(url)
            target = out_dir / f"{segment}.csv"
            tmp = out_dir / f".{segment}.csv.part"
            try:
                with http.stream("GET", url) as resp:
                    if resp.status_code != 200:
                        raise BrokerTemporary(f"scrip master {segment}: HTTP {resp.status_code}")
                    with tmp.open("wb") as fh:
                        for chunk in resp.iter_bytes():
                            fh.write(chunk)
                        fh.flush()
                        os.fsync(fh.fileno())
                with tmp.open("r", encoding="utf-8-sig", errors="replace") as fh:
                    header = fh.readline()
                if "pSymbol" not in header or "pTrdSymbol" not in header:
                    raise BrokerTemporary(f"scrip master {segment}: not a scrip-master CSV")
                tmp.replace(target)
            except BrokerTemporary:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                raise
            except Exception as exc:  # noqa: BLE001 - httpx/OS errors: keep the old file, report once
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                raise BrokerTemporary(f"scrip master {segment}: {exc.__class__.__name__}: {exc}") from None
            written.append(target)
    return written
