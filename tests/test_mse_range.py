"""The MSE range search (``algo.observer=mse`` of GPTQ; :class:`quantkit.quant_linear.MSERange`)."""

from __future__ import annotations

import pytest
import torch

from quantkit import reference as ref
from quantkit.algorithms.gptq import GPTQConfig, gptq_quantize
from quantkit.algorithms.rtn import RTN, RTNConfig
from quantkit.config import ConfigError, DTypeConfig
from quantkit.quant_linear import MSERange, QuantLinear, weight_qparams
from quantkit.scheme import QuantScheme
from tests.test_gptq import problem

SCHEMES = [
    pytest.param(QuantScheme("int4", "per_group", 32, has_zero=True, unsigned=True), id="int4-g32-asym"),
    pytest.param(QuantScheme("int4", "per_group", 40), id="int4-g40-sym-short-last"),
    pytest.param(QuantScheme("int3", "per_channel"), id="int3-channel"),
    pytest.param(QuantScheme("fp4", "per_group", 32), id="fp4-g32"),
    pytest.param(QuantScheme("nvfp4", "per_group", 16), id="nvfp4-e4m3"),
    pytest.param(QuantScheme("mxfp4", "per_group", 32), id="mxfp4-e8m0"),
    pytest.param(QuantScheme("int8", "per_tensor"), id="int8-tensor"),
]


def _weight(rows: int = 24, cols: int = 96) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(3)) * 0.05
    w[::5, 7] *= 12.0  # outliers: where clipping pays off
    return w


def _group_loss(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme,
                norm: float = 2.4) -> torch.Tensor:
    q = ref.dequantize(ref.quantize(w, scale, zero, scheme), scale, zero, scheme)
    return ref.group_sum((q - w).abs().pow(norm), scheme)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_search_is_never_worse_than_minmax_on_its_loss(scheme: QuantScheme) -> None:
    w = _weight()
    s0, z0 = weight_qparams(w, scheme)
    s1, z1 = weight_qparams(w, scheme, mse=MSERange())
    assert s1.shape == s0.shape and (z1 is None) == (z0 is None)
    if z0 is not None:
        assert torch.equal(z0, z1)  # shrinking both ends keeps the zero point
    assert (s1 <= s0).all()  # the range only shrinks
    assert (_group_loss(w, s1, z1, scheme) <= _group_loss(w, s0, z0, scheme)).all()


def test_search_clips_the_groups_with_outliers() -> None:
    scheme = QuantScheme("int4", "per_group", 32, has_zero=True, unsigned=True)
    w = _weight()
    s0, _ = weight_qparams(w, scheme)
    s1, _ = weight_qparams(w, scheme, mse=MSERange())
    assert (s1 < s0).any()
    assert torch.equal(weight_qparams(w, scheme, mse=MSERange(max_shrink=0.0))[0], s0)  # only f = 1


@pytest.mark.parametrize("actorder", [False, True], ids=["dynamic-groups", "static-groups"])
def test_gptq_with_mse_range_stores_consistent_codes(actorder: bool) -> None:
    W, H = problem()
    scheme = QuantScheme("int4", "per_group", 32, has_zero=True, unsigned=True)
    plain = gptq_quantize(W, H, scheme, actorder=actorder)
    codes, scale, zero, stats = gptq_quantize(W, H, scheme, actorder=actorder, mse=MSERange())
    assert not torch.equal(scale, plain[1])
    assert torch.equal(ref.dequantize(codes, scale, zero, scheme), stats.weight)
    module = QuantLinear(W.shape[1], W.shape[0], False, scheme)
    module.set_weight(codes, scale, zero)
    assert torch.equal(module.dequantized_weight(), stats.weight)


def test_rtn_with_mse_range_quantizes_on_the_searched_scales() -> None:
    linear = torch.nn.Linear(96, 24, bias=False)
    with torch.no_grad():
        linear.weight.copy_(_weight())
    algo = RTN(RTNConfig(groupsize=32, observer="mse"), DTypeConfig("int4", has_zero=True, unsigned=True),
               DTypeConfig("float16"))
    module = algo.quantize_group({"q": linear}, {}, None)["q"]
    scheme = algo.w_scheme
    scale, zero = weight_qparams(linear.weight, scheme, mse=MSERange())
    assert torch.equal(module.effective_scales(), scale) and torch.equal(module.zeros(), zero)
    assert not torch.equal(scale, weight_qparams(linear.weight, scheme)[0])


@pytest.mark.parametrize("config", [GPTQConfig, RTNConfig])
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(observer="l2"), "algo.observer='l2' is not valid"),
        (dict(mse_grid=50), "algo.mse_grid=50 acts only with algo.observer=mse"),
        (dict(observer="mse", mse_grid=0), "algo.mse_grid=0 must be an int >= 1"),
        (dict(observer="mse", mse_max_shrink=1.0), "algo.mse_max_shrink=1.0 must be in \\[0, 1\\)"),
        (dict(observer="mse", mse_norm=0.0), "algo.mse_norm=0.0 must be > 0"),
    ],
    ids=["observer", "without-mse", "grid", "shrink", "norm"],
)
def test_config_refuses_bad_observer_settings(config, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        config(**kwargs)
