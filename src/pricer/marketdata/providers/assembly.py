"""The live sources assembled from the settings (`build_live_sources`): the providers, the election,
the lanes; and the lender book the rate computation reads (`lender_book`)."""

from __future__ import annotations

from collections.abc import Callable

from pricer.invalidation import InvalidationBus
from pricer.marketdata.providers.book import LenderBook
from pricer.marketdata.providers.calls import Provider
from pricer.marketdata.providers.election import AdvisoryLockElection, Election, SoleRefresher
from pricer.marketdata.providers.events import NAME as EVENTS
from pricer.marketdata.providers.lender import NAME as LENDER
from pricer.marketdata.providers.refresher import LiveSources, MarketWriter, lane_sizes, log_breaker_change
from pricer.marketdata.providers.volatility import NAME as VOLATILITY
from pricer.observability.metrics import Metrics
from pricer.settings import Role, Settings
from pricer.stores.protocols import SourceStore, Stores

__all__ = ["LenderBook", "LiveSources", "any_configured", "build_live_sources", "lender_book"]


def any_configured(settings: Settings) -> bool:
    return any(
        url is not None
        for url in (settings.lender_api_url, settings.volatility_api_url, settings.event_api_url)
    )


def lender_book(settings: Settings) -> LenderBook | None:
    """The book the rate computation reads: only with a lender configured (else nothing changes)."""
    return LenderBook(settings.source_max_age_seconds) if settings.lender_api_url is not None else None


class _NeverRefresher:
    """A process whose role does not hold market data (ROLE=calculation): it follows the store only."""

    @property
    def is_leader(self) -> bool:
        return False

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def build_live_sources(
    settings: Settings,
    *,
    stores: Stores,
    sources: SourceStore,
    writer: MarketWriter,
    bus: InvalidationBus,
    book: LenderBook | None,
    metrics: Metrics | None,
    invalidate_local: Callable[[], None],
) -> LiveSources | None:
    if not any_configured(settings) or settings.role is Role.GATEWAY:
        return None  # the gateway holds no market data (it asks the data service)
    refreshes = settings.role in (Role.ALL, Role.DATA)  # with ROLE split, the data service holds market data
    election: Election
    if not refreshes:
        election = _NeverRefresher()
    elif settings.database_url is not None:
        shortest = min(
            settings.lender_refresh_seconds,
            settings.volatility_refresh_seconds,
            settings.event_refresh_seconds,
        )
        election = AdvisoryLockElection(
            settings.database_url,
            schema=settings.database_schema,
            check_seconds=max(0.2, min(5.0, shortest / 2)),
        )
    else:
        election = SoleRefresher()
    refresher_lanes, cold_lanes = lane_sizes(settings)
    configured = (
        (LENDER, settings.lender_api_url, settings.lender_api_key),
        (VOLATILITY, settings.volatility_api_url, settings.volatility_api_key),
        (EVENTS, settings.event_api_url, settings.event_api_key),
    )
    providers = {
        name: Provider(
            name,
            url,
            key,
            timeout_seconds=settings.source_timeout_seconds,
            connections=refresher_lanes + cold_lanes,
            metrics=metrics,
            breaker_open_seconds=settings.source_breaker_open_seconds,
            on_breaker_change=log_breaker_change,
        )
        for name, url, key in configured
        if url is not None and refreshes
    }
    live = LiveSources(
        settings,
        stores=stores,
        sources=sources,
        writer=writer,
        bus=bus,
        book=book,
        election=election,
        providers=providers,
        invalidate_local=invalidate_local,
    )
    if metrics is not None:
        metrics.gauge_readers["circuit_breaker_state"].append(live.breaker_states)
        metrics.gauge_readers["market_data_age_seconds"].append(live.ages)
    return live
