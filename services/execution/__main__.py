"""``python -m services.execution [--live]``: the only process that places orders.

With ``execution.broker=kotak`` it refuses to start (exit 2) unless ``--live`` is given or
``NEOPULSE_LIVE=1`` is set: real money needs an explicit yes.
"""

from __future__ import annotations

import argparse
import sys

from libs.common.service import EXIT_CONFIG, VERBOSE_HELP, load_config_or_exit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m services.execution", description="NeoPulse execution: ledger, broker, OCO, flatten."
    )
    parser.add_argument(
        "--live",
        action="store_true",
        help="allow real orders when execution.broker=kotak (or set NEOPULSE_LIVE=1)",
    )
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    args = parser.parse_args(argv)
    cfg = load_config_or_exit(verbose=args.verbose)

    from services.execution.service import ExecutionService, live_guard

    why = live_guard(cfg, args.live)
    if why is not None:
        print(why, file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)
    from libs.common.config import ConfigError

    try:
        svc = ExecutionService(cfg, live=args.live)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    raise SystemExit(svc.run())


if __name__ == "__main__":
    main()
