"""Parameter grids and walk-forward tests over backtests (``neopulse backtest --grid``).

A grid is the cartesian product of each ``--grid name=v1,v2,...`` option, every combination
one ordinary ``run_backtest`` (the same strategy, risk and paper execution as a single
backtest; nothing here reaches into its per-tick loop). The parent decodes the ticks once
into a memory-mapped file (``tickstore``); a pool of worker processes maps it and runs the
combinations. Each result is filed under its combination's index, so the finished table does
not depend on which worker ran what, or when.

The ranking is by net PnL after costs (the report's ``net_pnl``: gross less turnover x
``risk.cost_rate``, 0.035 %); equal nets are ordered by the parameter values, in the order the
``--grid`` options were given, smallest first.

Walk-forward (``walk_forward``) splits the ticks' trading days into K+1 consecutive blocks of
(nearly) equal length. Fold i optimises the grid on block i (rolling: a window of one block that
moves forward) or on blocks 1..i (anchored: a window that grows from the first day), then runs
the in-sample winner, once, on block i+1, which it has not seen. Each out-of-sample run starts
flat, like a fresh trading day.
"""

from __future__ import annotations

import datetime as dt
import itertools
import multiprocessing
import signal
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec
import structlog

from libs.common.config import Config
from libs.common.instruments import MasterData
from services.backtest.tickstore import TickStore
from services.strategy.base import ParamsError, Strategy

MAX_RUNS = 10_000  # backtests one command runs without --yes


class GridError(ValueError):
    """Bad grid or walk-forward input, or a combination that could not run: one line for the operator."""


# --------------------------------------------------------------------------- the grid itself


@dataclass(frozen=True)
class Grid:
    """The parameters swept and their values (converted to the strategy's types), in the
    order the ``--grid`` options gave them."""

    names: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]

    @property
    def size(self) -> int:
        n = 1
        for vs in self.values:
            n *= len(vs)
        return n

    def combinations(self) -> list[dict[str, Any]]:
        """Every combination, the last parameter varying fastest."""
        return [dict(zip(self.names, combo, strict=True)) for combo in itertools.product(*self.values)]

    def as_dict(self) -> dict[str, list[Any]]:
        return {n: list(vs) for n, vs in zip(self.names, self.values, strict=True)}

    def label(self) -> str:
        return " x ".join(f"{n} ({len(vs)})" for n, vs in zip(self.names, self.values, strict=True))


def parse_grid(specs: Sequence[str], cls: type[Strategy], fixed: dict[str, str]) -> Grid:
    """``name=v1,v2,...`` options → a ``Grid``, each value checked against ``cls.Params`` with
    the ``--param`` values ``fixed``. ``GridError`` names the first bad option."""
    label = cls.name or cls.__name__
    known = sorted(f.name for f in msgspec.structs.fields(cls.Params))
    if not specs:
        raise GridError("--grid: no parameters to sweep: give at least one --grid name=v1,v2,...")
    if not known:
        raise GridError(f"--grid: strategy {label} has no parameters to sweep")
    names: list[str] = []
    values: list[tuple[Any, ...]] = []
    for spec in specs:
        name, sep, text = spec.partition("=")
        name = name.strip()
        if not sep or not name:
            raise GridError(f"--grid expects name=v1,v2,..., got {spec!r}")
        if name not in known:
            raise GridError(f"--grid {name}: strategy {label} has no parameter {name!r} "
                            f"(its parameters: {', '.join(known)})")  # fmt: skip
        if name in names:
            raise GridError(f"--grid {name}: given twice; put all its values in one option")
        if name in fixed:
            raise GridError(f"--grid {name}: also set by --param; give it in one of them")
        raw = [v.strip() for v in text.split(",")]
        if not text.strip() or any(not v for v in raw):
            raise GridError(f"--grid {name}: empty value in {text!r} (expected {name}=v1,v2,...)")
        converted = []
        for v in raw:
            try:
                params = cls.parse_params({**fixed, name: v})
            except ParamsError as exc:
                raise GridError(f"--grid {name}={v}: {exc}") from None
            converted.append(getattr(params, name))
        repeated = [v for v, n in Counter(converted).items() if n > 1]
        if repeated:
            raise GridError(f"--grid {name}: the value {_fmt(repeated[0])} is given more than once")
        names.append(name)
        values.append(tuple(converted))
    return Grid(tuple(names), tuple(values))


