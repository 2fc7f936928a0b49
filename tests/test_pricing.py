"""The NumPy pricing core against an exact Decimal reference of DESIGN §3.

Inputs reach the core the way the service sends them: positions as float dollars through
`to_scaled_int(x, 2)`, markups and percentage fees as floats through `to_scaled_int(x, 4)`, flat fees
through `to_scaled_int(x, 2)`, base rates as the floats of decimal strings with at most 12 significant digits.
The strategies aim at half-cent and half-1e-8 ties on purpose: a random input almost never lands on one,
and ties are exactly where binary floating point goes wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Context, Decimal, DivisionByZero, Inexact, InvalidOperation, Overflow, localcontext

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pricer.pricing.core import (
    FeeArrays,
    FeeTerms,
    RatePolicy,
    price_locates,
    price_rates,
    scaled_int,
    to_scaled_int,
)
from tests.decimal_reference import reference_fee, reference_rate

MAX_POSITION_CENTS = 100_000_000_000  # $1e9
MAX_RATE_UNITS = 1_000_000_000  # 10 = 1,000 % in 1e-8
MAX_PERCENT_UNITS = 1_000_000  # 100 % in 1e-4 %
DAY_COUNTS = (360, 365, 366)
FEE_TYPES = ("FLAT", "PERCENTAGE")
EXACT = Context(prec=200, traps=[Inexact, InvalidOperation, DivisionByZero, Overflow])  # rounding raises
HALF_PERCENT_UNIT = 500_000  # 0.5 cent in the markup / percentage products (cents × 1e-4 % / 100)

PROPERTY_SETTINGS = settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def dec(units: int, places: int) -> Decimal:
    """The exact decimal `units × 10^-places`."""
    return Decimal(units).scaleb(-places)


def cents(value: Decimal) -> int:
    return int(value.scaleb(2))


def rate_units_of(value: Decimal) -> int:
    units = value.scaleb(8)
    assert units == units.to_integral_value()
    return int(units)


def plain(value: Decimal) -> str:
    """Decimal text without an exponent, the way a config value or JSON number is written."""
    return format(value, "f")


# --------------------------------------------------------------------------------------------------------
# Helpers that feed the core through floats, as the service does
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    day_count: int
    markup_units: int  # 1e-4 %
    fee_type: str
    amount_units: int  # cents (FLAT) or 1e-4 % (PERCENTAGE)

    @property
    def markup(self) -> Decimal:
        return dec(self.markup_units, 4)

    @property
    def amount(self) -> Decimal:
        return dec(self.amount_units, 2 if self.fee_type == "FLAT" else 4)

    def terms_from_floats(self) -> FeeTerms:
        """The FeeTerms built from the float values a JSON body carries, as the service builds them."""
        markup_units, markup_ok = to_scaled_int(float(self.markup), 4)
        amount_places = 2 if self.fee_type == "FLAT" else 4
        amount_units, amount_ok = to_scaled_int(float(self.amount), amount_places)
        assert bool(markup_ok)
        assert bool(amount_ok)
        assert int(markup_units) == self.markup_units
        assert int(amount_units) == self.amount_units
        return FeeTerms(
            day_count=self.day_count,
            markup_units=int(markup_units),
            percentage_fee=self.fee_type == "PERCENTAGE",
            transaction_units=int(amount_units),
        )

    def reference(self, position_cents: int, rate: Decimal, days: int) -> tuple[int, int, int, int]:
        result = reference_fee(
            dec(position_cents, 2), rate, days, self.day_count, self.markup, self.fee_type, self.amount
        )
        return cents(result[0]), cents(result[1]), cents(result[2]), cents(result[3])


def core_fees(
    position_cents: npt.ArrayLike, days: npt.ArrayLike, rate_units: npt.ArrayLike, schedule: Schedule
) -> FeeArrays:
    """Positions go in as float dollars and through `to_scaled_int(x, 2)`, as the service does."""
    position_cents = np.asarray(position_cents, dtype=np.int64)
    dollars = position_cents / 100.0  # correctly rounded: the double nearest to the decimal dollars
    scaled, ok = to_scaled_int(dollars, 2)
    assert ok.all()
    np.testing.assert_array_equal(scaled, position_cents)
    return price_locates(scaled, days, rate_units, schedule.terms_from_floats())


def fee_rows(fees: FeeArrays) -> list[tuple[int, int, int, int]]:
    columns = (fees.borrow_cost, fees.markup, fees.transaction_fees, fees.total_fee)
    return list(zip(*(column.tolist() for column in columns), strict=True))


def policy_of(values: dict[str, Decimal]) -> RatePolicy:
    return RatePolicy(**{name: plain(value) for name, value in values.items()})


DEFAULT_POLICY_VALUES = {
    "volatility_factor": Decimal("0.01"),
    "volatility_threshold": Decimal(0),
    "event_risk_factor": Decimal("0.05"),
    "min_borrow_rate": Decimal("0.0001"),
    "max_borrow_rate": Decimal(10),
}


def core_rate_units(
    bases: list[Decimal],
    risks: list[int],
    stock_mins: list[Decimal],
    volatility_index: Decimal,
    policy_values: dict[str, Decimal],
) -> list[int]:
    base_floats = np.array([float(plain(base)) for base in bases], dtype=np.float64)
    rates = price_rates(
        base_floats,
        np.array(risks, dtype=np.int64),
        np.array([rate_units_of(m) for m in stock_mins], dtype=np.int64),
        np.full(len(bases), -1, dtype=np.int8),
        volatility_index=volatility_index,
        policy=policy_of(policy_values),
    )
    units: list[int] = rates.rate_units.tolist()
    return units


def reference_rate_units(
    bases: list[Decimal],
    risks: list[int],
    stock_mins: list[Decimal],
    volatility_index: Decimal,
    policy_values: dict[str, Decimal],
) -> list[int]:
    return [
        rate_units_of(reference_rate(base, volatility_index, risk, stock_min, **policy_values))
        for base, risk, stock_min in zip(bases, risks, stock_mins, strict=True)
    ]


# --------------------------------------------------------------------------------------------------------
# Tie construction (number theory on the scaled integers; the test's own, not the core's)
# --------------------------------------------------------------------------------------------------------


def solve_congruence(a: int, target: int, modulus: int) -> tuple[int, int] | None:
    """(x0, step): every x ≡ x0 (mod step) solves a·x ≡ target (mod modulus); None when none does."""
    g = math.gcd(a, modulus)
    if target % g:
        return None
    step = modulus // g
    return (target // g) * pow(a // g, -1, step) % step if step > 1 else 0, step


def borrow_tie_position(rate_units: int, days: int, day_count: int, pick: int) -> tuple[int, int, int]:
    """(position_cents, rate_units, days) with position × rate × days / day_count exactly k + ½ cent.

    The rate and days are made odd when needed so that a solution exists; `pick` chooses among them.
    """
    divisor = day_count * 10**8
    solution = solve_congruence(rate_units * days, divisor // 2, divisor)
    if solution is None:
        rate_units = max(1, rate_units - (1 - rate_units % 2))
        days = days - (1 - days % 2)
        solution = solve_congruence(rate_units * days, divisor // 2, divisor)
        assert solution is not None
    first, step = solution
    count = (MAX_POSITION_CENTS - first) // step + 1
    position = first + (pick % count) * step
    assert 1 <= position <= MAX_POSITION_CENTS
    assert (position * rate_units * days) % divisor == divisor // 2
    return position, rate_units, days


def percent_tie_units(cents_value: int, pick: int) -> int | None:
    """Percent units u (≤ 100 %) with cents_value × u / 1e6 exactly k + ½ cent, or None."""
    solution = solve_congruence(cents_value, HALF_PERCENT_UNIT, 100 * 10**4)
    if solution is None:
        return None
    first, step = solution
    if first > MAX_PERCENT_UNITS:
        return None
    return first + (pick % ((MAX_PERCENT_UNITS - first) // step + 1)) * step


def exact_borrow_cents(position_cents: int, rate_units: int, days: int, day_count: int) -> int:
    divisor = day_count * 10**8
    return (2 * position_cents * rate_units * days + divisor) // (2 * divisor)


def strip_2_5(value: int) -> tuple[int, int, int]:
    twos = fives = 0
    while value % 2 == 0 and value:
        value //= 2
        twos += 1
    while value % 5 == 0 and value:
        value //= 5
        fives += 1
    return value, twos, fives


def rate_tie_base(factor: Decimal, odd_pick: int) -> Decimal | None:
    """A base with ≤ 12 significant digits whose base × factor is exactly (2n+1) × 0.5e-8, or None.

    factor = a/b in lowest terms and a = 2^i 5^j a'' with a'' prime to 10; base = t·b / (2e8 · 2^i 5^j)
    with t odd gives base × factor = t·a'' / 2e8, an odd number of half units.
    """
    a, b = factor.as_integer_ratio()
    core, twos, fives = strip_2_5(a)
    max_t = 2 * 10**9 // core  # keeps the rate ≤ 10
    if max_t < 1:
        return None
    t = 2 * (odd_pick % ((max_t + 1) // 2)) + 1
    base = EXACT.divide(Decimal(t * b), Decimal(2 * 10**8 * 2**twos * 5**fives)).normalize()
    if len(base.as_tuple().digits) > 12 or base > 10:
        return None
    assert EXACT.remainder(EXACT.multiply(base, factor).scaleb(8), Decimal(1)) == Decimal("0.5")
    return base


def combined_factor(policy_values: dict[str, Decimal], volatility_index: Decimal, risk: int) -> Decimal:
    with localcontext(EXACT):
        excess = max(Decimal(0), volatility_index - policy_values["volatility_threshold"])
        vol = policy_values["volatility_factor"] * excess
        event = Decimal(risk) / 10 * policy_values["event_risk_factor"]
        return (1 + vol) * (1 + event)


# --------------------------------------------------------------------------------------------------------
# Published vectors
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("position", "days", "rate", "schedule", "expected"),
    [
        pytest.param(
            100_000.00,
            30,
            "0.05",
            Schedule(365, 50_000, "FLAT", 2_500),
            ("410.96", "20.55", "25.00", "456.51"),
            id="100k-30d-5pct-365",
        ),
        pytest.param(
            100_000.00,
            30,
            "0.05",
            Schedule(360, 50_000, "FLAT", 2_500),
            ("416.67", "20.83", "25.00", "462.50"),
            id="100k-30d-5pct-360",
        ),
        pytest.param(
            1_000_000.00,
            90,
            "0.75",
            Schedule(365, 100_000, "FLAT", 5_000),
            ("184931.51", "18493.15", "50.00", "203474.66"),
            id="1m-90d-75pct",
        ),
        pytest.param(
            1001.00,
            1,
            "0",
            Schedule(365, 0, "PERCENTAGE", 5_000),
            ("0.00", "0.00", "5.01", "5.01"),
            id="tie-1001-x-half-percent",
        ),
    ],
)
def test_published_fee_vectors(
    position: float, days: int, rate: str, schedule: Schedule, expected: tuple[str, str, str, str]
) -> None:
    position_cents = int(Decimal(repr(position)).scaleb(2))
    expected_cents = tuple(cents(Decimal(value)) for value in expected)
    fees = core_fees([position_cents], [days], [rate_units_of(Decimal(rate))], schedule)
    assert fee_rows(fees) == [expected_cents]
    assert schedule.reference(position_cents, Decimal(rate), days) == expected_cents


def test_half_cent_tie_is_where_plain_float_fails() -> None:
    """1001 × 0.5 / 100 = 5.005 exactly; the double of 5.005 is just below it, so np.round says 5.00."""
    assert float(np.round(1001.00 * 0.5 / 100, 2)) == 5.0
    fees = core_fees([100_100], [30], [0], Schedule(365, 0, "PERCENTAGE", 5_000))
    assert fees.transaction_fees.tolist() == [501]


@pytest.mark.parametrize(
    ("base", "volatility_index", "risk", "expected"),
    [
        ("0.05", "20", 0, "0.06"),
        ("0.10", "0", 5, "0.1025"),
        ("0.303849", "20", 0, "0.3646188"),  # the GME example of DESIGN §2.1
        ("0", "20", 0, "0.0001"),  # the floor
        ("9.5", "20", 10, "10"),  # the cap
        ("0.123456785", "0", 0, "0.12345679"),  # a tie at the 9th decimal: the double is below it
        ("0.0154320875", "20", 0, "0.01851851"),  # × 1.2 = 0.018518505, a tie
        ("2.000000005", "0", 0, "2.00000001"),
    ],
)
def test_published_rate_vectors(base: str, volatility_index: str, risk: int, expected: str) -> None:
    args = ([Decimal(base)], [risk], [Decimal(0)], Decimal(volatility_index), DEFAULT_POLICY_VALUES)
    expected_units = rate_units_of(Decimal(expected))
    assert core_rate_units(*args) == [expected_units]
    assert reference_rate_units(*args) == [expected_units]


def test_default_policy_matches_design_defaults() -> None:
    assert policy_of(DEFAULT_POLICY_VALUES) == RatePolicy()


# --------------------------------------------------------------------------------------------------------
# to_scaled_int
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "places", "expected"),
    [
        (0.07, 2, 7),
        (1e5, 2, 10_000_000),
        (100.0, 2, 10_000),
        (0.01, 2, 1),
        (1e9, 2, 100_000_000_000),
        (1.15, 2, 115),
        (0.285, 3, 285),
        (7.3125, 4, 73_125),
        (0.0, 2, 0),
        (10.0, 8, 1_000_000_000),
        (0.12345678, 8, 12_345_678),
    ],
)
def test_to_scaled_int_accepts(value: float, places: int, expected: int) -> None:
    units, ok = to_scaled_int(value, places)
    assert bool(ok)
    assert int(units) == expected


@pytest.mark.parametrize(
    ("value", "places"),
    [
        (100.001, 2),
        (0.005, 2),
        (0.285, 2),
        (1e-9, 8),
        (7.31255, 4),
        (math.nan, 2),
        (math.inf, 2),
        (-math.inf, 2),
    ],
)
def test_to_scaled_int_rejects(value: float, places: int) -> None:
    units, ok = to_scaled_int(value, places)
    assert not bool(ok)
    assert int(units) == 0


@pytest.mark.parametrize("value", [1e300, -1e300, 1e17, 2.0**53, 1.7976931348623157e308])
def test_to_scaled_int_refuses_values_it_cannot_scale_exactly(value: float) -> None:
    """Out-of-range values (the batch endpoint passes them unchecked) are refused, without a cast warning."""
    units, ok = to_scaled_int([value, 12.34], 2)
    assert ok.tolist() == [False, True]
    assert units.tolist() == [0, 1234]


def test_to_scaled_int_is_elementwise() -> None:
    units, ok = to_scaled_int([0.07, 100.001, math.nan, 1e5, 0.005], 2)
    assert ok.tolist() == [True, False, False, True, False]
    assert units.tolist() == [7, 0, 0, 10_000_000, 0]
    assert units.dtype == np.int64


@settings(max_examples=300, deadline=None)
@given(st.integers(0, MAX_POSITION_CENTS), st.integers(1, 9))
def test_to_scaled_int_round_trips_cents(position_cents: int, extra: int) -> None:
    """Every cents value comes back exact; one more decimal digit (not 0) is always refused."""
    units, ok = to_scaled_int(position_cents / 100, 2)
    assert bool(ok)
    assert int(units) == position_cents
    if position_cents < 10**10:  # keeps position × 1000 below 2^53 / 10^2
        _, ok = to_scaled_int((position_cents * 10 + extra) / 1000, 2)
        assert not bool(ok)


# --------------------------------------------------------------------------------------------------------
# Property: price_locates == Decimal reference
# --------------------------------------------------------------------------------------------------------

position_cents_st = st.one_of(
    st.integers(1, MAX_POSITION_CENTS),
    st.integers(1, 10**9).map(lambda dollars: dollars * 100),  # whole dollars
    st.integers(1, 10**7),  # small positions
)
rate_units_st = st.one_of(
    st.integers(0, MAX_RATE_UNITS),
    st.integers(0, 100_000).map(lambda units: units * 10**4),  # rates with 4 decimals
    st.sampled_from([1, 10_000, 5_000_000, 75_000_000, MAX_RATE_UNITS - 1, MAX_RATE_UNITS]),
)
days_st = st.one_of(st.just(365), st.just(1), st.integers(1, 365))
percent_units_st = st.one_of(
    st.integers(0, MAX_PERCENT_UNITS),
    st.sampled_from([0, 5_000, 25_000, 50_000, 100_000, 73_125, MAX_PERCENT_UNITS]),
)


@dataclass(frozen=True)
class FeeCase:
    schedule: Schedule
    positions: list[int]
    days: list[int]
    rates: list[int]
    tie: str


@st.composite
def fee_cases(draw: st.DrawFn) -> FeeCase:
    day_count = draw(st.sampled_from(DAY_COUNTS))
    fee_type = draw(st.sampled_from(FEE_TYPES))
    tie = draw(st.sampled_from(("none", "borrow", "markup", "transaction", "all")))
    positions, days, rates = [], [], []
    for _ in range(draw(st.integers(1, 6))):
        position, rate, day = draw(position_cents_st), draw(rate_units_st), draw(days_st)
        if tie in ("borrow", "all"):
            position, rate, day = borrow_tie_position(rate, day, day_count, draw(st.integers(0, 2**40)))
        positions.append(position)
        rates.append(rate)
        days.append(day)
    markup = draw(percent_units_st)
    if tie in ("markup", "all"):
        borrow = exact_borrow_cents(positions[0], rates[0], days[0], day_count)
        markup = percent_tie_units(borrow, draw(st.integers(0, 2**20))) or markup
    if fee_type == "FLAT":
        amount = draw(st.one_of(st.integers(0, 10**7), st.sampled_from([0, 1, 2_500, 5_000])))
    else:
        amount = draw(percent_units_st)
        if tie in ("transaction", "all"):
            amount = percent_tie_units(positions[0], draw(st.integers(0, 2**20))) or amount
    return FeeCase(Schedule(day_count, markup, fee_type, amount), positions, days, rates, tie)


@PROPERTY_SETTINGS
@given(fee_cases())
def test_price_locates_matches_decimal_reference(case: FeeCase) -> None:
    fees = core_fees(case.positions, case.days, case.rates, case.schedule)
    expected = [
        case.schedule.reference(position, dec(rate, 8), day)
        for position, day, rate in zip(case.positions, case.days, case.rates, strict=True)
    ]
    assert fee_rows(fees) == expected
    for position in case.positions:  # the decimal the reference uses is the float's decimal text
        assert Decimal(repr(position / 100)) == dec(position, 2)


# --------------------------------------------------------------------------------------------------------
# Property: price_rates == Decimal reference
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RateCase:
    policy_values: dict[str, Decimal]
    volatility_index: Decimal
    bases: list[Decimal]
    risks: list[int]
    stock_mins: list[Decimal]
    tie: str


def decimal_st(max_units: int, places: int) -> st.SearchStrategy[Decimal]:
    return st.integers(0, max_units).map(lambda units: dec(units, places))


policy_values_st = st.one_of(
    st.just(DEFAULT_POLICY_VALUES),
    st.fixed_dictionaries(
        {
            "volatility_factor": st.one_of(
                decimal_st(100_000, 6),
                st.sampled_from([Decimal("0.01"), Decimal("0.005"), Decimal("0.0125")]),
            ),
            "volatility_threshold": st.one_of(
                decimal_st(300_000, 4), st.sampled_from([Decimal(0), Decimal(15)])
            ),
            "event_risk_factor": st.one_of(
                decimal_st(200_000, 6), st.sampled_from([Decimal("0.05"), Decimal("0.1"), Decimal("0.075")])
            ),
            "min_borrow_rate": st.one_of(decimal_st(1_000_000, 8), st.just(Decimal("0.0001"))),
            "max_borrow_rate": st.one_of(
                st.integers(10**8, MAX_RATE_UNITS).map(lambda units: dec(units, 8)), st.just(Decimal(10))
            ),
        }
    ),
)
volatility_index_st = st.one_of(decimal_st(2_000_000, 4), st.sampled_from([Decimal(0), Decimal(20)]))


@st.composite
def random_base(draw: st.DrawFn) -> Decimal:
    places = draw(st.integers(0, 10))
    mantissa = draw(st.integers(0, min(10**12 - 1, 10 ** (places + 1))))
    return dec(mantissa, places)


@st.composite
def rate_cases(draw: st.DrawFn) -> RateCase:
    tie = draw(st.sampled_from(("none", "unit_factor", "general")))
    policy_values = draw(policy_values_st)
    volatility_index = draw(volatility_index_st)
    if tie == "unit_factor":  # (1 + vol_adj) = 1: V at or under the threshold
        volatility_index = min(volatility_index, policy_values["volatility_threshold"])
    bases, risks, stock_mins = [], [], []
    for _ in range(draw(st.integers(1, 6))):
        risk = draw(st.integers(0, 10))
        base = draw(random_base())
        if tie == "unit_factor":
            risk = 0
            # 9 decimals ending in 5 (an odd number of half units of 1e-8); ≤ 11 significant digits.
            base = dec((2 * draw(st.integers(0, 10**9 - 1)) + 1) * 5, 9)
        elif tie == "general":
            factor = combined_factor(policy_values, volatility_index, risk)
            base = rate_tie_base(factor, draw(st.integers(0, 2**40))) or base
        stock_min = draw(st.one_of(st.just(Decimal(0)), decimal_st(10_000_000, 8)))
        bases.append(base)
        risks.append(risk)
        stock_mins.append(stock_min)
    return RateCase(policy_values, volatility_index, bases, risks, stock_mins, tie)


@PROPERTY_SETTINGS
@given(rate_cases())
def test_price_rates_matches_decimal_reference(case: RateCase) -> None:
    args = (case.bases, case.risks, case.stock_mins, case.volatility_index, case.policy_values)
    assert core_rate_units(*args) == reference_rate_units(*args)


@settings(max_examples=500, deadline=None)
@given(rate_cases(), fee_cases())
def test_rate_then_fee_pipeline_matches_decimal_reference(rate_case: RateCase, fee_case: FeeCase) -> None:
    """Base text → float → price_rates → price_locates, against reference_rate → reference_fee."""
    count = min(len(rate_case.bases), len(fee_case.positions))
    args = (
        rate_case.bases[:count],
        rate_case.risks[:count],
        rate_case.stock_mins[:count],
        rate_case.volatility_index,
        rate_case.policy_values,
    )
    rate_units = core_rate_units(*args)
    reference_rates = [dec(units, 8) for units in reference_rate_units(*args)]
    positions, days = fee_case.positions[:count], fee_case.days[:count]
    fees = core_fees(positions, days, rate_units, fee_case.schedule)
    expected = [
        fee_case.schedule.reference(position, rate, day)
        for position, day, rate in zip(positions, days, reference_rates, strict=True)
    ]
    assert fee_rows(fees) == expected


# --------------------------------------------------------------------------------------------------------
# One million rows, column by column, and the naive float64 pricing that this test would catch
# --------------------------------------------------------------------------------------------------------

BIG_ROWS = 1_000_000
BIG_SCHEDULES = (
    Schedule(365, 50_000, "FLAT", 2_500),  # 5 %, $25
    Schedule(360, 100_000, "PERCENTAGE", 5_000),  # 10 %, 0.5 %
    Schedule(366, 73_125, "PERCENTAGE", 1_235),  # 7.3125 %, 0.1235 %
    Schedule(365, 25_000, "FLAT", 0),  # 2.5 %, no fee
)


@dataclass
class BigFeeData:
    blocks: list[tuple[Schedule, npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]]
    reference: list[npt.NDArray[np.int64]]  # per block: (rows, 4) cents
    constructed_ties: int


def _big_block(
    rng: np.random.Generator, rows: int, schedule: Schedule
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], int]:
    kind = rng.integers(0, 10, rows)
    positions = np.exp(rng.uniform(0.0, math.log(MAX_POSITION_CENTS), rows)).astype(np.int64)
    positions = np.where(kind < 3, np.maximum(positions // 100, 1) * 100, positions)  # whole dollars
    positions = np.where(kind == 3, np.maximum(positions // 100_000, 1) * 100_000, positions)  # $1,000s
    positions = np.clip(positions, 1, MAX_POSITION_CENTS)
    days = rng.integers(1, 366, rows)
    days_kind = rng.integers(0, 10, rows)
    days = np.where(days_kind == 0, 365, days)
    days = np.where(days_kind == 1, rng.choice([30, 90, 180], rows), days)
    rates = np.exp(rng.uniform(math.log(10**4), math.log(MAX_RATE_UNITS), rows)).astype(np.int64)
    rates = np.where(rng.integers(0, 10, rows) < 4, rates // 10**4 * 10**4, rates)  # 4-decimal rates
    rates = np.clip(rates, 0, MAX_RATE_UNITS)
    tie_rows = np.flatnonzero(rng.random(rows) < 0.01)
    picks = rng.integers(0, 2**40, tie_rows.size)
    for row, pick in zip(tie_rows.tolist(), picks.tolist(), strict=True):
        positions[row], rates[row], days[row] = borrow_tie_position(
            int(rates[row]), int(days[row]), schedule.day_count, pick
        )
    return positions, days, rates, int(tie_rows.size)


def _reference_block(
    schedule: Schedule,
    positions: npt.NDArray[np.int64],
    days: npt.NDArray[np.int64],
    rates: npt.NDArray[np.int64],
) -> npt.NDArray[np.int64]:
    markup, amount, fee_type, day_count = (
        schedule.markup,
        schedule.amount,
        schedule.fee_type,
        schedule.day_count,
    )
    out = []
    for position, day, rate in zip(positions.tolist(), days.tolist(), rates.tolist(), strict=True):
        fee = reference_fee(dec(position, 2), dec(rate, 8), day, day_count, markup, fee_type, amount)
        out.append((int(fee[0] * 100), int(fee[1] * 100), int(fee[2] * 100), int(fee[3] * 100)))
    return np.array(out, dtype=np.int64)


@pytest.fixture(scope="module")
def big_fee_data() -> BigFeeData:
    rng = np.random.default_rng(20_260_611)
    blocks, reference, ties = [], [], 0
    per_block = BIG_ROWS // len(BIG_SCHEDULES)
    for schedule in BIG_SCHEDULES:
        positions, days, rates, constructed = _big_block(rng, per_block, schedule)
        blocks.append((schedule, positions, days, rates))
        reference.append(_reference_block(schedule, positions, days, rates))
        ties += constructed
    return BigFeeData(blocks, reference, ties)


FEE_COLUMNS = ("borrow_cost", "markup", "transaction_fees", "total_fee")


@pytest.mark.slow
def test_million_rows_match_decimal_reference_column_by_column(big_fee_data: BigFeeData) -> None:
    assert sum(len(block[1]) for block in big_fee_data.blocks) == BIG_ROWS
    assert big_fee_data.constructed_ties > BIG_ROWS // 200  # ~1 % of the rows are built as half-cent ties
    for (schedule, positions, days, rates), expected in zip(
        big_fee_data.blocks, big_fee_data.reference, strict=True
    ):
        fees = core_fees(positions, days, rates, schedule)
        for index, column in enumerate(FEE_COLUMNS):
            got = getattr(fees, column)
            mismatches = np.flatnonzero(got != expected[:, index])
            assert mismatches.size == 0, (
                f"{column} ({schedule}): {mismatches.size} rows differ, first at {mismatches[:1].tolist()}"
            )


def naive_float_fees(
    schedule: Schedule,
    positions: npt.NDArray[np.int64],
    days: npt.NDArray[np.int64],
    rates: npt.NDArray[np.int64],
) -> npt.NDArray[np.int64]:
    """What plain float64 NumPy with np.round would produce, in cents (rows, 4)."""
    dollars = positions / 100.0
    rate = rates / 1e8
    borrow = np.round(dollars * rate * days / schedule.day_count, 2)
    markup = np.round(borrow * float(schedule.markup) / 100, 2)
    if schedule.fee_type == "FLAT":
        transaction = np.full_like(borrow, float(schedule.amount))
    else:
        transaction = np.round(dollars * float(schedule.amount) / 100, 2)
    total = borrow + markup + transaction
    return np.rint(np.stack([borrow, markup, transaction, total], axis=1) * 100).astype(np.int64)


@pytest.mark.slow
def test_naive_float_pricing_disagrees_on_the_same_rows(big_fee_data: BigFeeData) -> None:
    """The data above is able to fail: plain float64 + np.round gets some of its rows wrong."""
    per_column = np.zeros(len(FEE_COLUMNS), dtype=np.int64)
    for (schedule, positions, days, rates), expected in zip(
        big_fee_data.blocks, big_fee_data.reference, strict=True
    ):
        per_column += (naive_float_fees(schedule, positions, days, rates) != expected).sum(axis=0)
    assert per_column[0] > 0, "borrow cost"
    assert per_column[1] > 0, "markup"
    assert per_column[2] > 0, "transaction fees"
    assert per_column[3] > 0, "total"


# Rates: a million rows through price_rates, in two calls (two policies, two volatility indices).

BIG_RATE_CALLS = (
    (DEFAULT_POLICY_VALUES, Decimal(20)),
    (
        {
            "volatility_factor": Decimal("0.0125"),
            "volatility_threshold": Decimal("5.5"),
            "event_risk_factor": Decimal("0.075"),
            "min_borrow_rate": Decimal("0.0002"),
            "max_borrow_rate": Decimal(5),
        },
        Decimal("23.4567"),
    ),
)


@dataclass
class BigRateData:
    calls: list[
        tuple[
            dict[str, Decimal],
            Decimal,
            npt.NDArray[np.int64],
            npt.NDArray[np.int64],
            npt.NDArray[np.int64],
            npt.NDArray[np.int64],
        ]
    ]  # policy, V, mantissa, places, E, min
    reference: list[npt.NDArray[np.int64]]
    constructed_ties: int


def _big_rate_call(
    rng: np.random.Generator, rows: int, policy_values: dict[str, Decimal], volatility_index: Decimal
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], int]:
    kind = rng.integers(0, 100, rows)
    # IBKR-like: FEERATE with up to 4 decimals, base = FEERATE / 100 (6 decimals).
    feerate = np.exp(rng.uniform(math.log(0.25), math.log(300.0), rows))
    mantissa = np.rint(feerate * 1e4).astype(np.int64)
    places = np.full(rows, 6, dtype=np.int64)
    # Anything with up to 10 decimals and at most 11 significant digits, base ≤ ~5.
    free = kind >= 50
    free_places = rng.integers(0, 11, rows)
    free_mantissa = (rng.random(rows) * 5 * 10.0**free_places).astype(np.int64)
    mantissa = np.where(free, free_mantissa, mantissa)
    places = np.where(free, free_places, places)
    risks = np.where(rng.random(rows) < 0.7, 0, rng.integers(1, 11, rows))
    stock_min = np.where(rng.random(rows) < 0.8, 0, rng.integers(0, 5_000_000, rows))
    tie_rows = np.flatnonzero(kind == 0)  # 1 %: bases built so that base × factor is a half-unit tie
    picks = rng.integers(0, 2**40, tie_rows.size)
    constructed = 0
    for row, pick in zip(tie_rows.tolist(), picks.tolist(), strict=True):
        base = rate_tie_base(combined_factor(policy_values, volatility_index, int(risks[row])), pick)
        if base is None:
            continue
        _sign, digits, exponent = base.as_tuple()
        assert isinstance(exponent, int)
        mantissa[row] = int("".join(map(str, digits))) * 10 ** max(exponent, 0)
        places[row] = max(-exponent, 0)
        stock_min[row] = 0
        constructed += 1
    return mantissa, places, risks, stock_min, constructed


def _base_floats(mantissa: npt.NDArray[np.int64], places: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """The double nearest to mantissa × 10^-places: exact operands, and IEEE division rounds once."""
    assert (mantissa < 2**53).all()
    assert (places <= 22).all()
    result: npt.NDArray[np.float64] = mantissa.astype(np.float64) / 10.0 ** places.astype(np.float64)
    return result


@pytest.fixture(scope="module")
def big_rate_data() -> BigRateData:
    rng = np.random.default_rng(611_2026)
    calls, reference, ties = [], [], 0
    per_call = BIG_ROWS // len(BIG_RATE_CALLS)
    for policy_values, volatility_index in BIG_RATE_CALLS:
        mantissa, places, risks, stock_min, constructed = _big_rate_call(
            rng, per_call, policy_values, volatility_index
        )
        calls.append((policy_values, volatility_index, mantissa, places, risks, stock_min))
        ties += constructed
        expected = [
            int(reference_rate(dec(m, p), volatility_index, e, dec(s, 8), **policy_values) * 10**8)
            for m, p, e, s in zip(
                mantissa.tolist(), places.tolist(), risks.tolist(), stock_min.tolist(), strict=True
            )
        ]
        reference.append(np.array(expected, dtype=np.int64))
    return BigRateData(calls, reference, ties)


@pytest.mark.slow
def test_million_rates_match_decimal_reference(big_rate_data: BigRateData) -> None:
    assert big_rate_data.constructed_ties > BIG_ROWS // 200
    naive_mismatches = 0
    for (policy_values, volatility_index, mantissa, places, risks, stock_min), expected in zip(
        big_rate_data.calls, big_rate_data.reference, strict=True
    ):
        bases = _base_floats(mantissa, places)
        # The same floats as parsing the decimal text.
        sample = np.arange(0, bases.size, 997)
        assert all(float(plain(dec(int(mantissa[i]), int(places[i])))) == bases[i] for i in sample.tolist())
        rates = price_rates(
            bases,
            risks,
            stock_min,
            np.full(bases.size, -1, dtype=np.int8),
            volatility_index=volatility_index,
            policy=policy_of(policy_values),
        )
        mismatches = np.flatnonzero(rates.rate_units != expected)
        assert mismatches.size == 0, f"{mismatches.size} rates differ, first at row {mismatches[:1].tolist()}"
        # Plain float64: base × (1 + vol) × (1 + event), np.round to 8 decimals, then the clamps.
        vol = float(policy_values["volatility_factor"]) * max(
            0.0, float(volatility_index) - float(policy_values["volatility_threshold"])
        )
        event = risks / 10 * float(policy_values["event_risk_factor"])
        floor = np.maximum(stock_min / 1e8, float(policy_values["min_borrow_rate"]))
        naive = np.minimum(
            np.round(np.maximum(bases * (1 + vol) * (1 + event), floor), 8),
            float(policy_values["max_borrow_rate"]),
        )
        naive_mismatches += int((np.rint(naive * 1e8).astype(np.int64) != expected).sum())
    assert naive_mismatches > 0


# --------------------------------------------------------------------------------------------------------
# Robustness of the core against its surroundings
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ambient",
    [
        pytest.param(Context(prec=9), id="prec-9"),
        pytest.param(Context(prec=28, traps=[Inexact]), id="inexact-trapped"),
    ],
)
def test_price_rates_ignores_the_ambient_decimal_context(ambient: Context) -> None:
    """Tie suspects are recomputed in Decimal: the result must not depend on the calling thread's context."""
    bases = [Decimal("1.234567885"), Decimal("0.123456785"), Decimal("0.0154320875"), Decimal("9.876543215")]
    for volatility_index in (Decimal(0), Decimal(20)):
        args = (bases, [0] * 4, [Decimal(0)] * 4, volatility_index, DEFAULT_POLICY_VALUES)
        expected = reference_rate_units(*args)
        with localcontext(ambient):
            got = core_rate_units(*args)
        assert got == expected


