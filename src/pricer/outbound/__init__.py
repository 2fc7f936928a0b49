"""Calls the engine makes to other services: the gateway's backends and the market-data providers."""