def check_runs(runs: int, what: str, yes: bool) -> None:
    """The guard against a typo that asks for a week of computing."""
    if runs > MAX_RUNS and not yes:
        raise GridError(f"{what} is {runs:,} backtests, over {MAX_RUNS:,}: narrow the grid, or pass "
                        f"--yes to run them all")  # fmt: skip


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items())


# --------------------------------------------------------------------------- running combinations


@dataclass(frozen=True)
class MasterSpec:
    """How a worker loads the master the parent used (a master is too big to pickle per task)."""

    home: str
    today: dt.date | None = None
    also: tuple[dt.date, ...] = ()

    def load(self) -> MasterData:
        return MasterData.load_for_home(Path(self.home), today=self.today, also=self.also)

    @classmethod
    def for_recording(cls, home: Path, path: Path) -> MasterSpec:
        """The master ``master_for_recording`` loads: that of each day the recording covers."""
        from services.backtest.runner import recording_days

        days = recording_days(path)
        return cls(str(home), days[0] if days else None, tuple(days[1:]))


@dataclass(frozen=True)
class GridJob:
    """What every run of one command shares (sent to each worker once)."""

    store: str
    strategy: str
    cfg: Config
    master: MasterSpec
    fixed: dict[str, str] = field(default_factory=dict)
    strategy_id: str = "bt"
    instruments: tuple[str, ...] = ()


@dataclass(frozen=True)
class Task:
    """One backtest: a combination over some rows of the store (all of them when ``ranges`` is None)."""

    index: int
    params: dict[str, Any]
    ranges: tuple[tuple[int, int], ...] | None = None
    curve: bool = False  # keep the equity curve (walk-forward out-of-sample runs)


SUMMARY_KEYS = ("net_pnl", "gross_pnl", "cost", "turnover", "max_drawdown", "trades", "win_rate")


def _drop(_logger: Any, _method: str, _event: Any) -> Any:
    raise structlog.DropEvent


class _Worker:
    """One process's share: the mapped store, the master, and the loop over its tasks."""

    def __init__(self, job: GridJob) -> None:
        self.job = job
        self.store = TickStore(Path(job.store))
        self.master = job.master.load()
        # many runs at once would interleave in one log file: a grid counts strategy errors
        # (the table's `errors`) and a single backtest of that combination logs them
        self.log = structlog.wrap_logger(None, processors=[_drop])

    def run(self, task: Task) -> dict[str, Any]:
        from services.backtest.runner import BacktestError, run_backtest

        job = self.job
        try:
            result = run_backtest(
                self.store.ticks(task.ranges),
                job.strategy,
                {**job.fixed, **task.params},
                cfg=job.cfg,
                master=self.master,
                strategy_id=job.strategy_id,
                instruments=list(job.instruments) or None,
                log=self.log,
            )
        except (BacktestError, ParamsError) as exc:
            return {"index": task.index, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - one line to the operator, not a worker's traceback
            return {"index": task.index, "error": f"{type(exc).__name__}: {exc}"}
        report = result.report
        s = report["summary"]
        out: dict[str, Any] = {
            "index": task.index,
            **{k: s[k] for k in SUMMARY_KEYS},
            "halted": report["halted"],
            "errors": report["errors"],
            "ticks": report["ticks"],
        }
        if task.curve:
            out["equity_curve"] = report["equity_curve"]
        return out


_worker: _Worker | None = None
_worker_failed = ""


def _init_worker(job: GridJob) -> None:
    global _worker, _worker_failed  # noqa: PLW0603 - a pool worker's state lives as long as the process
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it stops the pool)
    try:
        _worker = _Worker(job)
    except Exception as exc:  # noqa: BLE001 - a Pool whose initializer raises respawns it forever
        _worker_failed = f"worker start failed: {type(exc).__name__}: {exc}"


