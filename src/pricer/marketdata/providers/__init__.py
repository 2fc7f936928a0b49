"""Live market data over HTTP (DESIGN §3.1, issue 20): a lender, a volatility index and an event calendar,
each enabled by its URL; with none set nothing here runs and rates come from the files only.

- `validation`: every provider answer checked before use (`BadAnswer`);
- `calls`: one provider's calls (deadline, jittered retries, circuit breaker, lanes, metrics, logs);
- `lender`, `volatility`, `events`: each provider's request and answer;
- `book`: the lender's answers in process, what the rate computation reads (no await);
- `election`: the one refresher per deployment (a PostgreSQL advisory lock);
- `refresher`: `LiveSources`, the refresher, cold fetches, the book in step on every replica, health.

`build_live_sources` assembles them from the settings (None when no provider is configured).
"""

from __future__ import annotations

from collections.abc import Callable

from pricer.invalidation import InvalidationBus
from pricer.marketdata.providers import events, lender, volatility
from pricer.marketdata.providers.book import LenderBook
from pricer.marketdata.providers.calls import Provider
from pricer.marketdata.providers.election import AdvisoryLockElection, Election, SoleRefresher
from pricer.marketdata.providers.refresher import LiveSources, MarketWriter, lane_sizes, log_breaker_change
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
    if not any_configured(settings):
        return None
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
        (lender.NAME, settings.lender_api_url, settings.lender_api_key),
        (volatility.NAME, settings.volatility_api_url, settings.volatility_api_key),
        (events.NAME, settings.event_api_url, settings.event_api_key),
    )
    providers = {
        name: Provider(
            name,
            url,
            key,
            timeout_seconds=settings.source_timeout_seconds,
            connections=refresher_lanes + cold_lanes,
            metrics=metrics,
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
