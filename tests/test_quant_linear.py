"""QuantLinear stores exactly what it computes with, and quantizes activations as configured."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantkit import reference
from quantkit.quant_linear import QuantLinear, storage_scale, weight_qparams
from quantkit.scheme import QuantScheme

SCHEMES = {
    "int4-g32-asym": QuantScheme("int4", "per_group", 32, has_zero=True, unsigned=True),
    "int4-g48-short-last-group": QuantScheme("int4", "per_group", 48, has_zero=True),
    "int3-channel-sym": QuantScheme("int3", "per_channel"),
    "int2-g16-asym": QuantScheme("int2", "per_group", 16, has_zero=True, unsigned=True),
    "int8-channel": QuantScheme("int8", "per_channel"),
    "int8-tensor-unsigned-zero": QuantScheme("int8", "per_tensor", has_zero=True, unsigned=True),
    "fp8-g32": QuantScheme("fp8", "per_group", 32),
    "fp4-g16": QuantScheme("fp4", "per_group", 16),
}


@pytest.mark.parametrize("scheme", SCHEMES.values(), ids=SCHEMES.keys())
def test_dequantized_weight_is_the_fake_quantized_weight(scheme):
    linear = nn.Linear(100, 24, bias=True)
    q = QuantLinear.from_linear(linear, scheme)
    scale, zero = weight_qparams(linear.weight.detach(), scheme)
    codes = reference.quantize(linear.weight.detach(), scale, zero, scheme)
    expected = reference.dequantize(codes, scale, zero, scheme)
    assert torch.equal(q.weight_codes(), codes)
    assert torch.equal(q.dequantized_weight(), expected)
    x = torch.randn(3, 5, 100)
    torch.testing.assert_close(q(x), nn.functional.linear(x, expected, q.bias.float()))


def test_scales_are_stored_in_float16_and_codes_agree_with_them():
    linear = nn.Linear(64, 8, bias=False)
    q = QuantLinear.from_linear(linear, SCHEMES["int4-g32-asym"])
    assert q.scales.dtype == torch.float16 and q.bias is None
    raw, _ = reference.compute_qparams(linear.weight.detach(), SCHEMES["int4-g32-asym"])
    assert torch.equal(q.scales.float(), storage_scale(raw))


def test_storage_is_packed():
    scheme = SCHEMES["int4-g32-asym"]
    q = QuantLinear.from_linear(nn.Linear(576, 10), scheme)
    assert q.qweight.shape == (10, 576 // 8 * 4) and q.qweight.dtype == torch.uint8
    groups = 576 // 32
    assert q.qzeros.shape == (10, (groups + 7) // 8 * 4)
    assert q.weight_storage_bits() == 10 * 576 * 4 + 10 * groups * 16 + q.qzeros.numel() * 8


def test_dynamic_per_token_activation_quantization():
    a = QuantScheme("int8", "per_token")
    linear = nn.Linear(32, 16)
    q = QuantLinear.from_linear(linear, SCHEMES["int8-channel"], a)
    x = torch.randn(2, 7, 32)
    xq = reference.fake_quantize(x, a)
    torch.testing.assert_close(q(x), nn.functional.linear(xq, q.dequantized_weight(), q.bias.float()))
    assert not torch.equal(q(x), nn.functional.linear(x, q.dequantized_weight(), q.bias.float()))


def test_static_activation_scale_is_used_and_saturates():
    a = QuantScheme("int8", "per_tensor")
    q = QuantLinear.from_linear(nn.Linear(8, 4), SCHEMES["int8-channel"], a, act_scale=torch.tensor(0.01))
    assert q.a_static and q.act_scale.item() == pytest.approx(0.01)
    x = torch.full((1, 8), 100.0)  # far outside the calibrated range: clipped to 127 * 0.01
    assert torch.allclose(q.quantize_input(x), torch.full((1, 8), 1.27))


def test_extra_repr_names_the_schemes():
    q = QuantLinear.from_linear(nn.Linear(64, 8), SCHEMES["int4-g32-asym"], QuantScheme("int8", "per_token"))
    assert "int4 g32 asym" in repr(q) and "act=int8 token" in repr(q)


def test_cpu_forward_weight_cache_follows_buffer_changes():
    torch.manual_seed(3)
    linear = torch.nn.Linear(64, 16)
    scheme = QuantScheme("int4", "per_group", 32, has_zero=True, unsigned=True)
    q = QuantLinear.from_linear(linear, scheme)
    x = torch.randn(5, 64)
    first = q(x)
    assert torch.equal(q(x), first)  # served from the cache
    other = QuantLinear.from_linear(torch.nn.Linear(64, 16), scheme)
    q.set_weight(other.weight_codes(), other.scales.float(), other.zeros())  # in-place rewrite
    assert torch.allclose(q(x) - q.bias, other(x) - other.bias, atol=1e-6)  # bias is not part of set_weight
    q.scales.mul_(2)  # any buffer change invalidates
    assert torch.allclose(q(x) - q.bias, 2 * (other(x) - other.bias), atol=1e-5)
    q.to(torch.float32)  # a move/cast to new storage: recomputed from the new buffers
    assert torch.allclose(q(x) - q.bias, 2 * (other(x) - other.bias), atol=1e-5)


_FUSED_CASES = {  # (w_scheme, a_scheme, static activations): which kernel QuantLinear picks
    "w4a16-g32-asym": (QuantScheme("int4", "per_group", 32, has_zero=True, unsigned=True), None, False),
    "w3a16-channel": (QuantScheme("int3", "per_channel", -1, has_zero=True, unsigned=True), None, False),
    "w8a8-dynamic": (QuantScheme("int8", "per_channel", -1), QuantScheme("int8", "per_token", -1), False),
    "w8a8-static": (QuantScheme("int8", "per_channel", -1), QuantScheme("int8", "per_tensor", -1), True),
    "fp8-dynamic": (QuantScheme("fp8", "per_channel", -1), QuantScheme("fp8", "per_token", -1), False),
    "w4a8-fallback": (QuantScheme("int4", "per_group", 32, has_zero=True, unsigned=True),
                      QuantScheme("int8", "per_token", -1), False),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("name", list(_FUSED_CASES))
@pytest.mark.parametrize("tokens", [1, 19])  # GEMV and GEMM paths of the W-only kernel
def test_triton_forward_matches_the_torch_forward(name, tokens):
    w_scheme, a_scheme, static = _FUSED_CASES[name]
    torch.manual_seed(5)
    linear = nn.Linear(96, 40)
    act_scale = torch.tensor([[0.03]]) if static else None
    q = QuantLinear.from_linear(linear, w_scheme, a_scheme, act_scale=act_scale)
    x = torch.randn(2, tokens, 96)
    want = q(x)  # torch reference path on a CPU tensor
    q.backend = "triton"
    got = q(x)
    assert got.shape == want.shape == (2, tokens, 40) and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    picked = q._code_matmul()
    assert (picked is not None) == name.startswith(("w8a8", "fp8"))