def _run_in_worker(task: Task) -> dict[str, Any]:
    if _worker is None:
        return {"index": task.index, "error": _worker_failed}
    return _worker.run(task)


class Runner:
    """Runs tasks: in this process with ``jobs`` 1, else in a pool of ``jobs`` processes (spawned,
    so no lock or thread of this process is inherited). Use as a context manager: leaving it on
    an exception (Ctrl-C included) terminates the workers."""

    def __init__(self, job: GridJob, jobs: int) -> None:
        self.job = job
        self.jobs = max(1, jobs)
        self._pool: Any = None
        self._local: _Worker | None = None

    def __enter__(self) -> Runner:
        if self.jobs == 1:
            self._local = _Worker(self.job)
        else:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ctx.Pool(self.jobs, _init_worker, (self.job,))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        if self._pool is not None:
            if exc_type is None:
                self._pool.close()
            else:
                self._pool.terminate()
            self._pool.join()
        if self._local is not None:
            self._local.store.close()

    def run(self, tasks: Sequence[Task], progress: Callable[[], None] | None = None) -> list[dict[str, Any]]:
        """Every task's result, in task order (whatever order they finished in)."""
        results: dict[int, dict[str, Any]] = {}
        if self._local is not None:
            done: Any = map(self._local.run, tasks)
        else:
            done = self._pool.imap_unordered(_run_in_worker, tasks, chunksize=1)
        for res in done:
            results[res["index"]] = res
            if progress is not None:
                progress()
        return [results[t.index] for t in tasks]


def _check(results: list[dict[str, Any]], tasks: Sequence[Task], where: str = "") -> None:
    for res, task in zip(results, tasks, strict=True):
        if "error" in res:
            at = f" ({where})" if where else ""
            raise GridError(f"{params_text(task.params)}{at}: {res['error']}")


# --------------------------------------------------------------------------- the ranked table


