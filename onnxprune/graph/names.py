"""Unique names: ``base``, else ``base_2``, ``base_3``... (graph values, torch module attributes)."""

from __future__ import annotations


def unique_name(base: str, taken: set[str]) -> str:
    """The first of ``base``, ``base_2``, ... not in ``taken``; added to ``taken``."""
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name
