"""An exact `decimal.Decimal` reference of the pricing rules (DESIGN §3), independent of the pricing core.

Written straight from the DESIGN formulas:

    vol_adj    = VOLATILITY_FACTOR × max(0, V − VOLATILITY_THRESHOLD)
    event_adj  = (E / 10) × EVENT_RISK_FACTOR
    adjusted   = base × (1 + vol_adj) × (1 + event_adj)
    min_rate   = max(stock's min_borrow_rate, MIN_BORROW_RATE)
    rate       = min(round_half_up(max(adjusted, min_rate), 8 decimals), MAX_BORROW_RATE)

    borrow_cost      = round_half_up(position_value × rate × loan_days / day_count, 2)
    markup           = round_half_up(borrow_cost × markup_percentage / 100, 2)
    transaction_fees = FLAT: transaction_amount | PERCENTAGE: round_half_up(position_value × amount / 100, 2)
    total_fee        = borrow_cost + markup + transaction_fees

Every product is computed in a context that traps `Inexact`, so a result that is not exact raises instead of
being silently rounded. The only inexact step is the division by `day_count`: it runs at 60 significant digits
before the final rounding to cents. That double rounding cannot move a result across a half cent: the exact
quotient is a multiple of 10^-10 / day_count, so unless it *is* a tie it lies at least 10^-10 / 366 ≈ 2.7e-13
dollars away from one, while 60 digits on a figure below 10^11 dollars err by less than 10^-48.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Context, Decimal, DivisionByZero, Inexact, InvalidOperation, Overflow

__all__ = ["CENT", "RATE_QUANTUM", "reference_fee", "reference_rate"]

CENT = Decimal("0.01")
RATE_QUANTUM = Decimal("1e-8")

# Exact arithmetic: any rounding raises.
_EXACT = Context(
    prec=100, rounding=ROUND_HALF_UP, traps=[Inexact, InvalidOperation, DivisionByZero, Overflow]
)
# Final roundings (quantize) and the single division: half up, 60 digits, no trap on Inexact.
_ROUND = Context(prec=60, rounding=ROUND_HALF_UP, traps=[InvalidOperation, DivisionByZero, Overflow])

_ZERO = Decimal(0)
_ONE = Decimal(1)
_TEN = Decimal(10)
_HUNDRED = Decimal(100)


def _round(value: Decimal, quantum: Decimal) -> Decimal:
    return value.quantize(quantum, rounding=ROUND_HALF_UP, context=_ROUND)


def reference_rate(
    base: Decimal,
    volatility_index: Decimal,
    event_risk: int,
    stock_min_rate: Decimal,
    *,
    volatility_factor: Decimal = Decimal("0.01"),
    volatility_threshold: Decimal = Decimal(0),
    event_risk_factor: Decimal = Decimal("0.05"),
    min_borrow_rate: Decimal = Decimal("0.0001"),
    max_borrow_rate: Decimal = Decimal(10),
) -> Decimal:
    """The borrow rate (8 decimals) of DESIGN §3; `stock_min_rate` is 0 for a stock without a record."""
    if not 0 <= event_risk <= 10:
        raise ValueError("event risk must be an integer 0-10")
    mul, add, sub = _EXACT.multiply, _EXACT.add, _EXACT.subtract
    vol_adj = mul(volatility_factor, max(_ZERO, sub(volatility_index, volatility_threshold)))
    event_adj = mul(_EXACT.divide(Decimal(event_risk), _TEN), event_risk_factor)
    adjusted = mul(mul(base, add(_ONE, vol_adj)), add(_ONE, event_adj))
    min_rate = max(stock_min_rate, min_borrow_rate)
    return min(_round(max(adjusted, min_rate), RATE_QUANTUM), max_borrow_rate)


def reference_fee(
    position_value: Decimal,
    rate: Decimal,
    loan_days: int,
    day_count: int,
    markup_pct: Decimal,
    fee_type: str,
    amount: Decimal,
) -> tuple[Decimal, Decimal, Decimal, Decimal]:
    """(borrow_cost, markup, transaction_fees, total_fee) in dollars with 2 decimals, DESIGN §3."""
    mul = _EXACT.multiply
    numerator = mul(mul(position_value, rate), Decimal(loan_days))
    borrow_cost = _round(_ROUND.divide(numerator, Decimal(day_count)), CENT)
    markup = _round(_EXACT.divide(mul(borrow_cost, markup_pct), _HUNDRED), CENT)
    if fee_type == "FLAT":
        if amount != _round(amount, CENT):
            raise ValueError("a FLAT amount has at most 2 decimals")
        transaction_fees = amount.quantize(CENT, context=_EXACT)
    elif fee_type == "PERCENTAGE":
        transaction_fees = _round(_EXACT.divide(mul(position_value, amount), _HUNDRED), CENT)
    else:
        raise ValueError(f"unknown fee type {fee_type!r}")
    total = _EXACT.add(_EXACT.add(borrow_cost, markup), transaction_fees)
    return borrow_cost, markup, transaction_fees, total