def rank(grid: Grid, combos: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows best first: net PnL after costs, ties by the parameter values in grid order."""
    rows = [{"params": p, **{k: v for k, v in r.items() if k != "index"}}
            for p, r in zip(combos, results, strict=True)]  # fmt: skip
    rows.sort(key=lambda r: (-r["net_pnl"], tuple(r["params"][n] for n in grid.names)))
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows


def sweep(runner: Runner, grid: Grid, *, strategy: str, fixed: dict[str, str], cfg: Config,
          days: list[dt.date], ticks: int,
          progress: Callable[[], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Every combination over every tick, ranked (``grid_report``)."""
    combos = grid.combinations()
    tasks = [Task(i, c) for i, c in enumerate(combos)]
    results = runner.run(tasks, progress)
    _check(results, tasks)
    return grid_report(grid, rank(grid, combos, results), strategy=strategy, fixed=fixed, cfg=cfg,
                       days=days, ticks=ticks)  # fmt: skip


def grid_report(grid: Grid, rows: list[dict[str, Any]], *, strategy: str, fixed: dict[str, str],
                cfg: Config, days: list[dt.date], ticks: int) -> dict[str, Any]:  # fmt: skip
    return {
        "strategy": strategy,
        "grid": grid.as_dict(),
        "fixed_params": fixed,
        "combinations": grid.size,
        "cost_rate": cfg.risk.cost_rate,
        "ticks": ticks,
        "days": [days[0].isoformat(), days[-1].isoformat()] if days else [],
        "ranked_by": "net_pnl (gross less turnover x cost_rate), ties by the parameter values",
        "results": rows,
    }


def _money(v: float) -> str:
    return f"{v:,.2f}"


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()  # fmt: skip

    return [line(headers), *(line(r) for r in rows)]


def render_grid(report: dict[str, Any], top: int = 0) -> str:
    """The ranked table (all rows, or the best ``top``)."""
    names = list(report["grid"])
    rows = report["results"]
    shown = rows[:top] if top else rows
    days = report["days"]
    span = f"{days[0]} → {days[1]}" if days and days[0] != days[1] else (days[0] if days else "")
    head = [
        f"grid  {report['strategy']}  {report['combinations']} combinations ({' x '.join(names)}), "
        f"{report['ticks']:,} ticks, {span}",
        f"  ranked by net PnL after costs (turnover x {report['cost_rate']}); equal nets by parameter values",
    ]
    if report["fixed_params"]:
        head.append(f"  fixed: {params_text(report['fixed_params'])}")
    notes = any(r["halted"] or r["errors"] for r in shown)
    headers = ["rank", *names, "net PnL", "gross PnL", "cost", "max DD", "trades"]
    headers += ["note"] if notes else []
    body = []
    for r in shown:
        money = [_money(r[k]) for k in ("net_pnl", "gross_pnl", "cost", "max_drawdown")]
        cells = [str(r["rank"]), *(_fmt(r["params"][n]) for n in names), *money, str(r["trades"])]
        if notes:
            cells.append(_note(r))
        body.append(cells)
    right = set(range(len(headers) - 1 if notes else len(headers)))  # all but the note
    lines = [*head, "", *_table(headers, body, right)]
    if len(shown) < len(rows):
        lines.append(f"  … and {len(rows) - len(shown)} more (see --json)")
    return "\n".join(lines)


def _note(r: dict[str, Any]) -> str:
    if r["halted"]:
        return f"halted: {r['halted']}"
    return f"strategy errors: {r['errors']}" if r["errors"] else ""


# --------------------------------------------------------------------------- walk-forward


@dataclass(frozen=True)
class Fold:
    number: int
    in_days: tuple[dt.date, ...]
    out_days: tuple[dt.date, ...]


def make_folds(days: Sequence[dt.date], k: int, anchored: bool) -> list[Fold]:
    """K folds over ``days`` split into K+1 consecutive blocks (the first ones a day longer when
    the days do not divide evenly)."""
    if k < 1:
        raise GridError(f"--walk-forward: K must be at least 1, got {k}")
    if len(days) < k + 1:
        have = f"{len(days)} trading day{'s' if len(days) != 1 else ''}"
        raise GridError(f"--walk-forward {k} needs at least {k + 1} trading days (K in-sample windows and "
                        f"the out-of-sample day after each); the ticks cover {have}")  # fmt: skip
    size, extra = divmod(len(days), k + 1)
    blocks: list[tuple[dt.date, ...]] = []
    start = 0
    for i in range(k + 1):
        stop = start + size + (1 if i < extra else 0)
        blocks.append(tuple(days[start:stop]))
        start = stop
    folds = []
    for i in range(k):
        ins = tuple(d for b in blocks[: i + 1] for d in b) if anchored else blocks[i]
        folds.append(Fold(i + 1, ins, blocks[i + 1]))
    return folds


def walk_forward(runner: Runner, store: TickStore, grid: Grid, folds: list[Fold], *,
                 strategy: str, fixed: dict[str, str], cfg: Config, anchored: bool,
                 progress: Callable[[], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Optimise on each fold's in-sample days, test the winner on its out-of-sample days."""
    combos = grid.combinations()
    n = len(combos)
    ins_tasks = [Task(f_i * n + c_i, combo, tuple(store.day_ranges(fold.in_days)))
                 for f_i, fold in enumerate(folds) for c_i, combo in enumerate(combos)]  # fmt: skip
    ins = runner.run(ins_tasks, progress)
    winners: list[dict[str, Any]] = []
    for f_i, fold in enumerate(folds):
        part = slice(f_i * n, (f_i + 1) * n)
        _check(ins[part], ins_tasks[part], f"fold {fold.number} in-sample")
        winners.append(rank(grid, combos, ins[part])[0])
    oos_tasks = [Task(f_i, w["params"], tuple(store.day_ranges(fold.out_days)), curve=True)
                 for f_i, (fold, w) in enumerate(zip(folds, winners, strict=True))]  # fmt: skip
    oos = runner.run(oos_tasks, progress)
    for fold, res, task in zip(folds, oos, oos_tasks, strict=True):
        _check([res], [task], f"fold {fold.number} out-of-sample")
    fold_rows: list[dict[str, Any]] = []
    curve: list[list[Any]] = []
    total = Decimal(0)
    for fold, w, res in zip(folds, winners, oos, strict=True):
        fold_rows.append({
            "fold": fold.number,
            "in_sample": {"days": _span(fold.in_days), "n_days": len(fold.in_days),
                          "best_params": w["params"], "net_pnl": w["net_pnl"], "trades": w["trades"]},
            "out_of_sample": {"days": _span(fold.out_days), "n_days": len(fold.out_days),
                              **{k: res[k] for k in SUMMARY_KEYS}},
        })  # fmt: skip
        curve.extend([when, float(total) + eq] for when, eq in res["equity_curve"])
        total += Decimal(repr(res["net_pnl"]))  # exact: the folds' nets add up to the paisa
    return {
        "strategy": strategy,
        "mode": "anchored" if anchored else "rolling",
        "grid": grid.as_dict(),
        "fixed_params": fixed,
        "combinations": grid.size,
        "cost_rate": cfg.risk.cost_rate,
        "folds": fold_rows,
        "out_of_sample_total": {
            "net_pnl": float(total),
            "trades": sum(r["out_of_sample"]["trades"] for r in fold_rows),
            "folds_positive": sum(1 for r in fold_rows if r["out_of_sample"]["net_pnl"] > 0),
        },
        "stability": stability(grid, [w["params"] for w in winners]),
        "equity_curve": curve,
    }


def _span(days: tuple[dt.date, ...]) -> list[str]:
    return [days[0].isoformat(), days[-1].isoformat()]


def stability(grid: Grid, winners: list[dict[str, Any]]) -> dict[str, Any]:
    """How often each winning combination repeats, and how each parameter's winners spread."""
    combos = [tuple(w[n] for n in grid.names) for w in winners]
    counts: Counter[tuple[Any, ...]] = Counter(combos)
    repeats = [
        {"params": dict(zip(grid.names, combo, strict=True)),
         "folds": [i + 1 for i, c in enumerate(combos) if c == combo]}
        for combo, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    ]  # fmt: skip
    per_param: dict[str, Any] = {}
    for name in grid.names:
        chosen = [w[name] for w in winners]
        tally: Counter[Any] = Counter(chosen)
        mode, mode_n = min(tally.items(), key=lambda kv: (-kv[1], kv[0]))
        entry: dict[str, Any] = {"winners": chosen, "mode": mode, "mode_folds": mode_n,
                                 "distinct": len(tally)}  # fmt: skip
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in chosen):
            entry.update(min=min(chosen), max=max(chosen), spread=round(max(chosen) - min(chosen), 10))
        per_param[name] = entry
    return {"combinations": repeats, "parameters": per_param}


def render_walk_forward(report: dict[str, Any]) -> str:
    folds = report["folds"]
    mode = report["mode"]
    window = ("in-sample from the first day to the fold" if mode == "anchored"
              else "in-sample window moves forward one block a fold")  # fmt: skip
    lines = [
        f"walk-forward  {report['strategy']}  {len(folds)} folds, {mode} ({window}); "
        f"{report['combinations']} combinations ({' x '.join(report['grid'])}) per fold",
        f"  best in-sample = highest net PnL after costs (turnover x {report['cost_rate']})",
    ]
    if report["fixed_params"]:
        lines.append(f"  fixed: {params_text(report['fixed_params'])}")
    headers = ["fold", "in-sample days", "best params", "in-sample net", "out-of-sample days",
               "out-of-sample net", "trades"]  # fmt: skip
    body = [[str(f["fold"]), _days_text(f["in_sample"]), params_text(f["in_sample"]["best_params"]),
             _money(f["in_sample"]["net_pnl"]), _days_text(f["out_of_sample"]),
             _money(f["out_of_sample"]["net_pnl"]), str(f["out_of_sample"]["trades"])]
            for f in folds]  # fmt: skip
    lines += ["", *_table(headers, body, {0, 3, 5, 6})]
    t = report["out_of_sample_total"]
    lines += ["", f"out-of-sample total  net PnL {_money(t['net_pnl'])}, {t['trades']} trades, "
                  f"{t['folds_positive']} of {len(folds)} folds positive"]  # fmt: skip
    st = report["stability"]
    lines.append("parameter stability")
    for c in st["combinations"]:
        lines.append(f"  {params_text(c['params'])}  won {len(c['folds'])} of {len(folds)} folds "
                     f"({', '.join(map(str, c['folds']))})")  # fmt: skip
    for name, p in st["parameters"].items():
        tally = Counter(p["winners"])
        text = ", ".join(f"{_fmt(v)} x{n}" for v, n in sorted(tally.items(), key=lambda kv: (-kv[1], kv[0])))
        spread = (f"; range {_fmt(p['min'])}..{_fmt(p['max'])} (spread {_fmt(p['spread'])})"
                  if "spread" in p else "")  # fmt: skip
        lines.append(f"  {name}: {text}{spread}")
    return "\n".join(lines)


def _days_text(part: dict[str, Any]) -> str:
    a, b = part["days"]
    return f"{a} ({part['n_days']} d)" if a == b else f"{a}..{b} ({part['n_days']} d)"


def write_walk_forward_png(report: dict[str, Any], path: Path) -> Path:
    """The out-of-sample equity (net, after costs), fold after fold, as a PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report["equity_curve"]
    ys = [eq for _, eq in curve]
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    try:
        # one x step per point: the nights and weekends between folds would otherwise fill the chart
        xs = list(range(len(ys)))
        ax.plot(xs, ys, color="#1f6feb", linewidth=1.2, drawstyle="steps-post")
        ax.fill_between(xs, ys, 0, step="post", alpha=0.15, color="#1f6feb")
        ax.axhline(0, color="#888888", linewidth=0.8)
        starts = _fold_starts(report)
        for number, x in starts:
            ax.axvline(x, color="#d29922", linewidth=0.8, linestyle="--")
            ax.annotate(f"fold {number}", (x, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", fontsize=8, color="#9a6700")  # fmt: skip
        ticks = [x for _, x in starts]
        ax.set_xticks(ticks, [curve[x][0][:10] for x in ticks] if curve else [])
        t = report["out_of_sample_total"]
        ax.set_title(f"{report['strategy']} walk-forward ({report['mode']}, {len(report['folds'])} "
                     f"folds): out-of-sample net PnL {t['net_pnl']:,.2f} after costs, "
                     f"{t['trades']} trades")  # fmt: skip
        ax.set_ylabel("net equity (₹)")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", metadata={"Software": None})
    finally:
        plt.close(fig)
    return path


def _fold_starts(report: dict[str, Any]) -> list[tuple[int, int]]:
    """(fold number, index of its first point in the curve): the first point on or after its first day."""
    curve = report["equity_curve"]
    out = []
    for f in report["folds"]:
        first = f["out_of_sample"]["days"][0]
        x = next((i for i, (when, _) in enumerate(curve) if when[:10] >= first), len(curve) - 1)
        out.append((f["fold"], x))
    return out
