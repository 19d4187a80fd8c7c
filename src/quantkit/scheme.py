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

``groupsize=-1`` with ``per_group`` means one group per row, i.e. ``per_channel``. A per_group
scheme with ``block_rows = R > 1`` has 2-D blocks of ``R`` rows by ``groupsize`` columns (e.g.
fp8 weights in 128 x 128 blocks): scale shape ``(ceil(rows / R), ceil(C / g))``, row ``r`` uses
scale row ``r // R`` (the last row block may be shorter too).

Scale formats (``scale_format``, :data:`quantkit.dtypes.SCALE_FORMATS`): the scale of every group
is a value of that format (:mod:`quantkit.scales` has the rules): ``float16``/``float32`` (the
default for integer grids and plain fp4/fp6/fp8), ``e8m0`` (a power of two, OCP MX) or ``e4m3``
(fp8 times one fp32 scale per tensor, NVFP4). ``e8m0`` and ``e4m3`` are scales of float grids
only. Block-format dtypes (mxfp4, nvfp4, ...) bring their own default.

Integer grids (``b`` bits, ``qmin = -2^(b-1)``, ``qmax = 2^(b-1) - 1``, unsigned ``[0, 2^b - 1]``):

=====================  =============================  ======================================
grid                   scale of a group               codes used
=====================  =============================  ======================================
symmetric, full        ``amax / (qmax + 1/2)``        all ``2^b``: int4 ``[-8, 7]``; ``+amax``
(the default)          (int4: ``amax / 7.5``)         maps to 7.5, rounds to 8, clamps to 7
symmetric, restricted  ``amax / qmax``                ``2^b - 1``: int4 ``[-7, 7]`` (``-8``
                       (int4: ``amax / 7``)           never occurs)
zero point             ``(hi - lo) / (qmax - qmin)``  all, ``x ~ (q - z) * s``
=====================  =============================  ======================================

