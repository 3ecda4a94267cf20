"""Historical candles: the chunk plan, Parquet storage and replay as ticks."""
