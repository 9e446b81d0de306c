"""Disjoint sets over atomic channels: two channels in one set must be pruned together."""

from __future__ import annotations

import numpy as np


class UnionFind:
    def __init__(self) -> None:
        self._parent: list[int] = []

    def __len__(self) -> int:
        return len(self._parent)

    def make(self, n: int) -> np.ndarray:
        """Create ``n`` new singleton elements and return their ids."""
        start = len(self._parent)
        self._parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self._parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            # Keep the smaller id as root so results do not depend on union order.
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self._parent[hi] = lo

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            self.union(x, y)

    def roots(self, elems: np.ndarray) -> np.ndarray:
        return np.fromiter((self.find(int(e)) for e in elems), dtype=np.int64, count=len(elems))
