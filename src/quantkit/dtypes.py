"""The registry of quantized number formats.

One :class:`QuantDType` per name. Everything else in quantkit asks the spec (bits, grid range,
integer or float) instead of branching on names:

==========  =====  =======  ==========================================================
name        bits   kind     grid
==========  =====  =======  ==========================================================
int2        2      int      signed [-2, 1], unsigned [0, 3]
int3        3      int      signed [-4, 3], unsigned [0, 7]
int4        4      int      signed [-8, 7], unsigned [0, 15]
int8        8      int      signed [-128, 127], unsigned [0, 255]
fp4         4      float    e2m1 (no inf/nan): +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}
fp8         8      float    e4m3fn (torch.float8_e4m3fn): max 448
fp8_e4m3    8      float    alias spelling of fp8
fp8_e5m2    8      float    e5m2 (torch.float8_e5m2): max 57344
float16     16     none     no quantization (identity)
==========  =====  =======  ==========================================================

Integer formats may be signed or unsigned and symmetric or with a zero point (see
:class:`quantkit.scheme.QuantScheme`; symmetric grids use the full range by default, e.g. int4
``scale = amax / 7.5`` with codes ``[-8, 7]``, or the restricted ``amax / 7``); float formats are always signed and symmetric with
a power-free scale per group (``x ~ scale * fp_value``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Kind = Literal["int", "float", "none"]


@dataclass(frozen=True)
class QuantDType:
    """Spec of one number format.

    Attributes:
        name: registry name (``int4``, ``fp8``, ...).
        bits: storage bits per code.
        kind: ``"int"`` (uniform integer grid), ``"float"`` (minifloat grid) or ``"none"``
            (float16: no quantization).
        exponent_bits / mantissa_bits / exponent_bias: the minifloat layout (float kinds only).
        max_value: largest finite magnitude of a float grid (float kinds only).
        torch_dtype: the torch dtype with the same grid, where torch has one (fp8 formats).
    """

    name: str
    bits: int
    kind: Kind
    exponent_bits: int = 0
    mantissa_bits: int = 0
    exponent_bias: int = 0
    max_value: float = 0.0
    torch_dtype: torch.dtype | None = None

    @property
    def is_int(self) -> bool:
        return self.kind == "int"

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    @property
    def is_identity(self) -> bool:
        """True for float16: tensors of this dtype are left unquantized."""
        return self.kind == "none"

    def qmin(self, unsigned: bool = False) -> int:
        """Smallest integer code (integer kinds)."""
        self._require_int("qmin")
        return 0 if unsigned else -(1 << (self.bits - 1))

    def qmax(self, unsigned: bool = False) -> int:
        """Largest integer code (integer kinds)."""
        self._require_int("qmax")
        return (1 << self.bits) - 1 if unsigned else (1 << (self.bits - 1)) - 1

    @property
    def min_normal_exponent(self) -> int:
        """Unbiased exponent of the smallest normal number (float kinds)."""
        return 1 - self.exponent_bias

    def _require_int(self, what: str) -> None:
        if not self.is_int:
            raise TypeError(f"{what} is defined for integer dtypes only, not {self.name!r}")


_SPECS = (
    QuantDType("int2", 2, "int"),
    QuantDType("int3", 3, "int"),
    QuantDType("int4", 4, "int"),
    QuantDType("int8", 8, "int"),
    QuantDType("fp4", 4, "float", exponent_bits=2, mantissa_bits=1, exponent_bias=1, max_value=6.0),
    QuantDType(
        "fp8", 8, "float", exponent_bits=4, mantissa_bits=3, exponent_bias=7, max_value=448.0,
        torch_dtype=torch.float8_e4m3fn,
    ),
    QuantDType(
        "fp8_e5m2", 8, "float", exponent_bits=5, mantissa_bits=2, exponent_bias=15,
        max_value=57344.0, torch_dtype=torch.float8_e5m2,
    ),
    QuantDType("float16", 16, "none"),
)
DTYPES: dict[str, QuantDType] = {spec.name: spec for spec in _SPECS}
_ALIASES = {"fp8_e4m3": "fp8", "fp8_e4m3fn": "fp8", "fp4_e2m1": "fp4", "fp16": "float16"}


def get_dtype(name: str | QuantDType) -> QuantDType:
    """Return the spec for ``name``; unknown names raise a ValueError listing the valid ones."""
    if isinstance(name, QuantDType):
        return name
    key = _ALIASES.get(name, name)
    if key not in DTYPES:
        valid = ", ".join(sorted(DTYPES) + sorted(_ALIASES))
        raise ValueError(f"unknown quantization dtype {name!r}; valid dtypes: {valid}")
    return DTYPES[key]


def dtype_names() -> list[str]:
    """Canonical names of every registered dtype."""
    return list(DTYPES)