@settings(max_examples=500, deadline=None)
@given(
    value=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.decimals(min_value=-(10**9), max_value=10**9, places=4, allow_nan=False).map(float),
    ),
    places=st.integers(min_value=0, max_value=8),
)
def test_scaled_int_is_to_scaled_int_for_one_value(value: float, places: int) -> None:
    units, exact = to_scaled_int([value], places)
    expected = int(units[0]) if bool(exact[0]) else None
    assert scaled_int(value, places) == expected


@pytest.mark.parametrize("rows", [1, 5])  # the short-list and the NumPy-reduction bound checks
@pytest.mark.parametrize("offset", [-2, -1, 0, 1, 2])
def test_borrow_cost_is_exact_on_both_sides_of_the_one_division_bound(rows: int, offset: int) -> None:
    """Products just below 2^62 take one division, just above it two limbs: both exact."""
    day_count = 365
    divisor = day_count * 10**8
    rate = 999_999_937  # below the 1,000 % cap, odd so that products are not round
    position_days = (2**62 - divisor) // rate + offset
    days = 2
    position = position_days // days
    terms = FeeTerms(day_count=day_count, markup_units=0, percentage_fee=False, transaction_units=0)
    fees = price_locates([position] * rows, [days] * rows, [rate] * rows, terms)
    numerator = position * days * rate
    expected = (2 * numerator + divisor) // (2 * divisor)  # half up, in Python's unbounded integers
    assert fees.borrow_cost.tolist() == [expected] * rows


