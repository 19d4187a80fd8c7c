"""Every fused Triton path of ``QuantLinear`` on ragged ``in_features`` (K % 8 != 0 and
K % 32 != 0), run in the interpreter against the torch backend.

Weight rows are stored padded to a multiple of 8 codes (``ceil(K / 8) * bits`` bytes), so
ragged K is where a kernel handed the padded storage instead of the ``(N, K)`` codes fails
(the W8A8/fp8 bug: ``wq must be (N, K=260) ... got (256, 264)``) or multiplies the padding.

Tolerance (float32 activations): both backends compute the same quantized operands; they differ
in how the products are summed (torch: fp32 GEMM on dequantized values; Triton: fp32 tiles,
or an exact int32 sum then the scales) by fp32 rounding, ~1e-6 relative, bounded here by
1e-4 (as ``tests/test_quant_linear.py``). float16 activations add the torch path's roundings of
the dequantized activations and weights to fp16 (2**-11 relative each), so the bound is
4 * 2**-10 of the largest output.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantkit import ops
from quantkit.quant_linear import QuantLinear
from quantkit.scheme import QuantScheme

pytestmark = pytest.mark.interpreter

_I8_TOKEN = QuantScheme("int8", "per_token", -1)
_I8_TENSOR = QuantScheme("int8", "per_tensor", -1)
_FP8_TOKEN = QuantScheme("fp8", "per_token", -1)
_FP8_TENSOR = QuantScheme("fp8", "per_tensor", -1)

# name: (w_scheme, a_scheme, static activations, the matmul QuantLinear must pick)
CASES = {
    "w4a16-g32-asym": (QuantScheme("int4", "per_group", 32, has_zero=True, unsigned=True),
                       None, False, "dequant"),
    "w4a16-g128-sym": (QuantScheme("int4", "per_group", 128), None, False, "dequant"),
    "w3a16-channel-asym": (QuantScheme("int3", "per_channel", -1, has_zero=True, unsigned=True),
                           None, False, "dequant"),
    "w2a16-g16-asym": (QuantScheme("int2", "per_group", 16, has_zero=True, unsigned=True),
                       None, False, "dequant"),
    "w8a16-channel": (QuantScheme("int8", "per_channel", -1), None, False, "dequant"),
    "w8a16-g64-asym": (QuantScheme("int8", "per_group", 64, has_zero=True, unsigned=True),
                       None, False, "dequant"),
    "fp8-weight-only": (QuantScheme("fp8", "per_channel", -1), None, False, "dequant"),
    "fp4-g32-weight-only": (QuantScheme("fp4", "per_group", 32), None, False, "dequant"),
    "w8a8-channel-token": (QuantScheme("int8", "per_channel", -1), _I8_TOKEN, False, "int8"),
    "w8a8-tensor-token": (QuantScheme("int8", "per_tensor", -1), _I8_TOKEN, False, "int8"),
    "w8a8-channel-static-tensor": (QuantScheme("int8", "per_channel", -1), _I8_TENSOR, True,
                                   "int8"),
    "fp8-channel-token": (QuantScheme("fp8", "per_channel", -1), _FP8_TOKEN, False, "fp8"),
    "fp8-tensor-static-tensor": (QuantScheme("fp8", "per_tensor", -1), _FP8_TENSOR, True, "fp8"),
    # activation zero points (and group-wise weights) take fake-quantized activations into
    # the dequant GEMM
    "w8a8-token-zero": (QuantScheme("int8", "per_channel", -1),
                        QuantScheme("int8", "per_token", -1, has_zero=True, unsigned=True), False,
                        "dequant"),
    "w8a8-static-zero": (QuantScheme("int8", "per_channel", -1),
                         QuantScheme("int8", "per_tensor", -1, has_zero=True, unsigned=True), True,
                         "dequant"),
    "w4a8-g32-token": (QuantScheme("int4", "per_group", 32, has_zero=True, unsigned=True),
                       _I8_TOKEN, False, "dequant"),
}
_PICKED = {None: "dequant", ops.int8_matmul: "int8", ops.fp8_matmul: "fp8"}


def _module(name: str, k: int, n: int = 40) -> QuantLinear:
    w_scheme, a_scheme, static, _ = CASES[name]
    act_scale = torch.tensor([[0.02]]) if static else None
    act_zero = torch.tensor([[131]]) if static and a_scheme.has_zero else None
    return QuantLinear.from_linear(nn.Linear(k, n), w_scheme, a_scheme, act_scale=act_scale,
                                   act_zero=act_zero)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("k", [260, 200])
@pytest.mark.parametrize("tokens", [1, 19])  # M = 2 (GEMV) and 38 (GEMM) rows
def test_fused_forward_on_ragged_k_matches_the_torch_forward(name: str, k: int,
                                                             tokens: int) -> None:
    q = _module(name, k)
    assert _PICKED[q._code_matmul()] == CASES[name][3]
    x = torch.randn(2, tokens, k)
    q.backend = "torch"
    want = q(x)
    q.backend = "triton"
    got = q(x)
    assert got.shape == want.shape == (2, tokens, 40) and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["w8a8-channel-token", "fp8-channel-token", "w4a16-g32-asym"])
def test_fused_forward_on_ragged_k_in_float16(name: str) -> None:
    q = _module(name, 260).half()
    x = torch.randn(3, 260).half()
    q.backend = "torch"
    want = q(x)
    q.backend = "triton"
    got = q(x)
    assert got.dtype == want.dtype == torch.float16
    bound = 4 * 2.0**-10 * want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=bound)


@pytest.mark.parametrize("name", ["w8a8-channel-token", "fp8-channel-token", "w8a16-g64-asym"])
def test_code_matrix_is_the_unpadded_codes_without_a_copy(name: str) -> None:
    q = _module(name, 260)
    codes = q.code_matrix()
    assert codes.shape == (40, 260) and codes.data_ptr() == q.qweight.data_ptr()
    assert codes.dtype == q.weight_codes().dtype and torch.equal(codes, q.weight_codes())


def test_code_matrix_needs_8_bit_codes() -> None:
    with pytest.raises(ValueError, match="code_matrix needs 8-bit weight codes"):
        _module("w4a16-g32-asym", 260).code_matrix()
