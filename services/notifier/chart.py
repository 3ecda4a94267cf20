"""The intraday equity chart for the daily summary (matplotlib, Agg backend, PNG bytes)."""

from __future__ import annotations

import io
from datetime import datetime

from libs.common.clock import IST


def equity_png(points: list[tuple[int, float]], title: str) -> bytes:
    """Net PnL through the day as a PNG. ``points`` are ``(ts_ns, net_pnl)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    times = [float(mdates.date2num(datetime.fromtimestamp(ts / 1e9, IST)))  # type: ignore[no-untyped-call]
             for ts, _ in points]
    values = [v for _, v in points]
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    try:
        if times:
            ax.plot(times, values, color="#1f77b4", linewidth=1.4)
            ax.fill_between(times, values, 0, where=[v >= 0 for v in values], color="#2ca02c",
                            alpha=0.25, interpolate=True)
            ax.fill_between(times, values, 0, where=[v < 0 for v in values], color="#d62728",
                            alpha=0.25, interpolate=True)
        else:
            ax.text(0.5, 0.5, "no risk state received today", ha="center", va="center",
                    transform=ax.transAxes)
        ax.axhline(0, color="#444444", linewidth=0.8)
        ax.xaxis_date(IST)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=IST))  # type: ignore[no-untyped-call]
        ax.set_title(title)
        ax.set_ylabel("net PnL (₹)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)