def test_an_expired_rate_stands_in_within_the_stale_bound_while_changes_are_heard() -> None:
    """RateCache.stale_rates (RATE_CACHE_STALE_SECONDS): only today's rates, all of the tickers asked, for
    `stale` seconds past their TTL, while market-data writes are heard, and none after a write."""
    import datetime as dt
    from typing import Any, cast

    from pricer.marketdata.service import RateCache

    now, heard = [0.0], [True]
    cache = RateCache(10.0, clock=lambda: now[0], hears_changes=lambda: heard[0])
    today = dt.date(2026, 1, 2)
    rate = cast("Any", object())
    cache.store(["AAPL"], [rate], today, cache.generation)
    now[0] = 15.0
    assert cache.lookup(["AAPL"], today)[1] == ["AAPL"]  # expired: the database is asked first
    assert cache.stale_rates(["AAPL"], today, 10.0) == {"AAPL": rate}
    assert cache.stale_rates(["AAPL", "GME"], today, 10.0) is None  # GME never priced
    assert cache.stale_rates(["AAPL"], today + dt.timedelta(days=1), 10.0) is None
    assert cache.stale_rates(["AAPL"], today, 0.0) is None
    heard[0] = False
    assert cache.stale_rates(["AAPL"], today, 10.0) is None
    heard[0] = True
    now[0] = 20.0
    assert cache.stale_rates(["AAPL"], today, 10.0) is None  # the bound
    now[0] = 15.0
    cache.invalidate()
    assert cache.stale_rates(["AAPL"], today, 10.0) is None
