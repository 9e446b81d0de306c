"""What the channel analysis finds, as plain data the scoring and rewriting stages read.

The analysis gives every channel of every tensor an *element* id. Elements that must be removed
together (a Conv output channel, the BN and PRelu channel after it, the consumer's input
column, both sides of a residual Add...) are joined into one *unit*. Parameters and integer
attributes that count channels are recorded as *slots* and *edits*, each position labelled with
its element, so removing a set of units is a mechanical slice of every recorded place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

SlotRole = Literal["out", "bias", "in", "param"]


@dataclass
class ChannelMap:
    """How the channel axis of one tensor maps to elements."""

    axis: int
    elems: np.ndarray  # element id per position along ``axis``
    const: np.ndarray  # value the position takes when its unit is masked at its source (nan: not constant)


@dataclass
class ParamSlot:
    """One axis of an initializer whose positions belong to channel elements.

    Roles: ``out`` weights produce the channel and ``bias`` is added to it (both zeroed by the
    mask oracle); ``in`` weights consume it; ``param`` are per-channel parameters of ops the
    channel passes through (BN statistics, PRelu slopes, per-channel constants).
    """

    value: str
    axis: int
    elems: np.ndarray
    role: SlotRole
    node: str


@dataclass
class BiasFold:
    """A consumer whose removed input channels carry a constant: fold it into the consumer's bias."""

    node: str
    kind: Literal["conv", "grouped", "gemm"]
    weight: str
    in_axis: int
    elems: np.ndarray
    positions: np.ndarray  # where those elements sit on the consumer's input axis
    const: np.ndarray
    bias: str | None  # initializer receiving the fold; None: the consumer has no bias yet (create one)
    exact: bool  # False where zero padding makes the contribution vary near borders
    input: str = ""  # the consumer's input tensor (calibration statistics are taken there)


@dataclass
class GroupEdit:
    """A grouped or depthwise Conv: its ``group`` attribute shrinks with its output channels."""

    node: str
    out_elems: np.ndarray
    group: int


@dataclass
class AxisEdit:
    """Integers that count channels along an axis: Split sizes, Slice bounds, Reshape/Resize dims."""

    node: str
    kind: Literal["split", "slice", "reshape", "resize"]
    axis: int
    chunks: list[np.ndarray]  # split: elements of each output; others: one array
    start: int = 0  # slice: original bounds on the input positions
    end: int = 0


@dataclass
class Unit:
    """One prunable channel: the set of coupled elements, removed or kept as a whole."""

    id: int
    group: int
    blocked: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.blocked


@dataclass
class ChannelGroup:
    """Units produced by the same set of layers (a layer, or layers coupled by Add/Mul/shared weights)."""

    id: int
    layers: list[str]  # producing nodes
    units: list[int]
    channels_per_unit: int = 1  # >1 for grouped convs, where a unit is a whole conv group
    reasons: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.units)
