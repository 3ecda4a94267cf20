"""Strategies: the Strategy API, indicators, bars, the built-in strategies and their host."""
