"""Activation clipping (``a_dtype.clip_ratio``): a scale covers ``clip_ratio * amax``.

The ratio divides :attr:`QuantScheme.absmax_code`, which the torch reference and every Triton
kernel that computes scales (quantize, fused Hadamard + quantize, smoothing + quantize) read, so
the kernels stay bit-exact with the reference; the config layer accepts it for activations on
grids whose scale is ``amax / absmax_code`` and refuses it everywhere else, naming the key.
"""

from __future__ import annotations

import pytest
import torch

from quantkit import hadamard as had
from quantkit import ops, reference
from quantkit.algorithms.base import activation_scheme, weight_scheme
from quantkit.config import ConfigError, DTypeConfig
from quantkit.export import ExportError, export_format
from quantkit.kernels.hadamard import hadamard_quantize
from quantkit.kernels.quantize import quantize
from quantkit.kernels.smooth_quant import smooth_quantize_per_token
from quantkit.scheme import QuantScheme

CLIPPED = [
    pytest.param(QuantScheme("int4", "per_token", symmetric_range="restricted", clip_ratio=0.9), id="int4-token-0.9"),
    pytest.param(QuantScheme("int8", "per_token", symmetric_range="restricted", clip_ratio=0.8), id="int8-token-0.8"),
    pytest.param(QuantScheme("int4", "per_group", 32, clip_ratio=0.85), id="int4-g32-full-0.85"),
    pytest.param(QuantScheme("fp4", "per_token", clip_ratio=0.9), id="fp4-token-0.9"),
    pytest.param(QuantScheme("fp8", "per_tensor", clip_ratio=0.5), id="fp8-tensor-0.5"),
]


def _sample(rows: int = 9, cols: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-2, 2, rows).unsqueeze(1)
    x[:, 3] *= 20.0  # an outlier channel: what clipping trades against
    return x


def test_clip_ratio_divides_the_absmax_code_and_shows_in_describe() -> None:
    scheme = QuantScheme("int4", "per_token", symmetric_range="restricted", clip_ratio=0.5)
    assert scheme.absmax_code == 14.0
    assert QuantScheme("fp4", "per_token", clip_ratio=0.75).absmax_code == 8.0
    assert scheme.describe() == "int4 token restricted clip0.5"
    assert QuantScheme("int4", "per_token").clip_ratio == 1.0


def test_values_beyond_the_clipped_range_saturate() -> None:
    """amax 1 at clip 0.5 on the restricted int4 grid: scale 1/14, so 1 and 0.5 both map to 7;
    saturated negative values reach the grid's end, -8 (unclipped, a restricted grid never does)."""
    scheme = QuantScheme("int4", "per_token", symmetric_range="restricted", clip_ratio=0.5)
    codes, scale, zero = reference.quantize_tensor(torch.tensor([[1.0, 0.5, 0.3, -0.5, -1.0]]), scheme)
    assert zero is None and torch.equal(scale, torch.tensor([[1.0 / 14.0]]))
    assert codes.tolist() == [[7, 7, 4, -7, -8]]


def test_clipping_lowers_the_error_of_the_bulk() -> None:
    """The reason to clip: rows with one outlier lose less on their other values."""
    x = _sample()
    plain = QuantScheme("int4", "per_token", symmetric_range="restricted")
    clipped = QuantScheme("int4", "per_token", symmetric_range="restricted", clip_ratio=0.5)
    bulk = torch.ones_like(x, dtype=torch.bool)
    bulk[:, 3] = False

    def err(s: QuantScheme) -> float:
        return float(((reference.fake_quantize(x, s) - x)[bulk] / x.abs().amax(1, keepdim=True).expand_as(x)[bulk])
                     .pow(2).mean())

    assert err(clipped) < err(plain)


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5, True, "0.9"])
def test_scheme_refuses_a_ratio_outside_0_1(value: object) -> None:
    with pytest.raises(ValueError, match="clip_ratio must be a number in \\(0, 1\\]"):
        QuantScheme("int8", "per_token", clip_ratio=value)


@pytest.mark.parametrize("kwargs", [dict(dtype="int4", has_zero=True), dict(dtype="mxfp4", granularity="per_group",
                                                                             groupsize=32)], ids=["asym", "e8m0"])
def test_scheme_refuses_clipping_where_the_scale_is_not_amax_over_a_code(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="clip_ratio=0.9 needs a grid whose scale is amax / absmax_code"):
        QuantScheme(**kwargs, clip_ratio=0.9)


@pytest.mark.interpreter
@pytest.mark.parametrize("scheme", CLIPPED)
def test_quantize_kernel_matches_reference(scheme: QuantScheme) -> None:
    x = _sample()
    got, want = quantize(x, scheme), reference.quantize_tensor(x, scheme)
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.interpreter
def test_fused_hadamard_quantize_matches_reference() -> None:
    scheme = QuantScheme("int4", "per_token", symmetric_range="restricted", clip_ratio=0.9)
    x = _sample(5, 384)  # 384 = 12 x 32: a chunk-mix matrix of order 12
    had_k = had.chunk_matrix(384)
    got, want = hadamard_quantize(x, had_k, scheme), had.hadamard_quantize_reference(x, had_k, scheme)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not torch.equal(want[1], had.hadamard_quantize_reference(
        x, had_k, QuantScheme("int4", "per_token", symmetric_range="restricted"))[1])


@pytest.mark.interpreter
def test_smooth_quantize_kernel_matches_reference() -> None:
    scheme = QuantScheme("int8", "per_token", symmetric_range="restricted", clip_ratio=0.8)
    x = _sample()
    smooth = torch.linspace(0.5, 2.0, x.shape[1])
    got = smooth_quantize_per_token(x, smooth, scheme)
    want = ops.smooth_quantize_per_token(x, smooth, scheme, backend="torch")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_config_accepts_activation_clipping() -> None:
    scheme = activation_scheme(DTypeConfig("int4", clip_ratio=0.9), "per_token")
    assert scheme.clip_ratio == 0.9 and scheme.symmetric_range == "restricted"


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: weight_scheme(DTypeConfig("int4", clip_ratio=0.9), "per_group", 128), "w_dtype.clip_ratio=0.9"),
        (lambda: activation_scheme(DTypeConfig("float16", clip_ratio=0.9), "per_token"),
         "a_dtype.clip_ratio=0.9 has nothing to act on"),
        (lambda: activation_scheme(DTypeConfig("int4", has_zero=True, unsigned=True, clip_ratio=0.9), "per_token"),
         "a_dtype.clip_ratio=0.9 .* without a zero point"),
        (lambda: activation_scheme(DTypeConfig("mxfp4", clip_ratio=0.9), "per_token"), "scale_format=e8m0"),
        (lambda: DTypeConfig("int4", clip_ratio=0.0), "clip_ratio=0.0 must be a number in \\(0, 1\\]"),
        (lambda: DTypeConfig("int4", clip_ratio=2), "clip_ratio=2 must be a number in \\(0, 1\\]"),
    ],
    ids=["weights", "float16", "asym", "mxfp4", "zero", "above-one"],
)
def test_config_refuses_clipping_it_cannot_honour(build, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build()


def test_export_refuses_clipped_activations() -> None:
    w = QuantScheme("int8", "per_channel")
    a = QuantScheme("int8", "per_token", symmetric_range="restricted", clip_ratio=0.9)
    with pytest.raises(ExportError, match="activation clip_ratio=0.9 has no equivalent"):
        export_format(w, a)
