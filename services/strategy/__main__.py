"""``python -m services.strategy`` — strategy processes.

    python -m services.strategy                       every [[strategy]] instance, one child each
    python -m services.strategy momentum --id mom1    one instance
    python -m services.strategy macd --id m2 --param fast=8 --param slow=21 --instruments INFY-EQ

An instance named with ``--id`` takes its params, instruments and on_error from the
matching ``[[strategy]]`` entry when there is one; ``--param`` and ``--instruments`` override.
"""

from __future__ import annotations

import argparse
import sys

from libs.common.config import ConfigError, StrategyInstance
from libs.common.service import EXIT_CONFIG, VERBOSE_HELP, load_config_or_exit


def parse_params(pairs: list[str]) -> dict[str, object]:
    """``["k=v", ...]`` → dict (values stay strings; the Params Struct converts them)."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"config error: --param expects key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.strategy",
        description="Run strategy instances (all configured ones without NAME).",
    )
    parser.add_argument("name", nargs="?", help="strategy name (momentum, macd) or package.module:Class")
    parser.add_argument("--id", dest="sid", help="instance id (default: the name)")
    parser.add_argument("--param", action="append", default=[], metavar="K=V", help="parameter override")
    parser.add_argument("--instruments", default="", help="comma-separated symbols or segment|token")
    parser.add_argument("--on-error", choices=("continue", "stop"), default=None)
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    args = parser.parse_args(argv)
    cfg = load_config_or_exit(verbose=args.verbose)
    if args.name is None:
        from services.strategy.supervisor import run_all

        return run_all(cfg)

    from services.strategy.service import StrategyService

    sid = args.sid or args.name.rsplit(":", 1)[-1].lower()
    try:
        entry = next((s for s in cfg.strategy if s.id == sid), None)
        if entry is not None and entry.name != args.name:
            raise ConfigError(
                f"config error: strategy id `{sid}` is configured as `{entry.name}`, not `{args.name}`"
            )
        params = dict(entry.params) if entry else {}
        params.update(parse_params(args.param))
        instruments = [s.strip() for s in args.instruments.split(",") if s.strip()]
        instance = StrategyInstance(
            name=args.name,
            id=sid,
            params=params,
            instruments=instruments or (entry.instruments if entry else []),
            on_error=args.on_error or (entry.on_error if entry else "continue"),
        )
        svc = StrategyService(cfg, instance)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    return svc.run()


if __name__ == "__main__":
    raise SystemExit(main())
