"""Pricing core: pure functions over NumPy arrays, exact to the cent (DESIGN §3).

A single quote runs the batch's fee steps on Python ints (`price_locate`); nothing here does I/O or knows
about HTTP.
"""

from pricer.pricing.core import (
    FeeArrays,
    FeeRow,
    FeeTerms,
    RateArrays,
    RatePolicy,
    borrow_status_codes,
    price_locate,
    price_locates,
    price_rates,
    scaled_int,
    to_scaled_int,
)

__all__ = [
    "FeeArrays",
    "FeeRow",
    "FeeTerms",
    "RateArrays",
    "RatePolicy",
    "borrow_status_codes",
    "price_locate",
    "price_locates",
    "price_rates",
    "scaled_int",
    "to_scaled_int",
]
