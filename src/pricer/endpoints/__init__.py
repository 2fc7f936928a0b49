"""HTTP endpoints: decode and validate, call market data and the pricing core, encode."""
