"""Ticker normalisation (DESIGN §2.1): `BRK.B`, `BRK-B`, `BRK/B` and `BRK B` all mean `BRK.B`."""

from __future__ import annotations

import re

MAX_TICKER_LENGTH = 10
TICKER_RULE = (
    "1 to 10 characters of letters and digits with at most one class separator ('.', '-', '/' or space)"
)

_TICKER = re.compile(r"[A-Z0-9]+(?:[.\- /][A-Z0-9]+)?")


def normalize_ticker(raw: str) -> str | None:
    """The canonical form of `raw`, or None when it is not a ticker.

    The ASCII check comes before upper-casing: Unicode case mapping folds `ß` to `SS`, `ﬀ` to `FF` and `ı` to
    `I`, so upper-casing first would price and audit a non-ticker as another, real ticker.
    """
    text = raw.strip()
    if not text.isascii():
        return None
    text = text.upper()
    if not text or len(text) > MAX_TICKER_LENGTH or _TICKER.fullmatch(text) is None:
        return None
    for separator in "- /":
        if separator in text:
            return text.replace(separator, ".")
    return text
