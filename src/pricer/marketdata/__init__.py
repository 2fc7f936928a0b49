"""Market data: file loaders and the rate inputs gathered for pricing."""
