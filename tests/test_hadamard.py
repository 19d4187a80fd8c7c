"""Hadamard matrices, the transform's torch reference, and the Triton FWHT kernel against it.

Constructions are checked exactly (+-1 entries, ``A A^T = K I`` in integers held by float64).
The kernel runs in the Triton interpreter (conftest) and must reproduce the reference bit for
bit: both compute the same fp32 butterflies in the same order, and the chunk mix is shared
torch code. Its sm90 compilation and spills are covered by the inspection grid
(``tests/test_inspect_kernels.py``, launcher ``hadamard``).
"""

from __future__ import annotations

import math

import pytest
import torch

from quantkit import hadamard as had
from quantkit.kernels import hadamard as kernel
from quantkit.kernels._launch import H200, run_all
from quantkit.scheme import QuantScheme

# widths of real models and their (K, P): SmolLM2 576/1536, Qwen2-0.5B 896/4864, Llama-2 11008,
# Llama-3 14336, Qwen2.5-7B 18944, 2^15 (longer than one register chunk)
MODEL_WIDTHS = {576: (36, 16), 1536: (12, 128), 896: (28, 32), 4864: (76, 64), 11008: (172, 64),
                14336: (28, 512), 18944: (148, 128), 4096: (1, 4096), 32768: (2, 16384)}


@pytest.mark.parametrize("order", [12, 20, 28, 36, 40, 44, 60, 76, 92, 108, 116, 148, 156, 172, 200])
def test_constructed_orders_are_hadamard_matrices(order):
    a = had.small_hadamard(order)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(a @ a.t(), order * torch.eye(order, dtype=torch.float64))


def test_every_multiple_of_four_up_to_256_is_constructed_or_named():
    built = [k for k in range(4, 257, 4) if had._construction(k) is not None]
    for k in built:
        a = had.small_hadamard(k)
        assert torch.equal(a @ a.t(), k * torch.eye(k, dtype=torch.float64)), k
    assert sorted(set(range(4, 257, 4)) - set(built)) == [52, 100, 188, 236, 244]
    with pytest.raises(ValueError, match="no Hadamard matrix of order 52"):
        had.small_hadamard(52)


