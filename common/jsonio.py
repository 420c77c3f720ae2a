"""The one JSON codec for non-finite floats: inf, -inf and nan travel as "inf", "-inf", "nan".

Why strings: JSON has no infinity or NaN. Python writes them as the bare words `Infinity` and
`NaN`, which most other readers (browsers, jq, other languages) reject; epsilon = inf (no DP) is
an ordinary value here, so every file this project writes keeps it as a string instead.

`encode` walks dicts, lists and tuples (tuples become lists, dict keys become strings) and
replaces non-finite floats; `decode` walks the same shapes and turns exactly the three strings
back into floats. `encode_float`/`decode_float` do one value. Standard library only.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["NON_FINITE", "encode_float", "decode_float", "encode", "decode", "dumps", "loads"]

NON_FINITE: dict[str, float] = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def encode_float(x: Any) -> Any:
    """A non-finite float as its string ("inf", "-inf", "nan"); anything else unchanged."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def decode_float(value: Any) -> Any:
    """"inf", "-inf" or "nan" as a float; anything else unchanged."""
    if isinstance(value, str) and value in NON_FINITE:
        return NON_FINITE[value]
    return value


def encode(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by its string, ready for `json.dumps`."""
    if isinstance(obj, dict):
        return {k if isinstance(k, str) else str(k): encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    return encode_float(obj)


def decode(obj: Any) -> Any:
    """Inverse of `encode` for values: the three strings become floats again."""
    if isinstance(obj, dict):
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    return decode_float(obj)


def dumps(obj: Any, **kwargs: Any) -> str:
    """`json.dumps` of `encode(obj)`; never writes the non-standard Infinity/NaN."""
    return json.dumps(encode(obj), allow_nan=False, **kwargs)


def loads(text: str | bytes) -> Any:
    """`json.loads` followed by `decode`."""
    return decode(json.loads(text))
