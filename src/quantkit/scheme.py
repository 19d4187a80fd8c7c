"""How a tensor is quantized: number format, granularity, group size, zero point, signedness.

A :class:`QuantScheme` is validated once at construction; the primitives, kernels and
algorithms take it as given. Tensors are viewed as 2-D ``(rows, cols)``: a weight is
``(out_features, in_features)``, an activation is ``(tokens, hidden)`` (leading dims
flattened). How granularity maps to the shape of the scale tensor:

===============  ==================  ===============================================
granularity      scale shape         one scale per
===============  ==================  ===============================================
per_tensor       (1, 1)              whole tensor
per_channel      (rows, 1)           row (output channel of a weight)
per_token        (rows, 1)           row (token of an activation)
per_group        (rows, ceil(C/g))   ``g`` consecutive columns of a row; column ``k``
                                     belongs to group ``k // g``, so where ``g`` does not
                                     divide ``C`` the last group is shorter
===============  ==================  ===============================================

``groupsize=-1`` with ``per_group`` means one group per row, i.e. ``per_channel``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from quantkit.dtypes import QuantDType, get_dtype

GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token")


@dataclass(frozen=True)
class QuantScheme:
    """A validated quantization recipe for one tensor.

    Args:
        dtype: a registered dtype name or spec (not ``float16``: that means "do not quantize").
        granularity: one of :data:`GRANULARITIES`.
        groupsize: columns per group for ``per_group`` (``-1``: per channel); must be ``-1``
            for the other granularities.
        has_zero: integer grids only: asymmetric min/max grid with an integer zero point.
        unsigned: integer grids only: codes in ``[0, 2**bits - 1]``. Without a zero point
            negative values clip to 0 (for non-negative tensors).
    """

    dtype: QuantDType
    granularity: str = "per_channel"
    groupsize: int = -1
    has_zero: bool = False
    unsigned: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", get_dtype(self.dtype))
        if self.dtype.is_identity:
            raise ValueError(
                f"dtype {self.dtype.name!r} means no quantization; it has no QuantScheme"
            )
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"unknown granularity {self.granularity!r}; valid: {', '.join(GRANULARITIES)}"
            )
        if not isinstance(self.groupsize, int) or isinstance(self.groupsize, bool):
            raise TypeError(f"groupsize must be an int, got {self.groupsize!r}")
        if self.groupsize == 0 or self.groupsize < -1:
            raise ValueError(
                f"groupsize must be a positive number of columns or -1 (per channel), "
                f"got {self.groupsize}"
            )
        if self.granularity == "per_group" and self.groupsize == -1:
            object.__setattr__(self, "granularity", "per_channel")
        elif self.granularity != "per_group" and self.groupsize != -1:
            raise ValueError(
                f"groupsize={self.groupsize} has no meaning with granularity "
                f"{self.granularity!r}; use per_group or groupsize=-1"
            )
        if self.dtype.is_float and (self.has_zero or self.unsigned):
            raise ValueError(
                f"{self.dtype.name} is a signed float grid: has_zero and unsigned must be false"
            )

    @property
    def bits(self) -> int:
        return self.dtype.bits

    @property
    def qmin(self) -> int:
        return self.dtype.qmin(self.unsigned)

    @property
    def qmax(self) -> int:
        return self.dtype.qmax(self.unsigned)

    def group_cols(self, cols: int) -> int:
        """Columns per group for a ``(rows, cols)`` tensor (``cols`` for per row/tensor)."""
        if self.granularity == "per_group":
            if self.groupsize > cols:
                raise ValueError(
                    f"groupsize={self.groupsize} is larger than the input dimension {cols}"
                )
            return self.groupsize
        return cols

    def num_groups(self, cols: int) -> int:
        """Groups per row: ``ceil(cols / groupsize)`` for per_group, else 1."""
        return math.ceil(cols / self.group_cols(cols))

    def scale_shape(self, rows: int, cols: int) -> tuple[int, int]:
        """Shape of the scale (and zero) tensor for a ``(rows, cols)`` input."""
        if self.granularity == "per_tensor":
            return (1, 1)
        return (rows, self.num_groups(cols))

    def describe(self) -> str:
        """Short human-readable form, e.g. ``int4 g128 asym``."""
        gran = {
            "per_tensor": "tensor", "per_channel": "channel", "per_token": "token",
            "per_group": f"g{self.groupsize}",
        }[self.granularity]
        zero = " asym" if self.has_zero else ""
        sign = " unsigned" if self.unsigned else ""
        return f"{self.dtype.name} {gran}{zero}{sign}"