The full symmetric grid is the one of the GPTQ reference quantizer (``scale = 2 * amax /
(2^b - 1)``, ``q = clamp(round(x / s) + 2^(b-1), 0, 2^b - 1)``) and of compressed-tensors /
llm-compressor (``scale = amax / ((qmax - qmin) / 2)``, ``q = round(clamp(x / s, qmin,
qmax))``): the same scale and, with round half to even, the same codes as ours (``+amax``
lands on code ``qmax``; ``-amax`` on ``qmin``, or on ``qmin + 1`` where the rounded scale makes
``-amax / s`` fall just short of the tie). It has one more level than the restricted grid for
the same bits and the same half-step error bound on ``[-amax, amax]``. (The GPTQ
reference differs in one corner only: a group without negative values gets ``amax / (2^b -
1)`` there, which clips its upper half; ours keeps ``amax / (qmax + 1/2)``.) Runs use it for
weights by default and the restricted grid for activations (what SmoothQuant's reference and
vLLM's dynamic int8 activation quantization compute); ``symmetric_range`` chooses.

:func:`check_grid` is the one rule for the grids a run asks for (weights and activations):
an unsigned integer grid without a zero point would clip every negative value to 0, so it is
refused there. :class:`QuantScheme` itself still allows it, for tensors the caller knows to be
non-negative.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from quantkit.dtypes import FLOAT_ONLY_SCALE_FORMATS, SCALE_BITS, SCALE_FORMATS, QuantDType, get_dtype

GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token")
SYMMETRIC_RANGES = ("full", "restricted")
ALLOWED_INT_GRIDS = (
    "has_zero=true with unsigned=true or false (asymmetric min/max grid with a zero point), or "
    "has_zero=false with unsigned=false (symmetric signed grid; symmetric_range=full or restricted)"
)


def has_symmetric_range(dtype: str | QuantDType, has_zero: bool, unsigned: bool) -> bool:
    """Whether ``symmetric_range`` means something: signed integer grids without a zero point."""
    return get_dtype(dtype).is_int and not has_zero and not unsigned


def check_grid(
    dtype: str | QuantDType,
    has_zero: bool,
    unsigned: bool,
    symmetric_range: str | None = None,
    keys: Mapping[str, str] | None = None,
) -> None:
    """The rule every weight or activation grid of a run follows; a ValueError otherwise.

    ``symmetric_range=None`` means "the default of the role" (weights: full, activations:
    restricted). ``keys`` maps ``dtype``/``has_zero``/``unsigned``/``symmetric_range`` to the
    config keys that set them (e.g. ``w_dtype.has_zero`` or ``algo.w_has_zero``), so the
    message names what the user typed. Refused:

    * any of the three flags on ``float16`` (nothing is quantized);
    * a zero point or unsigned codes on a float grid (fp8, fp4 are signed and symmetric);
    * an unsigned integer grid without a zero point: every negative value would clip to 0;
    * ``symmetric_range`` other than full/restricted, or set on a grid it does not act on.
    """
    key = {"dtype": "dtype", "has_zero": "has_zero", "unsigned": "unsigned",
           "symmetric_range": "symmetric_range", **(keys or {})}
    spec = get_dtype(dtype)
    set_flags = [f"{key[k]}={v}" for k, v in
                 (("has_zero", has_zero), ("unsigned", unsigned), ("symmetric_range", symmetric_range))
                 if v not in (False, None)]
    if spec.is_identity:
        if set_flags:
            raise ValueError(f"{', '.join(set_flags)} has nothing to act on: {key['dtype']}={spec.name} "
                             "is not quantized")
        return
    if symmetric_range is not None and symmetric_range not in SYMMETRIC_RANGES:
        raise ValueError(f"{key['symmetric_range']}={symmetric_range!r} is not valid; choose one of: "
                         f"{', '.join(SYMMETRIC_RANGES)} (or leave it null for the default)")
    if spec.is_float:
        if set_flags:
            raise ValueError(
                f"{', '.join(set_flags)} is not valid with {key['dtype']}={spec.name}: float grids are "
                "signed and symmetric with one scale per group; use an integer dtype "
                "(int2/int3/int4/int8) or drop the setting"
            )
        return
    if unsigned and not has_zero:
        raise ValueError(
            f"{key['unsigned']}=true without a zero point ({key['has_zero']}=false) is an unsigned grid "
            f"on which every negative value would clip to 0. Allowed integer grids: {ALLOWED_INT_GRIDS}. "
            f"Set {key['unsigned']}=false (symmetric signed) or {key['has_zero']}=true (asymmetric)"
        )
    if symmetric_range is not None and not has_symmetric_range(spec, has_zero, unsigned):
        raise ValueError(
            f"{key['symmetric_range']}={symmetric_range} acts on symmetric signed grids only "
            f"({key['has_zero']}=false, {key['unsigned']}=false); with {key['has_zero']}=true the "
            "grid spans [min, max] with a zero point: leave it null"
        )


def check_format(
    dtype: str | QuantDType,
    scale_format: str | None,
    block: object,
    keys: Mapping[str, str] | None = None,
) -> tuple[str, tuple[int, int] | None]:
    """The scale format and block of a dtype config, defaults filled in; a ValueError otherwise.

    ``scale_format=None`` and ``block=None`` mean the dtype's own (``float16`` and no block for
    plain grids; ``e8m0`` and ``(1, 32)`` for mxfp4, ...). ``block`` is ``N`` or ``[N]`` (one row
    by ``N`` columns) or ``[rows, cols]``. ``keys`` maps ``dtype``/``scale_format``/``block`` to
    the config keys that set them, for the messages.
    """
    key = {"dtype": "dtype", "scale_format": "scale_format", "block": "block", **(keys or {})}
    spec = get_dtype(dtype)
    if spec.is_identity:
        set_keys = [f"{key[k]}={v}" for k, v in (("scale_format", scale_format), ("block", block)) if v is not None]
        if set_keys:
            raise ValueError(f"{', '.join(set_keys)} has nothing to act on: {key['dtype']}={spec.name} "
                             "is not quantized")
        return "float16", None
    fmt = spec.scale_format if scale_format is None else scale_format
    if fmt not in SCALE_FORMATS:
        raise ValueError(f"{key['scale_format']}={scale_format!r} is not valid; choose one of: "
                         f"{', '.join(SCALE_FORMATS)} (or leave it null for {spec.name}'s own, {spec.scale_format})")
    if fmt in FLOAT_ONLY_SCALE_FORMATS and not spec.is_float:
        raise ValueError(f"{key['scale_format']}={fmt} scales float grids only (fp4, fp6_*, fp8, mx*, nvfp4); "
                         f"{key['dtype']}={spec.name} is an integer grid: use float16 or float32")
    if block is None:
        return fmt, spec.block
    values = [block] if isinstance(block, int) and not isinstance(block, bool) else block
    ok = isinstance(values, (list, tuple)) and len(values) in (1, 2) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
    if not ok:
        shown = list(block) if isinstance(block, tuple) else block
        raise ValueError(f"{key['block']}={shown!r} is not valid: give the columns of a block (e.g. 32), "
                         "[columns] or [rows, columns], positive integers (or null for the dtype's own)")
    rows, cols = (1, values[0]) if len(values) == 1 else tuple(values)
    return fmt, (rows, cols)


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
            negative values clip to 0: only for tensors known to be non-negative (runs refuse
            it, see :func:`check_grid`).
        symmetric_range: signed integer grids without a zero point: ``full`` (default,
            ``scale = amax / (qmax + 1/2)``, every code available) or ``restricted``
            (``amax / qmax``, the most negative code unused). Must stay ``full`` elsewhere.
        scale_format: how each scale is represented (``None``: the dtype's own, see
            :data:`quantkit.dtypes.SCALE_FORMATS`).
        block_rows: rows of a 2-D block (per_group only; 1: groups within a row).
        clip_ratio: in ``(0, 1]``: a group's scale covers ``clip_ratio * amax`` (values beyond
            saturate to the grid's end), i.e. ``absmax_code`` is divided by it. Grids without a
            zero point whose scale is ``amax / absmax_code`` (float16/float32 scales) only; on a
            restricted grid saturated negative values then reach ``qmin`` as well. Runs
            use it for activations (``a_dtype.clip_ratio``; QuaRot clips per-token int4
            activations at 0.9).
    """

    dtype: QuantDType
    granularity: str = "per_channel"
    groupsize: int = -1
    has_zero: bool = False
    unsigned: bool = False
    symmetric_range: str = "full"
    scale_format: str | None = None
    block_rows: int = 1
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", get_dtype(self.dtype))
        if self.scale_format is None:
            object.__setattr__(self, "scale_format", self.dtype.scale_format)
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
        if self.symmetric_range not in SYMMETRIC_RANGES:
            raise ValueError(
                f"symmetric_range={self.symmetric_range!r} is not valid; choose one of: "
                f"{', '.join(SYMMETRIC_RANGES)}"
            )
        if self.scale_format not in SCALE_FORMATS:
            raise ValueError(f"scale_format={self.scale_format!r} is not valid; choose one of: "
                             f"{', '.join(SCALE_FORMATS)}")
        if self.scale_format in FLOAT_ONLY_SCALE_FORMATS and not self.dtype.is_float:
            raise ValueError(f"scale_format={self.scale_format} scales float grids only, not {self.dtype.name}")
        if not isinstance(self.block_rows, int) or isinstance(self.block_rows, bool) or self.block_rows < 1:
            raise ValueError(f"block_rows must be a positive int, got {self.block_rows!r}")
        if self.block_rows > 1 and (self.granularity != "per_group" or self.has_zero):
            raise ValueError(f"block_rows={self.block_rows} (2-D blocks) needs per_group granularity "
                             f"without a zero point, got {self.granularity}, has_zero={self.has_zero}")
        if isinstance(self.clip_ratio, bool) or not isinstance(self.clip_ratio, (int, float)) \
                or not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio must be a number in (0, 1], got {self.clip_ratio!r}")
        object.__setattr__(self, "clip_ratio", float(self.clip_ratio))
        if self.clip_ratio != 1.0 and (self.has_zero or self.scale_format in FLOAT_ONLY_SCALE_FORMATS):
            raise ValueError(
                f"clip_ratio={self.clip_ratio} needs a grid whose scale is amax / absmax_code: no zero point "
                f"and float16/float32 scales, not {self.dtype.name} with has_zero={self.has_zero}, "
                f"scale_format={self.scale_format}"
            )
        if self.symmetric_range != "full" and not self.symmetric:
            raise ValueError(
                f"symmetric_range={self.symmetric_range} acts on signed integer grids without a "
                f"zero point only, not on {self.dtype.name} with has_zero={self.has_zero}, "
                f"unsigned={self.unsigned}"
            )

    @property
    def bits(self) -> int:
        return self.dtype.bits

    @property
    def has_global_scale(self) -> bool:
        """e4m3 scales come with one fp32 scale per tensor (NVFP4's second level)."""
        return self.scale_format == "e4m3"

    @property
    def scale_bits(self) -> int:
        """Storage bits of one scale (the per-tensor fp32 of e4m3 not included)."""
        return SCALE_BITS[self.scale_format]

    @property
    def qmin(self) -> int:
        return self.dtype.qmin(self.unsigned)

    @property
    def qmax(self) -> int:
        return self.dtype.qmax(self.unsigned)

    @property
    def symmetric(self) -> bool:
        """A signed integer grid without a zero point (where ``symmetric_range`` acts)."""
        return has_symmetric_range(self.dtype, self.has_zero, self.unsigned)

    @property
    def absmax_code(self) -> float:
        """The code value the largest magnitude of a group maps to, on grids without a zero
        point: ``scale = amax / absmax_code``. Float grids: their largest finite value;
        unsigned integer grids: ``qmax`` (of ``max(x, 0)``); signed integer grids:
        ``qmax + 1/2`` (full range) or ``qmax`` (restricted); each divided by ``clip_ratio``."""
        if self.has_zero:
            raise ValueError(f"{self.describe()} has a zero point: its scale is (hi - lo) / (qmax - qmin)")
        if self.dtype.is_float:
            code = float(self.dtype.max_value)
        elif self.symmetric and self.symmetric_range == "full":
            code = self.qmax + 0.5
        else:
            code = float(self.qmax)
        return code if self.clip_ratio == 1.0 else code / self.clip_ratio

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
        return (math.ceil(rows / self.block_rows), self.num_groups(cols))

    def describe(self) -> str:
        """Short human-readable form, e.g. ``int4 g128 asym``, ``int4 g64`` (symmetric, full
        range), ``int8 token restricted``, ``mxfp4 g32``, ``fp8_block b128x128`` (2-D blocks) or
        ``fp4 g32 e8m0`` (a scale format other than the dtype's own)."""
        gran = {
            "per_tensor": "tensor", "per_channel": "channel", "per_token": "token",
            "per_group": f"g{self.groupsize}" if self.block_rows == 1 else f"b{self.block_rows}x{self.groupsize}",
        }[self.granularity]
        zero = " asym" if self.has_zero else ""
        sign = " unsigned" if self.unsigned else ""
        restricted = " restricted" if self.symmetric_range == "restricted" else ""
        scales = f" {self.scale_format}" if self.scale_format != self.dtype.scale_format else ""
        clip = f" clip{self.clip_ratio:g}" if self.clip_ratio != 1.0 else ""
        return f"{self.dtype.name} {gran}{zero}{sign}{restricted}{scales}{clip}"
