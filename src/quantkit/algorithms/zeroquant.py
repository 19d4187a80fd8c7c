"""ZeroQuant (Yao et al. 2022): fine-grained group-wise weights and token-wise activations.

The quantization recipe of the paper without its layer-by-layer distillation (LKD, a training
step outside post-training rounding): weights round-to-nearest with one scale (and zero) per
``groupsize`` input columns of a row (``groupsize=-1``: per output channel); activations with
one scale per token computed at run time (``quantization_type=dynamic``), or one per-tensor
scale calibrated once on the calibration data and stored in ``QuantLinear.act_scale``
(``static``; with an asymmetric grid also a zero point in ``QuantLinear.act_zero``). The
seed gives ``groupsize`` for "weights and activations": activations here are token-wise
(the paper's choice), so ``groupsize`` is the weights' group size only.

``w_has_zero``/``w_unsign`` and ``a_has_zero``/``a_unsign`` override the ``has_zero`` and
``unsigned`` of ``w_dtype``/``a_dtype`` (null: keep the dtype's); the result follows the grid
rule of every algorithm (:func:`quantkit.scheme.check_grid`). A zero point makes the grid
asymmetric (min/max range); without one the grid is symmetric and ``{w,a}_dtype.symmetric_range``
applies. ``unsign`` selects unsigned codes; it needs a zero point (without
one every negative value would clip to 0), and with one it shifts the codes (and the zero
point) by ``2**(bits-1)`` while the dequantized values stay the same: it matters to the
integer kernels and to export. Float grids (fp8, fp4) are signed and symmetric: setting a
zero point or unsigned codes on them is an error, as is any activation key when activations
are not quantized.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from typing import Any

from quantkit.algorithms.base import Algorithm, activation_scheme, default_granularity, grid_fields, weight_scheme
from quantkit.algorithms.registry import register
from quantkit.algorithms.rtn import RTN
from quantkit.config import DTypeConfig, check, check_choice, check_groupsize
from quantkit.dtypes import get_dtype
from quantkit.scheme import QuantScheme

QUANTIZATION_TYPES = ("dynamic", "static")


@dataclass(frozen=True)
class ZeroQuantConfig:
    """ZeroQuant settings (``conf/algo/zeroquant.yaml``); see the module doc."""

    name: str = "zeroquant"
    groupsize: int = 128
    w_has_zero: bool | None = None
    a_has_zero: bool | None = None
    w_unsign: bool | None = None
    a_unsign: bool | None = None
    quantization_type: str = "dynamic"
    block_sequential: bool = False
    layer_sequential: bool = False

    def __post_init__(self) -> None:
        check_groupsize("algo.groupsize", self.groupsize)
        check_choice("algo.quantization_type", self.quantization_type, QUANTIZATION_TYPES)


def override_grid(dtype: DTypeConfig, role: str, has_zero: bool | None, unsign: bool | None) -> DTypeConfig:
    """``dtype`` with ``has_zero``/``unsigned`` replaced by the ``algo.{w,a}_*`` keys that are set.

    ``role`` is ``w`` or ``a``; errors name the key responsible (``algo.a_has_zero``, ...).
    """
    keys = {f"algo.{role}_has_zero": has_zero, f"algo.{role}_unsign": unsign}
    dtype_key = f"{role}_dtype"
    spec = get_dtype(dtype.name)
    for key, value in keys.items():
        if value is None:
            continue
        check(not spec.is_identity,
              f"{key}={value} has nothing to act on: {dtype_key}={dtype.name} is not quantized")
        check(not (value and spec.is_float),
              f"{key}=true is not valid with {dtype_key}={dtype.name}: float grids are signed and "
              "symmetric; use an integer dtype (int2/int3/int4/int8) or set it to false/null")
    zero = dtype.has_zero if has_zero is None else has_zero
    unsigned = dtype.unsigned if unsign is None else unsign
    grid = dataclasses.replace(dtype, has_zero=zero, unsigned=unsigned)  # scale format and block kept
    # the grid rule of every algorithm, naming the key that set each flag
    grid_fields(grid, role, {
        "has_zero": f"algo.{role}_has_zero" if has_zero is not None else f"{dtype_key}.has_zero",
        "unsigned": f"algo.{role}_unsign" if unsign is not None else f"{dtype_key}.unsigned",
    })
    return grid


@register("zeroquant", ZeroQuantConfig)
class ZeroQuant(RTN):
    """Group-wise RTN weights, token-wise (or static per-tensor) activations: RTN with the
    grids ZeroQuant's keys select; the hooks are RTN's."""

    def __init__(self, config: ZeroQuantConfig, w_dtype: DTypeConfig, a_dtype: DTypeConfig) -> None:
        Algorithm.__init__(self, config, w_dtype, a_dtype)  # RTN's __init__ reads w_qtype/a_qtype keys
        self.w_scheme, self.a_scheme, self.o_scheme = self.build_schemes(config, w_dtype, a_dtype)
        check(self.a_scheme is not None,
              f"algo=zeroquant quantizes activations token-wise; a_dtype={a_dtype.name} leaves them "
              "unquantized: set a_dtype (e.g. a_dtype=int8), or use algo=rtn for weight-only quantization")

    def build_schemes(self, config: Any, w_dtype: DTypeConfig, a_dtype: DTypeConfig
                      ) -> tuple[QuantScheme | None, QuantScheme | None, QuantScheme | None]:
        """The dtypes with ZeroQuant's grid keys applied (to a ``layers`` rule's dtypes too)."""
        w_grid = override_grid(w_dtype, "w", config.w_has_zero, config.w_unsign)
        a_grid = override_grid(a_dtype, "a", config.a_has_zero, config.a_unsign)
        qtype = "per_group" if config.groupsize > 0 else "per_channel"
        a_qtype = "per_tensor" if config.quantization_type == "static" else "per_token"
        return (weight_scheme(w_grid, qtype, config.groupsize, default_granularity(config)),
                activation_scheme(a_grid, a_qtype), None)
