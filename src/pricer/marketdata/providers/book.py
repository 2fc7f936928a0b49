"""The lender's answers held in process (`LenderBook`): what the rate computation of `MarketData` reads,
a dictionary lookup per ticker and never an await (the request path must not wait on a provider or the
database for a ticker it already has).

Every replica holds the same book: the refresher writes each answer to the store and announces it on the
invalidation bus with the answers themselves (topic `lender`), so a replica applies them before the
`market` message that follows empties its rate caches; at start, after the bus reconnects (`*`) and every
refresh interval a replica merges the store's answers into its book (the newer answer wins).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

import msgspec

from pricer.models import LenderRate

LENDER_TOPIC = "lender"
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(list[LenderRate]).decode


class LenderBook:
    def __init__(self, max_age_seconds: float) -> None:
        self._rates: dict[str, LenderRate] = {}
        self.max_age = dt.timedelta(seconds=max_age_seconds)

    def __len__(self) -> int:
        return len(self._rates)

    def answer(self, ticker: str) -> LenderRate | None:
        """The lender's latest answer for the ticker (rate None: it does not know it), None if never asked."""
        return self._rates.get(ticker)

    def in_force(self, answer: LenderRate | None, now: dt.datetime) -> bool:
        """Whether the answer's rate is the base: it has one, younger than SOURCE_MAX_AGE_SECONDS."""
        return answer is not None and answer.rate is not None and now - answer.fetched_at < self.max_age

    def apply(self, answers: Iterable[LenderRate]) -> bool:
        """Keep the newer of each answer; True when a rate or status changed, or a rate past its max age is
        fresh again (the rate caches must forget)."""
        changed = False
        rates = self._rates
        for answer in answers:
            kept = rates.get(answer.ticker)
            if kept is not None and kept.fetched_at > answer.fetched_at:
                continue
            if (
                kept is None
                or kept.rate != answer.rate
                or kept.status != answer.status
                or kept.fetched_at + self.max_age <= answer.fetched_at  # it had aged out: in force again
            ):
                changed = True
            rates[answer.ticker] = answer
        return changed

    def aged_out_between(self, since: dt.datetime, now: dt.datetime) -> bool:
        """Whether a rate passed SOURCE_MAX_AGE_SECONDS in (since, now] (its quotes must change source)."""
        return any(
            answer.rate is not None and since < answer.fetched_at + self.max_age <= now
            for answer in self._rates.values()
        )


def encode_answers(answers: list[LenderRate]) -> str:
    return _encode(answers).decode()


def decode_answers(text: str) -> list[LenderRate]:
    return _decode(text)
