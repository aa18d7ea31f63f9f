"""Strict JSON for every output: non-finite floats (nan, inf) become ``null``.

Python's ``json`` writes ``NaN`` and ``Infinity``, which are not JSON; a program reading
``--json`` output or a results file would choke on them. Core and torch-free: the CLI uses it.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["finite", "dumps"]


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None``, recursively (dicts, lists, tuples)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`finite` ``(value)`` with ``allow_nan=False`` (anything else is a bug)."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)
