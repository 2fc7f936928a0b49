-- The audit trail in three tables instead of one wide one: what a call shares (time, client, key, request,
-- fee schedule) is stored once per call, a rate snapshot once however many quotes used it, and each priced
-- position is a narrow fixed-width row. A 10^5-position batch then costs the database a third of the work
-- (one small uuid index instead of a text one plus a (client, time) index per row, ~100 bytes a row instead
-- of ~300). The view `quotes` joins them back into the record of 001, column for column.

-- One row per rate snapshot; rate_id is a digest of its contents (computed by the writer), so the same
-- snapshot written twice, by two replicas or a replay, is one row.
CREATE TABLE quote_rates (
    rate_id               uuid PRIMARY KEY,
    ticker                text NOT NULL,
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
    rate_as_of            timestamptz NOT NULL
);

-- One row per priced call. batch_id is the call's 24 hex digits followed by eight zeros: the quote id of
-- its row 0, so that a quote finds its batch by zeroing its row bits.
CREATE TABLE quote_batches (
    batch_id             uuid PRIMARY KEY,
    calculated_at        timestamptz NOT NULL,
    request_id           text NOT NULL,
    client_id            text NOT NULL,
    key_id               text,                       -- NULL when authentication is off
    markup_percentage    numeric(9, 4) NOT NULL,
    transaction_fee_type text NOT NULL,
    transaction_amount   numeric(16, 4) NOT NULL,
    day_count            integer NOT NULL,
    stored_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX quote_batches_by_client ON quote_batches (client_id, calculated_at);

-- One row per priced position. quote_id = the batch's 12 bytes || the row index (4 bytes, big-endian): the
-- API's 32 hex digits, and a batch's rows are one range of the primary key.
CREATE TABLE quote_rows (
    quote_id         uuid PRIMARY KEY,
    input_index      bigint NOT NULL,
    rate_id          uuid NOT NULL,
    loan_days        integer NOT NULL,
    position_value   numeric(14, 2) NOT NULL,
    borrow_cost      numeric(16, 2) NOT NULL,
    markup           numeric(16, 2) NOT NULL,
    transaction_fees numeric(16, 2) NOT NULL,
    total_fee        numeric(16, 2) NOT NULL
);

-- The rows already recorded move over unchanged.
CREATE TEMP TABLE pricer_migrating_quotes ON COMMIT DROP AS
SELECT q.*, md5(concat_ws('|', ticker, borrow_rate, base_rate, volatility_index, volatility_adjustment,
                          event_risk_factor, event_adjustment, min_rate, borrow_status, rate_source,
                          coalesce(available_shares::text, '-'), rate_as_of))::uuid AS rate_id
FROM quotes q;

INSERT INTO quote_rates (rate_id, ticker, borrow_rate, base_rate, volatility_index, volatility_adjustment,
                         event_risk_factor, event_adjustment, min_rate, borrow_status, rate_source,
                         available_shares, rate_as_of)
SELECT DISTINCT ON (rate_id) rate_id, ticker, borrow_rate, base_rate, volatility_index, volatility_adjustment,
       event_risk_factor, event_adjustment, min_rate, borrow_status, rate_source, available_shares, rate_as_of
FROM pricer_migrating_quotes;

INSERT INTO quote_batches (batch_id, calculated_at, request_id, client_id, key_id, markup_percentage,
                           transaction_fee_type, transaction_amount, day_count, stored_at)
SELECT DISTINCT ON (batch_id) (batch_id || '00000000')::uuid, calculated_at, request_id, client_id, key_id,
       markup_percentage, transaction_fee_type, transaction_amount, day_count, stored_at
FROM pricer_migrating_quotes
ORDER BY batch_id, row_index;

INSERT INTO quote_rows (quote_id, input_index, rate_id, loan_days, position_value, borrow_cost, markup,
                        transaction_fees, total_fee)
SELECT quote_id::uuid, input_index, rate_id, loan_days, position_value, borrow_cost, markup, transaction_fees,
       total_fee
FROM pricer_migrating_quotes;

DROP TABLE quotes;

-- The whole record of each priced position, as 001 stored it (for operators and reports; the writer and
-- GET /quotes/{id} use the tables).
CREATE VIEW quotes AS
SELECT
    encode(uuid_send(q.quote_id), 'hex') AS quote_id,
    left(encode(uuid_send(q.quote_id), 'hex'), 24) AS batch_id,
    (get_byte(uuid_send(q.quote_id), 12)::bigint * 16777216 + get_byte(uuid_send(q.quote_id), 13) * 65536
        + get_byte(uuid_send(q.quote_id), 14) * 256 + get_byte(uuid_send(q.quote_id), 15))::integer
        AS row_index,
    q.input_index, b.calculated_at, b.request_id, b.client_id, b.key_id, r.ticker,
    q.position_value, q.loan_days, b.markup_percentage, b.transaction_fee_type, b.transaction_amount,
    b.day_count, r.borrow_rate, r.base_rate, r.volatility_index, r.volatility_adjustment,
    r.event_risk_factor, r.event_adjustment, r.min_rate, r.borrow_status, r.rate_source,
    r.available_shares, r.rate_as_of, q.borrow_cost, q.markup, q.transaction_fees, q.total_fee,
    b.stored_at
FROM quote_rows q
JOIN quote_batches b ON b.batch_id = overlay(q.quote_id::text PLACING '00000000' FROM 29)::uuid
JOIN quote_rates r ON r.rate_id = q.rate_id;
