-- 003_live_sources: what the live market-data providers answered (DESIGN §3.1, issue 20).
--
-- lender_rates: the lender API's latest answer per ticker. rate NULL means the lender answered 404 (it
-- does not know the ticker); fetched_at is when the answer arrived (the quote's as_of, and its age
-- decides whether the rate is still in force: SOURCE_MAX_AGE_SECONDS).
CREATE TABLE lender_rates (
    ticker     text PRIMARY KEY CHECK (length(ticker) BETWEEN 1 AND 10),
    rate       numeric CHECK (rate >= 0),
    status     text CHECK (status IN ('EASY', 'MEDIUM', 'HARD')),
    fetched_at timestamptz NOT NULL,
    stored_at  timestamptz NOT NULL DEFAULT now()
);

-- Tickers quoted lately on any replica: the refresher keeps them fresh with the stock records' tickers.
CREATE TABLE source_quoted_tickers (
    ticker    text PRIMARY KEY,
    quoted_at timestamptz NOT NULL
);
CREATE INDEX source_quoted_tickers_by_time ON source_quoted_tickers (quoted_at);

-- Each provider's state as the elected refresher last saw it (breaker, last good answer, latency), so
-- that every replica's /health/detailed and metrics tell the same story.
CREATE TABLE source_status (
    provider   text PRIMARY KEY,
    status     jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
