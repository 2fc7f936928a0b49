"""A batch of quotes as three synchronous steps over picklable values, so that each can run in-process or
in a worker process (the endpoint awaits the asynchronous parts between them: who may act for the client,
its terms, the positions bucket, market data, the audit):

    decode_batch(body: bytes, media: str, *, max_batch_size: int) -> DecodedBatch
        The body (rows or columns, JSON or msgpack) as columns: distinct normalised `tickers`, per row
        `ticker_index` (-1: the row has a validation error, in `errors`), `cents`, `days`; `count` is every
        decoded row (what the positions bucket is charged). InvalidParameter for a whole-request problem.

    price_decoded(decoded: DecodedBatch, terms: FeeTerms, rates: Sequence[TickerRate | None], *,
                  fee_schedule: FeeScheduleView, batch_id: str, key_id: str | None, request_id: str,
                  now: datetime) -> tuple[PricedBatch, list[RowError]]
        The valid rows priced; `rates` is aligned with `decoded.tickers` (None: unknown ticker, whose rows
        come back as TICKER_NOT_FOUND row errors, sorted by index). The record is what the audit stores.

    encode_batch_response(decoded: DecodedBatch, batch: PricedBatch, errors: list[RowError],
                          fee_schedule: FeeScheduleView, *, msgpack: bool) -> bytes
        The response body in the request's form; `errors` is every row error sorted by index
        (`merge_errors(decoded.errors, unknown)`). `encode_batch_parts` (same arguments) gives the body as
        consecutive parts, never joined (the endpoint sends them one by one: a 10^6-row JSON body is 250 MB).

Columnar responses: row j of `columns` (the j-th entry of every column) is the quote whose id is
`batch_id + format(j, "08x")` (PricedBatch.quote_id), read back with GET /api/v1/quotes/{id}; its request
row is `columns.index[j]`.
"""

from pricer.batches.decode import COLUMNS, ROWS, DecodedBatch, decode_batch
from pricer.batches.encode import encode_batch_parts, encode_batch_response
from pricer.batches.price import merge_errors, price_decoded

__all__ = [
    "COLUMNS",
    "ROWS",
    "DecodedBatch",
    "decode_batch",
    "encode_batch_parts",
    "encode_batch_response",
    "merge_errors",
    "price_decoded",
]
