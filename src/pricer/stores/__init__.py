"""Backends behind small Protocols: in-memory (embedded default) and PostgreSQL, chosen by configuration."""

from pricer.stores.protocols import (
    AvailabilityStore,
    ClientStore,
    EventStore,
    KeyStore,
    QuoteStore,
    StockStore,
    Stores,
    VolatilityStore,
)

__all__ = [
    "AvailabilityStore",
    "ClientStore",
    "EventStore",
    "KeyStore",
    "QuoteStore",
    "StockStore",
    "Stores",
    "VolatilityStore",
]
