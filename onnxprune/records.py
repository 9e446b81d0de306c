"""The one dataclass -> JSON-ready conversion every report record's ``to_dict`` uses."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


def record_dict(record: Any) -> Any:
    """A report record as plain data: the one dataclass -> JSON conversion every ``to_dict`` uses.

    A dataclass becomes a dict of its fields, in order. The values inside it (and the items of a
    list given instead) become plain data: a nested record with its own ``to_dict`` through it, so a
    record serialises the same alone or inside another; other dataclasses field by field (as
    ``dataclasses.asdict``); lists and tuples keep their type; numpy scalars and arrays become Python
    numbers and lists; anything else stays as it is. Infinite and NaN numbers stay floats here:
    :func:`write_json` writes them as strings.
    """
    if _is_record(record):
        return {f.name: _plain(getattr(record, f.name)) for f in dataclasses.fields(record)}
    return _plain(record)


def _plain(value: Any) -> Any:
    if _is_record(value):
        return value.to_dict() if callable(getattr(value, "to_dict", None)) else record_dict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return value


def _is_record(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)
