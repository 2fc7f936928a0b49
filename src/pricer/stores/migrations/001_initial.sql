-- 001_initial: the PostgreSQL stores of DESIGN §1 (clients, stocks, market data, API keys, audit trail).
--
-- Runs inside one transaction with the search_path set to the target schema (see pricer.stores.migrate),
-- so no object name is schema-qualified here.
--
-- Number columns hold the exact decimals the engine works with: a float is written as the shortest text
-- that round-trips it (Python's repr) and read back with float(Decimal). Columns whose values come from
-- validated domain bounds have a declared precision; those that carry a market figure of any scale
-- (file fee rates, rate components) are NUMERIC without a typmod, so that no value is ever rounded.
-- Identifiers made of hex digits use COLLATE "C": byte order, whatever the database's collation.

CREATE TABLE clients (
    client_id             text PRIMARY KEY,
    markup_percentage     numeric NOT NULL CHECK (markup_percentage >= 0),
    transaction_fee_type  text NOT NULL CHECK (transaction_fee_type IN ('FLAT', 'PERCENTAGE')),
    transaction_amount    numeric NOT NULL CHECK (transaction_amount >= 0),
    day_count             integer NOT NULL CHECK (day_count > 0),
    active                boolean NOT NULL,
    rate_limit_per_minute integer CHECK (rate_limit_per_minute > 0),
    burst                 integer CHECK (burst > 0),
    updated_at            timestamptz,
    stored_at             timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE stocks (
    ticker          text PRIMARY KEY,
    min_borrow_rate numeric NOT NULL CHECK (min_borrow_rate >= 0),
    borrow_status   text CHECK (borrow_status IN ('EASY', 'MEDIUM', 'HARD')),
    updated_at      timestamptz,
    stored_at       timestamptz NOT NULL DEFAULT now()
);

-- Availability files (DESIGN §3): every load is kept, by its #BOF instant; the newest `as_of` is in
-- force, ties going to the last loaded (the larger id).
CREATE TABLE availability_snapshots (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    as_of     timestamptz NOT NULL,
    loaded_at timestamptz NOT NULL,
    row_count integer NOT NULL CHECK (row_count >= 0),
    stored_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX availability_snapshots_in_force ON availability_snapshots (as_of DESC, id DESC);

-- No FOREIGN KEY on snapshot_id: its per-row check doubles the time of a 17,000-row COPY, and rows are only
-- ever written by the transaction that creates their snapshot (PgAvailabilityStore.add). Pruning a snapshot
-- means deleting its rows too.
CREATE TABLE availability_rows (
    snapshot_id bigint NOT NULL,
    seq         integer NOT NULL,            -- the row's place in the file
    ticker      text NOT NULL CHECK (length(ticker) BETWEEN 1 AND 10),
    fee_rate    numeric CHECK (fee_rate >= 0),       -- FEERATE / 100; NULL for NA
    available   bigint CHECK (available >= 0),       -- NULL for NA
    rebate_rate numeric,                             -- percent, as the file states it; NULL for NA
    name        text NOT NULL,
    currency    text NOT NULL,
    PRIMARY KEY (snapshot_id, ticker)
);

CREATE TABLE volatility_readings (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    value     numeric NOT NULL CHECK (value >= 0),
    as_of     timestamptz NOT NULL,
    source    text NOT NULL,
    stored_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX volatility_readings_latest ON volatility_readings (as_of DESC, id DESC);

CREATE TABLE market_events (
    ticker      text NOT NULL,
    seq         integer NOT NULL,            -- order among the ticker's events (by date, then as given)
    date        date NOT NULL,
    type        text NOT NULL,
    risk_factor smallint CHECK (risk_factor BETWEEN 0 AND 10),   -- NULL: follows the days to the report
    PRIMARY KEY (ticker, seq)
);
CREATE INDEX market_events_by_date ON market_events (ticker, date);

-- API keys: only the HMAC of the secret is kept (DESIGN §2.4).
CREATE TABLE api_keys (
    key_id      text COLLATE "C" PRIMARY KEY,
    client_id   text NOT NULL,
    secret_hash bytea NOT NULL,
    scopes      text[] NOT NULL,
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz
);
CREATE INDEX api_keys_by_client ON api_keys (client_id);

-- The audit trail (DESIGN §4): one row per priced position, enough to rebuild the quote as answered.
-- quote_id = batch_id (24 hex digits) || row_index (8 hex digits).
CREATE TABLE quotes (
    quote_id              text COLLATE "C" PRIMARY KEY CHECK (length(quote_id) = 32),
    batch_id              text COLLATE "C" NOT NULL CHECK (length(batch_id) = 24),
    row_index             integer NOT NULL CHECK (row_index >= 0),
    input_index           bigint NOT NULL,
    calculated_at         timestamptz NOT NULL,
    request_id            text NOT NULL,
    client_id             text NOT NULL,
    key_id                text,                       -- NULL when authentication is off
    ticker                text NOT NULL,
    position_value        numeric(14, 2) NOT NULL,
    loan_days             integer NOT NULL,
    markup_percentage     numeric(9, 4) NOT NULL,
    transaction_fee_type  text NOT NULL,
    transaction_amount    numeric(16, 4) NOT NULL,
    day_count             integer NOT NULL,
    borrow_rate           numeric(12, 8) NOT NULL,
    base_rate             numeric NOT NULL,
    volatility_index      numeric NOT NULL,
    volatility_adjustment numeric NOT NULL,
    event_risk_factor     smallint NOT NULL,
    event_adjustment      numeric NOT NULL,
    min_rate              numeric(12, 8) NOT NULL,
    borrow_status         text NOT NULL,
    rate_source           text NOT NULL,
    available_shares      bigint,
    rate_as_of            timestamptz NOT NULL,
    borrow_cost           numeric(16, 2) NOT NULL,
    markup                numeric(16, 2) NOT NULL,
    transaction_fees      numeric(16, 2) NOT NULL,
    total_fee             numeric(16, 2) NOT NULL,
    stored_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX quotes_by_client ON quotes (client_id, calculated_at);
-- A batch's rows: quote_id LIKE '<batch_id>%' uses the primary key (COLLATE "C"), so batch_id needs no index.
