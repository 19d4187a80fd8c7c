"""Triton pack/unpack kernels against the reference :mod:`quantkit.packing`, bit for bit.

The kernels run in the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest) and are
compiled, not run, for sm90. Packing is integer bit manipulation, so every comparison is exact.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit import ops, packing
from quantkit.kernels.pack import pack_codes, unpack_codes
from tests.sm90 import Case, compile_for_cuda

BITS = (2, 3, 4, 8)
SHAPES = [(rows, cols) for rows in (1, 13) for cols in (1, 7, 8, 37, 576)]
SHAPE_IDS = [f"{rows}x{cols}" for rows, cols in SHAPES]


def _random_codes(
    rows: int, cols: int, bits: int, signed: bool, gen: torch.Generator | None = None
) -> torch.Tensor:
    """Codes covering the ``bits``-bit grid: int8 in [-2^(b-1), 2^(b-1)), uint8 in [0, 2^b)."""
    if signed:
        low, high, dtype = -(1 << (bits - 1)), 1 << (bits - 1), torch.int8
    else:
        low, high, dtype = 0, 1 << bits, torch.uint8
    return torch.randint(low, high, (rows, cols), generator=gen, dtype=dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
def test_launcher_matches_reference(bits: int, signed: bool, shape: tuple[int, int]) -> None:
    codes = _random_codes(*shape, bits, signed)
    packed = pack_codes(codes, bits)
    expected = packing.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (shape[0], packing.packed_cols(shape[1], bits))
    assert torch.equal(packed, expected)

    unpacked = unpack_codes(packed, bits, shape[1], signed)
    assert unpacked.dtype == (torch.int8 if signed else torch.uint8)
    assert torch.equal(unpacked, packing.unpack_codes(expected, bits, shape[1], signed))
    assert torch.equal(unpacked, codes)


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
def test_ops_triton_backend_matches_reference(
    bits: int, signed: bool, shape: tuple[int, int]
) -> None:
    codes = _random_codes(*shape, bits, signed)
    packed = ops.pack_codes(codes, bits, backend="triton")
    assert torch.equal(packed, ops.pack_codes(codes, bits, backend="torch"))
    unpacked = ops.unpack_codes(packed, bits, shape[1], signed, backend="triton")
    assert torch.equal(unpacked, codes)


@pytest.mark.interpreter
@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    signed=st.booleans(),
    rows=st.integers(1, 20),
    cols=st.integers(1, 300),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_match_reference(
    bits: int, signed: bool, rows: int, cols: int, seed: int
) -> None:
    codes = _random_codes(rows, cols, bits, signed, torch.Generator(device=torch.get_default_device()).manual_seed(seed))
    packed = pack_codes(codes, bits)
    assert torch.equal(packed, packing.pack_codes(codes, bits))
    assert torch.equal(unpack_codes(packed, bits, cols, signed), codes)


@pytest.mark.interpreter
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
def test_out_of_range_codes_keep_low_bits_like_reference(bits: int) -> None:
    codes = torch.randint(-128, 128, (5, 45), dtype=torch.int8)  # any byte, not only the grid
    assert torch.equal(pack_codes(codes, bits), packing.pack_codes(codes, bits))
    as_uint = codes.view(torch.uint8)
    assert torch.equal(pack_codes(as_uint, bits), packing.pack_codes(as_uint, bits))


@pytest.mark.interpreter
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
def test_strided_inputs(bits: int) -> None:
    codes = _random_codes(40, 24, bits, signed=True)
    for view, name in ((codes.t(), "transposed"), (codes[::2, 3:], "sliced")):
        assert torch.equal(pack_codes(view, bits), packing.pack_codes(view, bits)), name
    packed = packing.pack_codes(codes, bits)
    wide = torch.zeros(40, packed.shape[1] + 5, dtype=torch.uint8)
    wide[:, 2 : 2 + packed.shape[1]] = packed
    strided = wide[:, 2 : 2 + packed.shape[1]]  # row stride larger than the row
    assert torch.equal(unpack_codes(strided, bits, 24, signed=True), codes)


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", [(0, 16), (3, 0)], ids=["no-rows", "no-cols"])
def test_empty_shapes_match_reference(shape: tuple[int, int]) -> None:
    codes = torch.zeros(shape, dtype=torch.int8)
    packed = pack_codes(codes, 4)
    assert torch.equal(packed, packing.pack_codes(codes, 4))
    assert torch.equal(unpack_codes(packed, 4, shape[1], True), codes)


@pytest.mark.interpreter
def test_padding_of_last_run_is_zero() -> None:
    codes = torch.full((2, 9), -1, dtype=torch.int8)  # every stored bit of a real code is 1
    packed = pack_codes(codes, 3)  # (2, 6): the second run holds 1 code and 7 zero pads
    assert packed[:, :3].eq(0xFF).all()
    assert packed[:, 3].eq(0b111).all() and packed[:, 4:].eq(0).all()


@pytest.mark.parametrize(
    ("codes", "bits", "error", "match"),
    [
        (torch.zeros(4, 8, dtype=torch.int8), 5, ValueError, "bits"),
        (torch.zeros(4, 8, dtype=torch.int8), True, ValueError, "bits"),
        (torch.zeros(4, 8, dtype=torch.int8), "4", ValueError, "bits"),
        (torch.zeros(8, dtype=torch.int8), 4, ValueError, "codes must be a 2-D"),
        (torch.zeros(2, 4, 8, dtype=torch.int8), 4, ValueError, "codes must be a 2-D"),
        (torch.zeros(4, 8), 4, ValueError, "int8/uint8"),
        (torch.zeros(4, 8, dtype=torch.int32), 4, ValueError, "int8/uint8"),
        ([[1, 2]], 4, TypeError, "codes must be a torch.Tensor"),
    ],
    ids=["bits-5", "bits-bool", "bits-str", "codes-1d", "codes-3d", "codes-float", "codes-int32",
         "codes-list"],
)
def test_pack_rejects_bad_input(codes: object, bits: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        pack_codes(codes, bits)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("packed", "bits", "cols", "signed", "error", "match"),
    [
        (torch.zeros(4, 12, dtype=torch.uint8), 6, 32, True, ValueError, "bits"),
        (torch.zeros(4, 12, dtype=torch.uint8), 3, 33, True, ValueError, "15 bytes per row"),
        (torch.zeros(4, 12, dtype=torch.int8), 3, 32, True, ValueError, "packed must be"),
        (torch.zeros(12, dtype=torch.uint8), 3, 32, True, ValueError, "packed must be"),
        (torch.zeros(4, 12, dtype=torch.uint8), 3, -1, True, ValueError, "cols"),
        (torch.zeros(4, 12, dtype=torch.uint8), 3, 32.0, True, ValueError, "cols"),
        (torch.zeros(4, 12, dtype=torch.uint8), 3, 32, 1, TypeError, "signed"),
        ("bytes", 3, 32, True, TypeError, "packed must be a torch.Tensor"),
    ],
    ids=["bits-6", "wrong-width", "packed-int8", "packed-1d", "cols-negative", "cols-float",
         "signed-int", "packed-str"],
)
def test_unpack_rejects_bad_input(
    packed: object, bits: int, cols: object, signed: object, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        unpack_codes(packed, bits, cols, signed)  # type: ignore[arg-type]


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="codes .*TRITON_INTERPRET=1"):
        pack_codes(torch.zeros(2, 8, dtype=torch.int8), 4)
    with pytest.raises(RuntimeError, match="packed .*TRITON_INTERPRET=1"):
        unpack_codes(torch.zeros(2, 4, dtype=torch.uint8), 4, 8, True)


def _pack_case(bits: int, codes_type: str, contiguous: bool) -> Case:
    signature = {
        "codes_ptr": codes_type, "packed_ptr": "*u8",
        "rows": "i32", "cols": "i32", "runs": "i32",
        "stride_cm": "i32", "stride_cn": "constexpr" if contiguous else "i32", "stride_pm": "i32",
        "BITS": "constexpr", "CPR": "constexpr", "BPR": "constexpr",
        "BYTES_P2": "constexpr", "BLOCK_M": "constexpr", "BLOCK_R": "constexpr",
    }
    cpr, bpr = (4, 3) if bits == 6 else (8, bits)
    constexprs = {"BITS": bits, "CPR": cpr, "BPR": bpr, "BYTES_P2": 4 if bpr == 3 else bpr,
                  "BLOCK_M": 8, "BLOCK_R": 128}
    if contiguous:  # Triton specialises unit strides of contiguous tensors to constants
        constexprs["stride_cn"] = 1
    return ("quantkit.kernels.pack", "_pack_kernel", signature, constexprs)


def _unpack_case(bits: int, signed: bool, contiguous: bool) -> Case:
    signature = {
        "packed_ptr": "*u8", "codes_ptr": "*i8" if signed else "*u8",
        "rows": "i32", "cols": "i32", "runs": "i32",
        "stride_pm": "i32", "stride_pn": "constexpr" if contiguous else "i32", "stride_cm": "i32",
        "BITS": "constexpr", "SIGNED": "constexpr", "CPR": "constexpr", "BPR": "constexpr",
        "BYTES_P2": "constexpr", "BLOCK_M": "constexpr", "BLOCK_R": "constexpr",
    }
    cpr, bpr = (4, 3) if bits == 6 else (8, bits)
    constexprs = {
        "BITS": bits, "SIGNED": signed, "CPR": cpr, "BPR": bpr, "BYTES_P2": 4 if bpr == 3 else bpr,
        "BLOCK_M": 8, "BLOCK_R": 128,
    }
    if contiguous:
        constexprs["stride_pn"] = 1
    return ("quantkit.kernels.pack", "_unpack_kernel", signature, constexprs)


@pytest.mark.parametrize("kernel", ["pack", "unpack"])
def test_kernels_compile_for_sm90(kernel: str) -> None:
    if kernel == "pack":
        cases = [_pack_case(b, t, True) for b in BITS for t in ("*i8", "*u8")]
        cases.append(_pack_case(3, "*i8", contiguous=False))
    else:
        cases = [_unpack_case(b, s, True) for b in BITS for s in (True, False)]
        cases.append(_unpack_case(3, True, contiguous=False))
    compile_for_cuda(cases)
