"""NeoPulse benchmarks (not installed with the package; run from a source checkout)."""