def test_williamson_orders_are_sloanes_matrices():
    """The stored first rows rebuild exactly the matrices compressed-tensors ships (Sloane's library)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.transform.utils.hadamard import REPO_PATH
    from safetensors import safe_open

    with safe_open(str(REPO_PATH), framework="pt") as f:
        for order in (92, 116, 156, 172):
            assert torch.equal(had.williamson(order // 4), f.get_tensor(str(order)).double()), order


@pytest.mark.parametrize("n", sorted(MODEL_WIDTHS))
def test_model_widths_factor_into_a_small_matrix_and_a_power_of_two(n):
    assert had.factor(n) == MODEL_WIDTHS[n]


def test_a_width_without_a_matrix_is_named():
    with pytest.raises(ValueError, match=r"order 52 is available: 52 = 13 x 2\^2 needs one of order 13 x 2\^j"):
        had.factor(52)


@pytest.mark.parametrize("n", [1, 2, 12, 64, 576, 1536, 11008])
def test_reference_transform_is_the_orthogonal_matrix(n):
    h = had.hadamard_matrix(n)  # (n, n) float64
    if n <= 1536:
        assert torch.allclose(h @ h.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(5, n, dtype=torch.float64)
    got = had.hadamard_transform_reference(x, had.chunk_matrix(n))
    assert torch.allclose(got, x @ h, atol=1e-12 * math.sqrt(n))
    x32 = x.float()
    got32 = had.hadamard_transform_reference(x32, had.chunk_matrix(n))  # float32 arithmetic
    assert got32.dtype == torch.float32
    assert torch.allclose(got32.double(), x32.double() @ h, atol=1e-5)


def test_reference_keeps_leading_dims_and_rejects_bad_widths():
    x = torch.randn(2, 3, 1536)
    assert had.hadamard_transform_reference(x, had.chunk_matrix(1536)).shape == (2, 3, 1536)
    with pytest.raises(ValueError, match="width 100 is not K x 2\\^j"):
        had.hadamard_transform_reference(torch.randn(2, 100), had.chunk_matrix(1536))


# ------------------------------------------------------------------- the Triton kernel


def _rows(rows: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of very different magnitudes with a few outlier channels."""
    x = torch.randn(rows, n) * torch.exp(torch.randn(rows, 1))
    x[:, :: max(1, n // 7)] *= 20.0
    return x.to(dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n", [1, 2, 16, 64, 576, 1536, 11008])
@pytest.mark.parametrize("rows", [1, 13])
def test_kernel_is_the_reference_bit_for_bit(rows, n, dtype):
    x, had_k = _rows(rows, n, dtype), had.chunk_matrix(n)
    got = kernel.hadamard_transform(x, had_k)
    assert got.dtype == dtype and torch.equal(got, had.hadamard_transform_reference(x, had_k))


@pytest.mark.interpreter
def test_bfloat16_rows_load_exactly():
    """bfloat16 in, bfloat16 out: the interpreter truncates fp32 -> bf16 casts (ENVIRONMENT.md)
    where the GPU and torch round, so the outputs may differ by one bf16 step; the float32
    transform of bf16 rows is exact."""
    x, had_k = _rows(13, 1536, torch.bfloat16), had.chunk_matrix(1536)
    want = had.hadamard_transform_reference(x, had_k, torch.float32)
    got = kernel.hadamard_transform(x, had_k).float()
    assert ((got - want).abs() <= want.abs() * 2**-7).all()
    (out,), launches = kernel.plan_hadamard(had.mix_chunks(x, had_k), 12, torch.float32, H200)
    run_all(launches, x.device)
    assert torch.equal(out, want)


@pytest.mark.interpreter
@pytest.mark.parametrize("n", [576, 11008, 14336])
def test_gpu_tiles_with_chunk_blocks_on_a_second_grid_axis(n):
    """The H200 plan (about 4K elements per program: several programs per row) run in the interpreter."""
    x, had_k = _rows(3, n, torch.float16), had.chunk_matrix(n)
    chunks = had_k.shape[0]
    (out,), launches = kernel.plan_hadamard(had.mix_chunks(x, had_k) if chunks > 1 else x, chunks,
                                            torch.float16, H200)
    assert launches[0].grid[1] == math.ceil(chunks / launches[0].constexprs["BLOCK_C"])
    run_all(launches, x.device)
    assert torch.equal(out, had.hadamard_transform_reference(x, had_k))


SCHEMES = [
    pytest.param(QuantScheme("int8", "per_token", symmetric_range="restricted"), id="int8"),
    pytest.param(QuantScheme("int4", "per_token", symmetric_range="restricted"), id="int4"),
    pytest.param(QuantScheme("int4", "per_token"), id="int4-full"),
    pytest.param(QuantScheme("int4", "per_token", has_zero=True), id="int4-asym"),
    pytest.param(QuantScheme("fp8", "per_token"), id="fp8"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n", [64, 576, 1536])
def test_fused_quantization_is_the_reference_bit_for_bit(n, scheme):
    x, had_k = _rows(13, n, torch.float16), had.chunk_matrix(n)
    got = kernel.hadamard_quantize(x, had_k, scheme)
    want = had.hadamard_quantize_reference(x, had_k, scheme)
    for g, w in zip(got, want):
        assert (g is None and w is None) or torch.equal(g, w)


@pytest.mark.interpreter
@pytest.mark.parametrize("n", [1536, 32768])
def test_gpu_plan_of_the_fused_quantization(n):
    """1536: one program per (padded) row; 32768 = 2 x 16384 is longer than a program holds on
    a GPU: transform into a float32 buffer, then the quantize kernel."""
    scheme = QuantScheme("int4", "per_token", symmetric_range="restricted")
    x, had_k = _rows(2, n, torch.float32), had.chunk_matrix(n)
    chunks = had_k.shape[0]
    (codes, scale, zero), launches = kernel.plan_hadamard(had.mix_chunks(x, had_k), chunks, torch.float32,
                                                          H200, scheme)
    names = [launch.kernel.fn.__name__ for launch in launches]
    assert names == (["_hadamard_kernel"] if n == 1536 else ["_hadamard_kernel", "_quantize_kernel"])
    run_all(launches, x.device)
    want = had.hadamard_quantize_reference(x, had_k, scheme)
    assert torch.equal(codes, want[0]) and torch.equal(scale, want[1]) and zero is None


@pytest.mark.interpreter
def test_dispatch_runs_the_kernel_or_the_reference_alike():
    x, had_k = _rows(4, 1536, torch.float32).reshape(2, 2, 1536), had.chunk_matrix(1536)
    assert torch.equal(had.hadamard_transform(x, had_k, "triton"), had.hadamard_transform(x, had_k, "torch"))
    scheme = QuantScheme("int8", "per_token")
    for a, b in zip(had.hadamard_quantize(x, had_k, scheme, "triton"), had.hadamard_quantize(x, had_k, scheme, "torch")):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.interpreter
def test_kernel_rejects_bad_inputs():
    x = torch.randn(3, 1536)
    with pytest.raises(ValueError, match="width 1536 must be K x P with K=8"):
        kernel.hadamard_transform(x, had.small_hadamard(8).to(torch.int8))
    with pytest.raises(TypeError, match="x must be"):
        kernel.hadamard_transform(x.to(torch.int32), had.chunk_matrix(1536))
    with pytest.raises(ValueError, match="one scale per row"):
        kernel.hadamard_quantize(x, had.chunk_matrix(1536), QuantScheme("int4", "per_group", 128))
