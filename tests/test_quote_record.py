"""The one quote record: a PricedBatch, its columns (`batch_to_columns` / `batch_from_columns`) and what is
built on them: the spool's bytes (those of earlier versions still replay), the memory store and the
PostgreSQL read-back, which return the same domain record."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pricer.audit import AuditTrail, Spool, encode_record, scan
from pricer.audit_spool import LOCK_FILE
from pricer.endpoints.views import quote_response
from pricer.models import BorrowStatus, FeeType, RateSource
from pricer.quotes import PricedBatch, TickerRate, batch_from_columns, batch_to_columns
from pricer.schemas import FeeScheduleView
from pricer.stores.memory import MemoryQuoteStore
from pricer.stores.postgres.audit import PgQuoteStore
from tests.pg import pg_stores

pytestmark = pytest.mark.anyio

T0 = dt.datetime(2026, 3, 2, 14, 30, 15, 123456, tzinfo=dt.UTC)


def _column(*values: int) -> np.ndarray[tuple[int], np.dtype[np.int64]]:
    return np.array(values, dtype=np.int64)


AAPL = TickerRate(
    ticker="AAPL",
    rate_units=300_000,
    base_rate=0.0025,
    volatility_index=20.0,
    volatility_adjustment=0.2,
    event_risk_factor=0,
    event_adjustment=0.0,
    min_rate_units=10_000,
    borrow_status=BorrowStatus.EASY,
    source=RateSource.AVAILABILITY_FILE,
    available_shares=10_000_000,
    as_of=T0,
)
GME = TickerRate(
    ticker="GME",
    rate_units=36_461_880,
    base_rate=0.303849,
    volatility_index=20.0,
    volatility_adjustment=0.2,
    event_risk_factor=6,
    event_adjustment=0.03,
    min_rate_units=10_000,
    borrow_status=BorrowStatus.HARD,
    source=RateSource.FALLBACK,
    available_shares=None,
    as_of=T0 - dt.timedelta(days=1),
)
# A two-row batch and a single quote, and the spool bytes the version before the one quote record wrote
# for them (encode_record of the batch, then of the single quote in its compact form).
EARLIER_BATCH = PricedBatch(
    batch_id="0123456789abcdef01234567",
    calculated_at=T0,
    request_id="req-1",
    client_id="client_1",
    key_id=None,
    fee_schedule=FeeScheduleView(5.0, FeeType.PERCENTAGE, 0.25, 360),
    rates=[AAPL, GME],
    rate_index=_column(1, 0),
    input_index=_column(0, 2),
    position_cents=_column(10_000_000, 100_137),
    loan_days=_column(30, 365),
    borrow_cost=_column(123_456, 789),
    markup=_column(6_173, 39),
    transaction_fees=_column(2_500, 2_500),
    total_fee=_column(132_129, 3_328),
)
EARLIER_SINGLE = PricedBatch(
    batch_id="fedcba9876543210fedcba98",
    calculated_at=T0 + dt.timedelta(seconds=1),
    request_id="req-2",
    client_id="client_2",
    key_id="k1a2b3c4",
    fee_schedule=FeeScheduleView(0.0, FeeType.FLAT, 25.0, 365),
    rates=[AAPL],
    rate_index=_column(0),
    input_index=_column(0),
    position_cents=_column(5_000_000),
    loan_days=_column(7),
    borrow_cost=_column(288),
    markup=_column(0),
    transaction_fees=_column(2_500),
    total_fee=_column(2_788),
)
EARLIER_SPOOL_BYTES = bytes.fromhex(
    "50524101000002b4a96fa5cc9fb8303132333435363738396162636465663031323334353637d7ff1d6f280069a59ef7"
    "a57265712d31a8636c69656e745f31c084b16d61726b75705f70657263656e74616765cb4014000000000000b4747261"
    "6e73616374696f6e5f6665655f74797065aa50455243454e54414745b27472616e73616374696f6e5f616d6f756e74cb"
    "3fd0000000000000a96461795f636f756e74cd0168928ca67469636b6572a44141504caa726174655f756e697473ce00"
    "0493e0a9626173655f72617465cb3f647ae147ae147bb0766f6c6174696c6974795f696e646578cb4034000000000000"
    "b5766f6c6174696c6974795f61646a7573746d656e74cb3fc999999999999ab16576656e745f7269736b5f666163746f"
    "7200b06576656e745f61646a7573746d656e74cb0000000000000000ae6d696e5f726174655f756e697473cd2710ad62"
    "6f72726f775f737461747573a445415359a6736f75726365b1617661696c6162696c6974795f66696c65b0617661696c"
    "61626c655f736861726573ce00989680a561735f6f66d7ff1d6f280069a59ef78ca67469636b6572a3474d45aa726174"
    "655f756e697473ce022c5d38a9626173655f72617465cb3fd37243137b0707b0766f6c6174696c6974795f696e646578"
    "cb4034000000000000b5766f6c6174696c6974795f61646a7573746d656e74cb3fc999999999999ab16576656e745f72"
    "69736b5f666163746f7206b06576656e745f61646a7573746d656e74cb3f9eb851eb851eb8ae6d696e5f726174655f75"
    "6e697473cd2710ad626f72726f775f737461747573a448415244a6736f75726365a866616c6c6261636bb0617661696c"
    "61626c655f736861726573c0a561735f6f66d7ff1d6f280069a44d7792010092000292ce00989680ce00018729921ecd"
    "016d92ce0001e240cd031592cd181d2792cd09c4cd09c492ce00020421cd0d0050524101000001b09c218ab49fb86665"
    "64636261393837363534333231306665646362613938d7ff1d6f280069a59ef8a57265712d32a8636c69656e745f32a8"
    "6b3161326233633484b16d61726b75705f70657263656e74616765cb0000000000000000b47472616e73616374696f6e"
    "5f6665655f74797065a4464c4154b27472616e73616374696f6e5f616d6f756e74cb4039000000000000a96461795f63"
    "6f756e74cd016d918ca67469636b6572a44141504caa726174655f756e697473ce000493e0a9626173655f72617465cb"
    "3f647ae147ae147bb0766f6c6174696c6974795f696e646578cb4034000000000000b5766f6c6174696c6974795f6164"
    "6a7573746d656e74cb3fc999999999999ab16576656e745f7269736b5f666163746f7200b06576656e745f61646a7573"
    "746d656e74cb0000000000000000ae6d696e5f726174655f756e697473cd2710ad626f72726f775f737461747573a445"
    "415359a6736f75726365b1617661696c6162696c6974795f66696c65b0617661696c61626c655f736861726573ce0098"
    "9680a561735f6f66d7ff1d6f280069a59ef79100910091ce004c4b40910791cd0120910091cd09c491cd0ae4"
)


# ---- random batches ---------------------------------------------------------------------------------

# Values the audit tables hold: money to numeric(14, 2) / numeric(16, 2), rates to numeric(12, 8),
# fee schedules to 4 decimals, times to the microsecond.
_moments = st.datetimes(
    min_value=dt.datetime(1990, 1, 1), max_value=dt.datetime(2100, 1, 1), timezones=st.just(dt.UTC)
)
_finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12)


@st.composite
def ticker_rates(draw: st.DrawFn) -> TickerRate:
    return TickerRate(
        ticker=draw(st.from_regex(r"[A-Z]{1,5}( [A-Z])?", fullmatch=True)),
        rate_units=draw(st.integers(0, 10**12 - 1)),
        base_rate=draw(_finite),
        volatility_index=draw(_finite),
        volatility_adjustment=draw(_finite),
        event_risk_factor=draw(st.integers(0, 100)),
        event_adjustment=draw(_finite),
        min_rate_units=draw(st.integers(0, 10**12 - 1)),
        borrow_status=draw(st.sampled_from(BorrowStatus)),
        source=draw(st.sampled_from(RateSource)),
        available_shares=draw(st.none() | st.integers(0, 2**62)),
        as_of=draw(_moments),
    )


@st.composite
def priced_batches(draw: st.DrawFn, *, max_size: int = 12) -> PricedBatch:
    rates = draw(st.lists(ticker_rates(), min_size=1, max_size=4))
    size = draw(st.integers(1, max_size))

    def column(low: int, high: int) -> np.ndarray[tuple[int], np.dtype[np.int64]]:
        return np.array(draw(st.lists(st.integers(low, high), min_size=size, max_size=size)), dtype=np.int64)

    money = 10**14 - 1  # cents in numeric(16, 2)
    return PricedBatch(
        batch_id=draw(st.binary(min_size=12, max_size=12)).hex(),
        calculated_at=draw(_moments),
        request_id=draw(_text),
        client_id=draw(_text),
        key_id=draw(st.none() | _text),
        fee_schedule=FeeScheduleView(
            markup_percentage=draw(st.integers(0, 10**6)) / 10_000,
            transaction_fee_type=draw(st.sampled_from(FeeType)),
            transaction_amount=draw(st.integers(0, 10**10)) / 10_000,
            day_count=draw(st.sampled_from([360, 365, 366])),
        ),
        rates=rates,
        rate_index=column(0, len(rates) - 1),
        input_index=column(0, 2**62),
        position_cents=column(1, 10**12 - 1),
        loan_days=column(1, 365),
        borrow_cost=column(-money, money),
        markup=column(-money, money),
        transaction_fees=column(-money, money),
        total_fee=column(-money, money),
    )


# ---- the column functions ---------------------------------------------------------------------------


@given(priced_batches())
def test_a_batch_through_its_columns_is_the_same_batch(batch: PricedBatch) -> None:
    columns = batch_to_columns(batch)
    again = batch_from_columns(columns)
    assert again == batch
    assert batch_to_columns(again) == columns
    for name in ("rate_index", "input_index", "position_cents", "total_fee"):
        column = getattr(again, name)
        assert column.dtype == np.int64
        assert column.tolist() == getattr(batch, name).tolist()
    # The spool's record of it reads back as the same batch.
    found = scan(encode_record(batch) + encode_record(columns))
    assert found.batches == [batch, batch]
    assert found.unreadable_bytes == 0


def test_a_batch_differs_from_one_with_another_value() -> None:
    changed = batch_from_columns(batch_to_columns(EARLIER_BATCH))
    changed.total_fee[1] += 1
    assert changed != EARLIER_BATCH
    assert EARLIER_BATCH.quote(1).batch != EARLIER_BATCH.quote(0).batch


# ---- the spool's bytes -------------------------------------------------------------------------------


def test_the_spool_bytes_of_the_earlier_version_read_as_the_same_batches() -> None:
    found = scan(EARLIER_SPOOL_BYTES)
    assert found.unreadable_bytes == 0
    assert found.batches == [EARLIER_BATCH, EARLIER_SINGLE]
    # ... and this version writes the same bytes for them.
    assert encode_record(EARLIER_BATCH) + encode_record(EARLIER_SINGLE) == EARLIER_SPOOL_BYTES


def test_a_record_with_a_value_beyond_int64_is_unreadable_and_the_rest_is_read() -> None:
    beyond = batch_to_columns(EARLIER_SINGLE)
    beyond.total_fee = [2**63]
    bad = encode_record(beyond)
    found = scan(encode_record(EARLIER_BATCH) + bad + encode_record(EARLIER_SINGLE))
    assert found.batches == [EARLIER_BATCH, EARLIER_SINGLE]
    assert found.unreadable_bytes == len(bad)


async def test_a_spool_of_the_earlier_version_left_by_a_dead_process_replays(tmp_path: Path) -> None:
    """A stopped process's spool directory, written by the earlier version, is adopted and replayed into
    PostgreSQL; every quote in it reads back as priced."""
    orphan = tmp_path / "proc-oldhost-4242-0badcafe"
    orphan.mkdir()
    (orphan / LOCK_FILE).touch()
    (orphan / "spool-000000000000.bin").write_bytes(EARLIER_SPOOL_BYTES)
    async with pg_stores() as (stores, pool, _dsn, _schema):
        trail = AuditTrail(PgQuoteStore(pool), spool=Spool(tmp_path), retry_seconds=0.05)
        trail.start()
        await trail.close()
        assert trail.adopted_spools == 1
        for batch in (EARLIER_BATCH, EARLIER_SINGLE):
            for row in range(batch.size):
                got = await stores.quotes.get(batch.quote_id(row))
                assert got == batch.quote(row)
                assert got is not None
                assert quote_response(got) == quote_response(batch.quote(row))
    assert not os.listdir(tmp_path)  # replayed and removed


# ---- the stores return the same domain record -------------------------------------------------------


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(priced_batches(), min_size=1, max_size=6, unique_by=lambda batch: batch.batch_id))
async def test_memory_and_postgresql_read_back_the_same_record(batches: list[PricedBatch]) -> None:
    memory = MemoryQuoteStore(10_000)
    async with pg_stores() as (stores, _pool, _dsn, _schema):
        for batch in batches:
            await memory.add(batch)
            await stores.quotes.add(batch)
        for batch in batches:
            for row in range(batch.size):
                from_memory = await memory.get(batch.quote_id(row))
                from_database = await stores.quotes.get(batch.quote_id(row))
                assert from_memory == from_database == batch.quote(row)
                assert from_memory is not None
                assert from_database is not None
                assert quote_response(from_memory) == quote_response(from_database)
                assert from_database.quote_id == batch.quote_id(row)
