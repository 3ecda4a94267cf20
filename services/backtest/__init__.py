"""Backtests: recorded ticks through the same strategy, risk and execution logic, in-process."""
