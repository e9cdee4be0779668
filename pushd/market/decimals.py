"""Exact decimal arithmetic for prices and quantities, which travel as decimal strings.

Sums and products use a context wide enough that they are exact for any value the wire format
admits (30 integer and 30 fraction digits); only divisions round, and only where a module says so.
"""

from __future__ import annotations

import decimal
from decimal import Decimal

EXACT = decimal.Context(prec=90, rounding=decimal.ROUND_HALF_EVEN, Emax=999, Emin=-999)
ZERO = Decimal(0)


def text(value: Decimal) -> str:
    """Plain decimal text with no exponent and no trailing zeros (``"0.5"``, ``"65000"``)."""
    if not value:
        return "0"
    return format(value.normalize(EXACT), "f")


def quantize(value: Decimal, places: int) -> str:
    """``value`` rounded half-even to ``places`` fraction digits, as plain text."""
    return format(value.quantize(Decimal(1).scaleb(-places), context=EXACT), "f")
