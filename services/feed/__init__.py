"""The market-data feed: one source (sim, replay or Kotak SFeed) published as ``Tick``s."""
