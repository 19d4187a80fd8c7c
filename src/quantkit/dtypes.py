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
fp6_e2m3    6      float    e2m3 (no inf/nan): max 7.5, smallest subnormal 0.125
fp6_e3m2    6      float    e3m2 (no inf/nan): max 28, smallest subnormal 0.0625
fp8         8      float    e4m3fn (torch.float8_e4m3fn): max 448, NaN = S.1111.111
fp8_e4m3    8      float    alias spelling of fp8
fp8_e5m2    8      float    e5m2 (torch.float8_e5m2): max 57344, inf and NaN
float16     16     none     no quantization (identity)
==========  =====  =======  ==========================================================

Block-scaled formats are these element grids with a scale format and a block by default (the
scheme may override both, see :class:`quantkit.scheme.QuantScheme`):

===========  =========  ============  ========  =============================================
name         element    scale         block     defined by
===========  =========  ============  ========  =============================================
mxfp4        fp4 e2m1   e8m0          1 x 32    OCP Microscaling (MX) v1.0
mxfp6_e2m3   fp6 e2m3   e8m0          1 x 32    OCP MX v1.0
mxfp6_e3m2   fp6 e3m2   e8m0          1 x 32    OCP MX v1.0
mxfp8        fp8 e4m3   e8m0          1 x 32    OCP MX v1.0
nvfp4        fp4 e2m1   e4m3 + fp32   1 x 16    NVIDIA NVFP4 (an fp32 scale per tensor on top)
fp8_block    fp8 e4m3   float32       128 x 128 DeepSeek-V3 style weight blocks (activations:
                                                1 x 128 groups per token)
===========  =========  ============  ========  =============================================

Scale formats (:data:`SCALE_FORMATS`; the math is in :mod:`quantkit.scales`):

* ``float16`` / ``float32``: the scale ``amax / max`` rounded to that float (quantkit's default);
* ``e8m0``: an unsigned power of two ``2**(E - 127)``, ``E`` in ``[0, 254]``, ``E = 255`` NaN
  (1 byte, the MX shared scale);
* ``e4m3``: an fp8 e4m3fn scale (1 byte) times one fp32 scale per tensor (NVFP4's two levels).

Integer formats may be signed or unsigned and symmetric or with a zero point (see
:class:`quantkit.scheme.QuantScheme`; symmetric grids use the full range by default, e.g. int4
``scale = amax / 7.5`` with codes ``[-8, 7]``, or the restricted ``amax / 7``); float formats are always signed and symmetric with
a scale per group (``x ~ scale * fp_value``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

Kind = Literal["int", "float", "none"]

# scale formats and the bits one scale takes in storage (e4m3 adds one fp32 per tensor)
SCALE_FORMATS = ("float16", "float32", "e8m0", "e4m3")
SCALE_BITS = {"float16": 16, "float32": 32, "e8m0": 8, "e4m3": 8}
# scale formats that only float element grids take (a power-of-two or fp8 scale of a minifloat)
FLOAT_ONLY_SCALE_FORMATS = ("e8m0", "e4m3")


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
        specials: codes with the all-ones exponent that are not numbers: ``"none"`` (every
            code is finite: fp4, fp6), ``"nan"`` (e4m3fn: only ``S.1111.111`` is NaN) or
            ``"ieee"`` (e5m2: all-ones exponent is inf with mantissa 0, NaN otherwise).
        scale_format: the format its scales are stored in by default (:data:`SCALE_FORMATS`).
        block: its default block ``(rows, cols)`` (None: the run's group size decides).
        element: for block-format presets, the name of their element grid.
    """

    name: str
    bits: int
    kind: Kind
    exponent_bits: int = 0
    mantissa_bits: int = 0
    exponent_bias: int = 0
    max_value: float = 0.0
    torch_dtype: torch.dtype | None = None
    specials: str = "none"
    scale_format: str = "float16"
    block: tuple[int, int] | None = None
    element: str | None = None

    @property
    def element_name(self) -> str:
        """The element grid's own name (``fp4`` for mxfp4 and nvfp4, else the name itself)."""
        return self.element or self.name

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

    @property
    def emax(self) -> int:
        """Exponent of the largest normal value, ``floor(log2(max_value))`` (float kinds): the
        offset the OCP MX scale subtracts (e2m1 2, e2m3 2, e3m2 4, e4m3 8, e5m2 15)."""
        self._require_float("emax")
        return math.frexp(self.max_value)[1] - 1

    @property
    def is_block_format(self) -> bool:
        """A preset with its own block (mxfp4, nvfp4, fp8_block, ...)."""
        return self.block is not None

    def _require_float(self, what: str) -> None:
        if not self.is_float:
            raise TypeError(f"{what} is defined for float dtypes only, not {self.name!r}")

    def _require_int(self, what: str) -> None:
        if not self.is_int:
            raise TypeError(f"{what} is defined for integer dtypes only, not {self.name!r}")


_FP4 = QuantDType("fp4", 4, "float", exponent_bits=2, mantissa_bits=1, exponent_bias=1, max_value=6.0)
_FP6_E2M3 = QuantDType("fp6_e2m3", 6, "float", exponent_bits=2, mantissa_bits=3, exponent_bias=1,
                       max_value=7.5)
_FP6_E3M2 = QuantDType("fp6_e3m2", 6, "float", exponent_bits=3, mantissa_bits=2, exponent_bias=3,
                       max_value=28.0)
_FP8 = QuantDType("fp8", 8, "float", exponent_bits=4, mantissa_bits=3, exponent_bias=7, max_value=448.0,
                  torch_dtype=torch.float8_e4m3fn, specials="nan")


def _preset(name: str, element: QuantDType, scale_format: str, block: tuple[int, int]) -> QuantDType:
    return dataclasses.replace(element, name=name, scale_format=scale_format, block=block,
                               element=element.name)


_SPECS = (
    QuantDType("int2", 2, "int"),
    QuantDType("int3", 3, "int"),
    QuantDType("int4", 4, "int"),
    QuantDType("int8", 8, "int"),
    _FP4,
    _FP6_E2M3,
    _FP6_E3M2,
    _FP8,
    QuantDType(
        "fp8_e5m2", 8, "float", exponent_bits=5, mantissa_bits=2, exponent_bias=15,
        max_value=57344.0, torch_dtype=torch.float8_e5m2, specials="ieee",
    ),
    _preset("mxfp4", _FP4, "e8m0", (1, 32)),
    _preset("mxfp6_e2m3", _FP6_E2M3, "e8m0", (1, 32)),
    _preset("mxfp6_e3m2", _FP6_E3M2, "e8m0", (1, 32)),
    _preset("mxfp8", _FP8, "e8m0", (1, 32)),
    _preset("nvfp4", _FP4, "e4m3", (1, 16)),
    _preset("fp8_block", _FP8, "float32", (128, 128)),
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
