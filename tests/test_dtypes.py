"""The dtype registry: every seed format, its grid, aliases and errors."""

from __future__ import annotations

import pytest
import torch

from quantkit.dtypes import DTYPES, QuantDType, dtype_names, get_dtype

SEED_DTYPES = ("int2", "int3", "int4", "int8", "fp4", "fp8", "float16")

# name -> (bits, signed qmin, signed qmax, unsigned qmax)
INT_GRIDS = {
    "int2": (2, -2, 1, 3),
    "int3": (3, -4, 3, 7),
    "int4": (4, -8, 7, 15),
    "int8": (8, -128, 127, 255),
}

# name -> (bits, exponent bits, mantissa bits, bias, max value, torch dtype)
FLOAT_LAYOUTS = {
    "fp4": (4, 2, 1, 1, 6.0, None),
    "fp8": (8, 4, 3, 7, 448.0, torch.float8_e4m3fn),
    "fp8_e5m2": (8, 5, 2, 15, 57344.0, torch.float8_e5m2),
}


@pytest.mark.parametrize("name", SEED_DTYPES)
def test_every_seed_dtype_is_registered(name: str) -> None:
    spec = get_dtype(name)
    assert isinstance(spec, QuantDType)
    assert spec.name == name
    assert name in dtype_names()
    assert DTYPES[name] is spec


@pytest.mark.parametrize("name", list(INT_GRIDS))
def test_int_grids(name: str) -> None:
    bits, qmin, qmax, uqmax = INT_GRIDS[name]
    spec = get_dtype(name)
    assert (spec.bits, spec.kind, spec.is_int, spec.is_float, spec.is_identity) == (
        bits, "int", True, False, False,
    )
    assert (spec.qmin(), spec.qmax()) == (qmin, qmax)
    assert (spec.qmin(unsigned=True), spec.qmax(unsigned=True)) == (0, uqmax)
    assert spec.qmax() - spec.qmin() + 1 == 2**bits  # the signed grid uses every code


@pytest.mark.parametrize("name", list(FLOAT_LAYOUTS))
def test_float_layouts(name: str) -> None:
    bits, ebits, mbits, bias, max_value, torch_dtype = FLOAT_LAYOUTS[name]
    spec = get_dtype(name)
    assert spec.is_float and not spec.is_int and not spec.is_identity
    assert (spec.bits, spec.exponent_bits, spec.mantissa_bits, spec.exponent_bias) == (
        bits, ebits, mbits, bias,
    )
    assert spec.max_value == max_value
    assert spec.torch_dtype == torch_dtype
    assert 1 + ebits + mbits == bits
    if torch_dtype is not None:  # the registry agrees with torch on the largest finite value
        assert torch.finfo(torch_dtype).max == max_value
        assert 2.0**spec.min_normal_exponent == torch.finfo(torch_dtype).smallest_normal


@pytest.mark.parametrize("name", ["fp4", "fp8", "fp8_e5m2", "float16"])
@pytest.mark.parametrize("method", ["qmin", "qmax"])
def test_integer_range_of_non_integer_dtype_is_an_error(name: str, method: str) -> None:
    with pytest.raises(TypeError, match=f"{method} is defined for integer dtypes only"):
        getattr(get_dtype(name), method)()


def test_float16_means_no_quantization() -> None:
    spec = get_dtype("float16")
    assert spec.is_identity and spec.bits == 16
    assert not spec.is_int and not spec.is_float


@pytest.mark.parametrize(
    ("alias", "name"),
    [("fp8_e4m3", "fp8"), ("fp8_e4m3fn", "fp8"), ("fp4_e2m1", "fp4"), ("fp16", "float16")],
)
def test_aliases_resolve_to_the_canonical_spec(alias: str, name: str) -> None:
    assert get_dtype(alias) is get_dtype(name)
    assert alias not in dtype_names()


def test_spec_passes_through() -> None:
    spec = get_dtype("int4")
    assert get_dtype(spec) is spec


@pytest.mark.parametrize("bad", ["int5", "INT4", "fp6", ""])
def test_unknown_name_lists_valid_dtypes(bad: str) -> None:
    with pytest.raises(ValueError, match=f"unknown quantization dtype {bad!r}") as info:
        get_dtype(bad)
    for name in (*SEED_DTYPES, "fp8_e5m2", "fp8_e4m3"):
        assert name in str(info.value)


def test_specs_are_frozen() -> None:
    with pytest.raises(AttributeError):
        get_dtype("int4").bits = 5  # type: ignore[misc]
