"""Demo data for the embedded default: a few tickers, clients and two keys, random at each start."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from pricer.auth.keys import KeyHasher, make_record, new_key
from pricer.marketdata.loaders import parse_availability
from pricer.marketdata.service import MarketDataWriter
from pricer.models import BorrowStatus, Client, FeeType, MarketEvent, Scope, Stock
from pricer.stores.protocols import Stores

DEMO_CLIENT_ID = "demo_client"
ADMIN_CLIENT_ID = "admin"


@dataclass(frozen=True, slots=True)
class DemoKeys:
    client_key: str
    admin_key: str


# The demo file is stamped before every real file in ../shared/data, so that loading one of those puts it
# in force (the newest #BOF wins). /health/detailed reports the demo data as stale, which it is.
DEMO_AVAILABILITY_STAMP = "#BOF|2021.06.01|16:00:00"


def demo_availability_text() -> str:
    """The packaged demo availability file (IBKR format)."""
    template = files("pricer.demo").joinpath("availability.txt").read_text()
    return template.replace("#BOF|DATE|TIME", DEMO_AVAILABILITY_STAMP)


async def seed_demo(stores: Stores, hasher: KeyHasher, now: dt.datetime) -> DemoKeys:
    clients = [
        Client(
            client_id=DEMO_CLIENT_ID,
            markup_percentage=5.0,
            transaction_fee_type=FeeType.FLAT,
            transaction_amount=25.0,
            updated_at=now,
        ),
        Client(
            client_id="xyz123",
            markup_percentage=5.0,
            transaction_fee_type=FeeType.FLAT,
            transaction_amount=25.0,
            updated_at=now,
        ),
        Client(
            client_id="pct_client",
            markup_percentage=10.0,
            transaction_fee_type=FeeType.PERCENTAGE,
            transaction_amount=0.05,
            day_count=360,
            updated_at=now,
        ),
        Client(
            client_id=ADMIN_CLIENT_ID,
            markup_percentage=0.0,
            transaction_fee_type=FeeType.FLAT,
            transaction_amount=0.0,
            updated_at=now,
        ),
    ]
    for client in clients:
        await stores.clients.put(client)
    writer = MarketDataWriter(stores)
    await writer.add_availability(parse_availability(demo_availability_text(), loaded_at=now))
    await writer.put_stock(
        Stock(ticker="AAPL", min_borrow_rate=0.0025, borrow_status=BorrowStatus.EASY, updated_at=now)
    )
    await writer.put_stock(Stock(ticker="ACME", min_borrow_rate=0.02, updated_at=now))
    await writer.replace_events("GME", [MarketEvent(date=now.date() + dt.timedelta(days=2), type="earnings")])

    expires = now + dt.timedelta(days=90)
    keys = []
    for client_id, scopes in ((DEMO_CLIENT_ID, {Scope.QUOTE, Scope.RATES}), (ADMIN_CLIENT_ID, {Scope.ADMIN})):
        _, key = new_key()
        await stores.keys.put(
            make_record(hasher, key, client_id=client_id, scopes=scopes, now=now, expires_at=expires)
        )
        keys.append(key)
    return DemoKeys(client_key=keys[0], admin_key=keys[1])


def announce_demo_keys(keys: DemoKeys, path: str | None, base_url: str) -> None:
    """Print the demo keys once and write them where the README's curl lines read them."""
    lines = [
        f"DEMO_CLIENT_KEY={keys.client_key}",
        f"DEMO_ADMIN_KEY={keys.admin_key}",
        f"PRICER_URL={base_url}",
    ]
    if path:
        target = Path(path)
        target.write_text("\n".join(lines) + "\n")
        os.chmod(target, 0o600)
    where = f" (also written to {path})" if path else ""
    print(
        "Demo data loaded; demo API keys, random at each start" + where + ":\n"
        f"  client {DEMO_CLIENT_ID} (quote, rates): {keys.client_key}\n"
        f"  client {ADMIN_CLIENT_ID} (admin):          {keys.admin_key}",
        flush=True,
    )
