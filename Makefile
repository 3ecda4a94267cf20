# NeoPulse — every target sets up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test lint bench fuzz chaos soak clean-venv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

## make up: run the whole pipeline in paper mode (embedded PostgreSQL, simulated feed).
## Refused (one line naming the port and the running stack's pids, exit 2) while a stack runs in
## this NEOPULSE_HOME or a port is taken; `neopulse stop` stops a stack from another terminal.
up: $(STAMP)
	@$(BIN)/neopulse preflight
	PATH="$(CURDIR)/$(BIN):$$PATH" NEOPULSE_SUPERVISED=1 $(BIN)/honcho -f Procfile start

## make test: run every test (unit, integration, e2e)
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

## make lint: ruff, and mypy strict on libs and services
lint: $(STAMP)
	$(BIN)/ruff check libs services tests benchmarks
	$(BIN)/mypy

## make bench: the benchmarks in about a minute, each figure beside its target (feed >= 200k
## ticks/s with no gaps, execution >= 1,000 orders/s, backtest >= 100k ticks per CPU-second
## (momentum; ema_cross on 1 s bars >= 250k, ema_cross and macd on 5 s bars >= 300k),
## tick -> durable paper order p50 <= 2x the raw floor, p99 <= 3 ms and <= 2x the floor's p99,
## the multi-process path p50 <= 1.3x / p99 <= 1.5x the same path in one process; a 9-backtest
## grid's speedup with --jobs 2 over --jobs 1, reported without a target)
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean-venv:
	rm -rf $(VENV)

## make fuzz: 100,000 hostile requests and tick frames at real risk and execution processes (FUZZ_ARGS="--cases N --seed S")
fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzz_bus $(FUZZ_ARGS)

## make chaos: 100 SIGKILLs of feed, strategies, risk, execution and PostgreSQL under a trading
## paper stack, then the ledger against the broker's book; prints a table and the seed, exits 1
## on any violation (CHAOS_ARGS="--kills N --seconds S --seed S --keep")
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos $(CHAOS_ARGS)

## make soak: the paper stack for 30 min at 5,000 ticks/s with momentum trading; checks RSS growth,
## tick -> ack p99 drift, log rotation and disk growth, prints a table and the seed, exits 1 on any
## violation (SOAK_ARGS="--minutes M --rate R --seed S --keep")
soak: $(STAMP)
	$(BIN)/python -m tests.soak $(SOAK_ARGS)
