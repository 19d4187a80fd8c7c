"""RTN: round-to-nearest weights (and optionally activations) on the scheme's grid.

Needs no data for the weights. With ``a_qtype=per_tensor`` activations get a static scale
calibrated from the inputs each linear sees in the calibration pipeline, and then
``block_sequential``/``layer_sequential`` decide whether those inputs come from the already
quantized earlier blocks/sublayers. With weight-only or dynamic activation quantization the
two flags have nothing to act on (no calibration runs) and the run log says so.
``observer=mse`` clips each weight group's range by the search of
:class:`~quantkit.quant_linear.MSERange` (QuaRot's RTN weight clipping) instead of min/max.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from quantkit.algorithms.base import (
    Algorithm, Observer, activation_scheme, check_observer_keys, default_granularity, mse_range, weight_scheme,
)
from quantkit.algorithms.fold import FoldTarget
from quantkit.algorithms.registry import register
from quantkit.config import DTypeConfig, check_groupsize
from quantkit.layers import LayerScheme
from quantkit.quant_linear import MSERange, weight_qparams
from quantkit.scheme import QuantScheme


@dataclass(frozen=True)
class RTNConfig:
    name: str = "rtn"
    groupsize: int = 128
    w_qtype: str = "per_group"
    a_qtype: str = "per_token"
    block_sequential: bool = False
    layer_sequential: bool = False
    observer: str = "minmax"
    mse_grid: int = MSERange.n_grid
    mse_max_shrink: float = MSERange.max_shrink
    mse_norm: float = MSERange.norm

    def __post_init__(self) -> None:
        check_groupsize("algo.groupsize", self.groupsize)
        check_observer_keys(self)


@register("rtn", RTNConfig)
class RTN(Algorithm):
    def __init__(self, config: RTNConfig, w_dtype: DTypeConfig, a_dtype: DTypeConfig) -> None:
        super().__init__(config, w_dtype, a_dtype)
        self.w_scheme, self.a_scheme, self.o_scheme = self.build_schemes(config, w_dtype, a_dtype)

    def build_schemes(self, config: Any, w_dtype: DTypeConfig, a_dtype: DTypeConfig
                      ) -> tuple[QuantScheme | None, QuantScheme | None, QuantScheme | None]:
        return (weight_scheme(w_dtype, config.w_qtype, config.groupsize, default_granularity(config)),
                activation_scheme(a_dtype, config.a_qtype), None)

    def quantize_group(
        self, linears: dict[str, nn.Linear], observers: dict[str, Observer], prev: FoldTarget | None,
        schemes: Mapping[str, LayerScheme] | None = None,
    ) -> dict[str, nn.Module]:
        return {name: self._to_quant_linear(lin, observers.get(name), self._scheme(schemes, name))
                for name, lin in linears.items()}

    def quantize_outside_block(self, name: str, linear: nn.Linear, scheme: LayerScheme | None = None) -> nn.Module:
        scheme = scheme or self.run_scheme
        if scheme.a_static:
            return super().quantize_outside_block(name, linear, scheme)
        return self._to_quant_linear(linear, None, scheme)

    def _to_quant_linear(self, linear: nn.Linear, observer: Observer | None, scheme: LayerScheme | None = None,
                         **kwargs: Any) -> nn.Module:
        scheme = scheme or self.run_scheme
        mse = mse_range(self.config)
        if mse is not None and scheme.w is not None:
            kwargs["qparams"] = weight_qparams(linear.weight, scheme.w, mse=mse)
        return super()._to_quant_linear(linear, observer, scheme, **kwargs)
