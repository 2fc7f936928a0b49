"""The borrow-rate pipeline and the locate-fee formula, vectorized and exact.

Exactness strategy (every figure must equal the formula evaluated in `decimal.Decimal`, ties half up):

* Money and rates travel as scaled integers: cents, rate units of 1e-8, percentages in units of 1e-4 %.
  Inputs arrive as binary64 floats whose shortest repr is their decimal text (DESIGN §2); `to_scaled_int`
  turns them into exact integers and tells which ones had too many decimals.
* The locate fee is pure int64 arithmetic. `position × rate × days` can reach 3.65e22, beyond int64, so
  the product is split in two limbs and divided by long division; every intermediate is bounded below
  2^63 for the validated domain (position ≤ 1e9 dollars, rate ≤ 10, days ≤ 366, day count 360-366).
* The rate multiplies a base by two factors that are exact decimals of the policy (computed once per call
  in `Decimal`: 11 event factors, one volatility factor). The product is formed in float64, whose relative
  error is below 5e-16, and rounded to 1e-8 units. Only a product within a tolerance far wider than that
  error of a half-unit tie can round either way; those rows (almost always none) are recomputed exactly
  in `Decimal`. So the result is exact with float speed.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Context, Decimal, DivisionByZero, InvalidOperation, Overflow, localcontext
from typing import Final, NamedTuple, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt

Int64Array = npt.NDArray[np.int64]
Float64Array = npt.NDArray[np.float64]
Int8Array = npt.NDArray[np.int8]
BoolArray = npt.NDArray[np.bool_]

RATE_PLACES: Final = 8
RATE_SCALE: Final = 10**RATE_PLACES
PERCENT_PLACES: Final = 4  # markups and percentage fees: up to 4 decimals of a percent
PERCENT_SCALE: Final = 10**PERCENT_PLACES
MAX_EVENT_RISK: Final = 10
ALLOWED_DAY_COUNTS: Final = (360, 365, 366)

# Borrow status codes used in arrays; -1 means "no stored status".
STATUS_EASY: Final = 0
STATUS_MEDIUM: Final = 1
STATUS_HARD: Final = 2
NO_STATUS: Final = -1
STATUS_NAMES: Final = ("EASY", "MEDIUM", "HARD")
EASY_MAX_BASE: Final = 0.01
MEDIUM_MAX_BASE: Final = 0.10

_RATE_QUANTUM: Final = Decimal(1).scaleb(-RATE_PLACES)
# Relative error bound used to flag possible ties: float64 products here err by < 5e-16 relative;
# 4e-15 leaves an eightfold margin.
_TIE_RELATIVE_TOLERANCE: Final = 4e-15
_LIMB: Final = 10_000
_HALF_INT64_LIMIT: Final = 2**62
# The Decimal steps run in this context, never the calling thread's (whose precision, rounding or traps may be
# anything): a base (≤ 17 significant digits as a repr) times a policy factor (~20 digits) must stay exact.
_DECIMAL_CONTEXT: Final = Context(
    prec=80, rounding=ROUND_HALF_UP, traps=[InvalidOperation, DivisionByZero, Overflow]
)


def to_scaled_int(values: npt.ArrayLike, places: int) -> tuple[Int64Array, BoolArray]:
    """Exact integers `value × 10^places`, and which values had at most `places` decimals.

    A float passes when it is the double nearest to a decimal with at most `places` decimals, i.e. its
    shortest repr has at most that many decimals. Values that are not finite or not below 2^53 / 10^places in
    magnitude are refused (units 0): callers may pass unvalidated input.
    """
    floats = np.asarray(values, dtype=np.float64)
    scale = float(10**places)
    in_range = np.abs(floats) < 2.0**53 / scale  # False for NaN and ±inf
    units = np.rint(np.where(in_range, floats, 0.0) * scale)
    exact = (units / scale == floats) & in_range
    return np.where(exact, units, 0).astype(np.int64), exact


def scaled_int(value: float, places: int) -> int | None:
    """`to_scaled_int` for one value (the same rule in plain Python, without NumPy's per-call cost):
    the exact integer value × 10^places, or None when the value has more decimals or cannot be scaled."""
    scale = float(10**places)
    if not abs(value) < 2.0**53 / scale:  # also refuses NaN and infinities
        return None
    units = round(value * scale)
    return units if units / scale == value else None


class RatePolicy(msgspec.Struct, frozen=True, kw_only=True):
    """The configurable factors of DESIGN §3, as decimal texts so that they stay exact."""

    volatility_factor: str = "0.01"
    volatility_threshold: str = "0"
    event_risk_factor: str = "0.05"
    min_borrow_rate: str = "0.0001"
    max_borrow_rate: str = "10"

    def volatility_adjustment(self, volatility_index: Decimal) -> Decimal:
        excess = max(Decimal(0), volatility_index - Decimal(self.volatility_threshold))
        return Decimal(self.volatility_factor) * excess

    def event_adjustments(self) -> list[Decimal]:
        factor = Decimal(self.event_risk_factor)
        return [Decimal(risk) / 10 * factor for risk in range(MAX_EVENT_RISK + 1)]

    @property
    def min_rate_units(self) -> int:
        return int(Decimal(self.min_borrow_rate).scaleb(RATE_PLACES))

    @property
    def max_rate_units(self) -> int:
        return int(Decimal(self.max_borrow_rate).scaleb(RATE_PLACES))


class RateArrays(msgspec.Struct, frozen=True):
    """The rate of each row with its components; `rate_units` is the rate in 1e-8 (exact)."""

    rate_units: Int64Array
    volatility_adjustment: float
    event_adjustment: Float64Array
    min_rate_units: Int64Array
    status: Int8Array

    @property
    def rate(self) -> Float64Array:
        result: Float64Array = self.rate_units / RATE_SCALE
        return result


def borrow_status_codes(base: Float64Array, stored_status: Int8Array) -> Int8Array:
    """The stored status where set, else from the base rate: EASY ≤ 1 %, MEDIUM ≤ 10 %, HARD above."""
    derived = np.where(
        base <= EASY_MAX_BASE, STATUS_EASY, np.where(base <= MEDIUM_MAX_BASE, STATUS_MEDIUM, STATUS_HARD)
    )
    result: Int8Array = np.where(stored_status >= 0, stored_status, derived).astype(np.int8)
    return result


def price_rates(
    base: npt.ArrayLike,
    event_risk: npt.ArrayLike,
    stock_min_rate_units: npt.ArrayLike,
    stored_status: npt.ArrayLike,
    *,
    volatility_index: Decimal,
    policy: RatePolicy,
) -> RateArrays:
    """Borrow rates of DESIGN §3 for rows of (base, event risk E, the stock's minimum rate, stored status).

    `base` is the annual fee fraction (its decimal text at most 12 significant digits); `event_risk` an
    integer 0-10; `stock_min_rate_units` the stock's own minimum in 1e-8 (0 without a record);
    `stored_status` a status code or -1. `volatility_index` is the market index V, one per call.
    """
    base_arr = np.asarray(base, dtype=np.float64)
    risk = np.asarray(event_risk, dtype=np.int64)
    with localcontext(_DECIMAL_CONTEXT):
        volatility_adjustment = policy.volatility_adjustment(volatility_index)
        event_adjustments = policy.event_adjustments()
        # Exact combined factors (1 + vol_adj)(1 + event_adj), one per possible E.
        factors = [(1 + volatility_adjustment) * (1 + adjustment) for adjustment in event_adjustments]
        max_units = policy.max_rate_units
        policy_min_units = policy.min_rate_units
    factor_floats = np.array([float(factor) for factor in factors], dtype=np.float64)

    scaled = base_arr * factor_floats[risk] * float(RATE_SCALE)
    # Above twice the cap the rounding cannot matter; clipping keeps every value exactly representable.
    scaled = np.minimum(scaled, 2.0 * max_units + 2.0)
    units = np.floor(scaled + 0.5)
    distance_to_tie = np.abs(scaled - np.floor(scaled) - 0.5)
    suspects = np.flatnonzero(distance_to_tie <= scaled * _TIE_RELATIVE_TOLERANCE + 1e-9)
    rate_units = units.astype(np.int64)
    with localcontext(_DECIMAL_CONTEXT):
        for index in suspects.tolist():
            exact = Decimal(repr(float(base_arr[index]))) * factors[int(risk[index])]
            rate_units[index] = int(exact.quantize(_RATE_QUANTUM, rounding=ROUND_HALF_UP).scaleb(RATE_PLACES))

    min_units = np.maximum(np.asarray(stock_min_rate_units, dtype=np.int64), policy_min_units)
    rate_units = np.minimum(np.maximum(rate_units, min_units), max_units)
    event_adjustment_floats = np.array([float(adjustment) for adjustment in event_adjustments])
    return RateArrays(
        rate_units=rate_units,
        volatility_adjustment=float(volatility_adjustment),
        event_adjustment=event_adjustment_floats[risk],
        min_rate_units=np.broadcast_to(min_units, rate_units.shape).copy(),
        status=borrow_status_codes(base_arr, np.asarray(stored_status, dtype=np.int8)),
    )


class FeeTerms(msgspec.Struct, frozen=True, kw_only=True):
    """A client's fee schedule in exact units: markup and percentage fees in 1e-4 %, flat fees in cents."""

    day_count: int
    markup_units: int
    percentage_fee: bool
    transaction_units: int


class FeeArrays(msgspec.Struct, frozen=True):
    """Fee components in cents (int64)."""

    borrow_cost: Int64Array
    markup: Int64Array
    transaction_fees: Int64Array
    total_fee: Int64Array


class FeeRow(NamedTuple):
    """One row's fee components in cents, as Python ints."""

    borrow_cost: int
    markup: int
    transaction_fees: int
    total_fee: int


# The steps of the fee formula, written once for both shapes of the data: a column of rows (int64 arrays,
# `price_locates`) and one row (Python ints, `price_locate`). The same expressions run on both, so a single
# quote and a batch row are priced by the same arithmetic; only NumPy's fixed cost per call (~0.5 µs per
# operation whatever the size, a dozen operations per call) is left out of the one-row path.
Column = TypeVar("Column", int, Int64Array)


def _div_round_half_up(numerator: Column, divisor: int) -> Column:
    """numerator / divisor rounded half up, for 0 <= numerator and 2 * numerator + divisor < 2^63:
    floor((2n + d) / 2d) is n/d + 1/2 rounded down, one division where divmod and a compare take three
    operations more. The numerator is consumed: an array is overwritten with the result (no temporaries),
    an int is simply rebound."""
    numerator *= 2
    numerator += divisor
    numerator //= 2 * divisor
    return numerator


def _borrow_cost(position_days_rate: Column, terms: FeeTerms) -> Column:
    """position × days × rate (in 1e-8) / day count, to cents; the product is consumed."""
    return _div_round_half_up(position_days_rate, terms.day_count * RATE_SCALE)


def _markup(borrow_cost: Column, terms: FeeTerms) -> Column:
    # borrow cost ≤ 1.02e12 cents, × markup (≤ 1e6) ≤ 1.02e18: doubled plus the divisor < 2^63.
    return _div_round_half_up(borrow_cost * terms.markup_units, 100 * PERCENT_SCALE)


def _percentage_fee(position: Column, terms: FeeTerms) -> Column:
    # position ≤ 1e11 cents × 1e6 (100 %) = 1e17.
    return _div_round_half_up(position * terms.transaction_units, 100 * PERCENT_SCALE)


def price_locates(
    position_cents: npt.ArrayLike,
    loan_days: npt.ArrayLike,
    rate_units: npt.ArrayLike,
    terms: FeeTerms,
) -> FeeArrays:
    """Locate fees of DESIGN §3: borrow cost + markup + transaction fee, each rounded half up to cents.

    Domain (validated upstream): position ≤ 1e11 cents, loan days 1-365, rate ≤ 1e9 units (1,000 %),
    day count in ALLOWED_DAY_COUNTS, markup and percentage fee ≤ 100 %.
    """
    position = np.asarray(position_cents, dtype=np.int64)
    days = np.asarray(loan_days, dtype=np.int64)
    rate = np.asarray(rate_units, dtype=np.int64)
    divisor = terms.day_count * RATE_SCALE

    position_days = position * days  # ≤ 1e11 × 366 = 3.66e13; a new array, the borrow cost's buffer
    if position_days.size <= 4:
        # A few rows: Python's max of a short list beats two NumPy reductions.
        largest = max(position_days.tolist(), default=0) * max(rate.tolist(), default=0)
    else:
        largest = int(position_days.max()) * int(rate.max())
    if largest < _HALF_INT64_LIMIT - divisor:
        # Every exact product, doubled for the rounding, fits in int64 (the usual case): one division,
        # in place.
        position_days *= rate
        borrow_cost = _borrow_cost(position_days, terms)
    else:
        # Up to 3.65e22: split the rate in two limbs, rate = hi × 1e4 + lo, and divide in two steps.
        # position × days × hi (≤ 1e5) ≤ 3.7e18 and × lo (< 1e4) < 3.7e17, both below 2^63.
        high, low = np.divmod(rate, _LIMB)
        high_quotient, high_remainder = np.divmod(position_days * high, divisor)
        # high_remainder × 1e4 < 3.7e14, + position_days × low < 3.7e17: still int64.
        low_quotient, low_remainder = np.divmod(high_remainder * _LIMB + position_days * low, divisor)
        borrow_cost = high_quotient * _LIMB + low_quotient + (2 * low_remainder >= divisor)

    markup = _markup(borrow_cost, terms)
    if terms.percentage_fee:
        transaction = _percentage_fee(position, terms)
    else:
        transaction = np.full(np.shape(borrow_cost), terms.transaction_units, dtype=np.int64)
    total = borrow_cost + markup
    total += transaction
    return FeeArrays(borrow_cost=borrow_cost, markup=markup, transaction_fees=transaction, total_fee=total)


def price_locate(position_cents: int, loan_days: int, rate_units: int, terms: FeeTerms) -> FeeRow:
    """`price_locates` for one row (a single quote), the same steps on Python ints.

    Python ints do not overflow, so the product needs no limbs; same domain as `price_locates`."""
    borrow_cost = _borrow_cost(position_cents * loan_days * rate_units, terms)
    markup = _markup(borrow_cost, terms)
    transaction = _percentage_fee(position_cents, terms) if terms.percentage_fee else terms.transaction_units
    return FeeRow(borrow_cost, markup, transaction, borrow_cost + markup + transaction)
