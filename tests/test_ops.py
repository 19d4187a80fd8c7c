"""quantkit.ops: input validation and backend dispatch (the kernels themselves are tested
in the ``test_kernels_*`` files; here stand-in kernel modules record what was dispatched)."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch

from quantkit import ops, packing, reference
from quantkit.scheme import QuantScheme

INT4_G8 = QuantScheme("int4", "per_group", groupsize=8, has_zero=True)


def _install_fake_kernels(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """Replace the Triton kernel modules by stand-ins that record each call and return the
    reference result, so dispatch is checked without depending on the kernels."""

    def recorder(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapped

    fakes = {
        "quantkit.kernels.quantize": {
            "quantize": recorder("quantize", reference.quantize_tensor),
            "quantize_with_qparams": recorder("quantize_with_qparams", reference.quantize),
        },
        "quantkit.kernels.dequantize": {"dequantize": recorder("dequantize", reference.dequantize)},
        "quantkit.kernels.pack": {
            "pack_codes": recorder("pack_codes", packing.pack_codes),
            "unpack_codes": recorder("unpack_codes", packing.unpack_codes),
        },
    }
    for module_name, attrs in fakes.items():
        monkeypatch.setitem(sys.modules, module_name, types.SimpleNamespace(**attrs))


def _run_every_op(backend: str) -> None:
    x = torch.randn(4, 16)
    codes, scale, zero = ops.quantize(x, INT4_G8, backend=backend)
    ops.quantize_with_qparams(x, scale, zero, INT4_G8, backend=backend)
    ops.dequantize(codes, scale, zero, INT4_G8, backend=backend)
    packed = ops.pack_codes(codes, 4, backend=backend)
    ops.unpack_codes(packed, 4, 16, signed=True, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_cpu_backends_use_the_reference(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    calls: list[str] = []
    _install_fake_kernels(monkeypatch, calls)
    _run_every_op(backend)
    assert calls == []
    x = torch.randn(4, 16)
    expected = reference.quantize_tensor(x, INT4_G8)
    assert all(torch.equal(a, b) for a, b in zip(ops.quantize(x, INT4_G8, backend), expected))


def test_triton_backend_dispatches_to_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls: list[str] = []
    _install_fake_kernels(monkeypatch, calls)
    _run_every_op("triton")
    assert calls == [
        "quantize", "quantize_with_qparams", "dequantize", "pack_codes", "unpack_codes"
    ]


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.quantize(torch.randn(2, 8), INT4_G8, backend="triton")


@pytest.mark.parametrize("backend", ["cuda", "Triton", "", "reference"])
def test_unknown_backend_lists_valid_ones(backend: str) -> None:
    with pytest.raises(ValueError, match="unknown backend .*auto, torch, triton"):
        ops.quantize(torch.randn(2, 8), INT4_G8, backend=backend)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown backend"):
        codes = torch.zeros(2, 8, dtype=torch.int8)
        ops.pack_codes(codes, 4, backend=backend)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.ones(2, 8, dtype=torch.int32), TypeError, "x must be a floating-point tensor"),
        (torch.ones(2, 8, dtype=torch.int8), TypeError, "x must be a floating-point tensor"),
        ([[1.0, 2.0]], TypeError, "x must be a torch.Tensor"),
        (torch.empty(0, 8), ValueError, "non-empty"),
        (torch.empty(4, 0), ValueError, "non-empty"),
        (torch.tensor(1.5), ValueError, "at least 1 dim"),
        (torch.tensor([[1.0, float("nan")]]), ValueError, "NaN or inf"),
        (torch.tensor([[1.0, float("inf")]]), ValueError, "NaN or inf"),
        (torch.tensor([[float("-inf"), 1.0]], dtype=torch.float16), ValueError, "NaN or inf"),
    ],
    ids=["int32", "int8", "list", "no-rows", "no-cols", "0-dim", "nan", "inf", "fp16-minus-inf"],
)
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_quantize_rejects_bad_input(x: object, error: type, match: str, backend: str) -> None:
    scheme = QuantScheme("int8", "per_token")
    with pytest.raises(error, match=match):
        ops.quantize(x, scheme, backend=backend)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        ops.fake_quantize(x, scheme, backend=backend)  # type: ignore[arg-type]


def test_groupsize_larger_than_cols() -> None:
    scheme = QuantScheme("int4", "per_group", groupsize=128)
    with pytest.raises(ValueError, match="groupsize=128 is larger than the input dimension 64"):
        ops.quantize(torch.randn(4, 64), scheme, backend="torch")


@pytest.mark.parametrize("shape", [(2, 3, 16), (2, 1, 3, 16), (16,)], ids=["3d", "4d", "1d"])
def test_nd_inputs_are_flattened_to_rows(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    codes, scale, zero = ops.quantize(x, INT4_G8, backend="torch")
    rows = x.numel() // 16
    assert codes.shape == (rows, 16) and scale.shape == zero.shape == (rows, 2)
    expected = reference.quantize_tensor(x.reshape(rows, 16), INT4_G8)
    assert all(torch.equal(a, b) for a, b in zip((codes, scale, zero), expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "scheme",
    [INT4_G8, QuantScheme("int8", "per_token"), QuantScheme("fp8", "per_tensor"),
     QuantScheme("fp4", "per_group", groupsize=8)],
    ids=lambda s: s.describe().replace(" ", "-"),
)
def test_fake_quantize_keeps_shape_and_dtype(dtype: torch.dtype, scheme: QuantScheme) -> None:
    x = torch.randn(2, 3, 16).to(dtype)
    y = ops.fake_quantize(x, scheme, backend="torch")
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(y, reference.fake_quantize(x, scheme))
    assert torch.isfinite(y).all()


def test_quantize_with_qparams_accepts_non_finite_inputs() -> None:
    """Static scales: a stray inf is clamped to the grid instead of failing the whole run."""
    scheme = QuantScheme("int8", "per_tensor")
    codes = ops.quantize_with_qparams(
        torch.tensor([[float("inf"), -float("inf"), 1.0]]), torch.ones(1, 1), None, scheme, "torch"
    )
    assert codes.tolist() == [[127, -128, 1]]
