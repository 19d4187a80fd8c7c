"""QuantScheme validation, normalisation and scale shapes."""

from __future__ import annotations

import dataclasses

import pytest

from quantkit.dtypes import get_dtype
from quantkit.scheme import GRANULARITIES, QuantScheme


def test_defaults_and_dtype_by_name() -> None:
    scheme = QuantScheme("int4")
    assert scheme.dtype is get_dtype("int4")
    assert (scheme.granularity, scheme.groupsize, scheme.has_zero, scheme.unsigned) == (
        "per_channel", -1, False, False,
    )
    assert (scheme.bits, scheme.qmin, scheme.qmax) == (4, -8, 7)


def test_unsigned_int_range() -> None:
    scheme = QuantScheme("int4", has_zero=True, unsigned=True)
    assert (scheme.qmin, scheme.qmax) == (0, 15)


@pytest.mark.parametrize("granularity", ["per_row", "group", "PER_TENSOR", ""])
def test_unknown_granularity_lists_valid_ones(granularity: str) -> None:
    with pytest.raises(ValueError, match="unknown granularity") as info:
        QuantScheme("int4", granularity=granularity)
    for valid in GRANULARITIES:
        assert valid in str(info.value)


@pytest.mark.parametrize("groupsize", [0, -2, -128], ids=["zero", "minus-2", "minus-128"])
def test_groupsize_must_be_positive_or_minus_one(groupsize: int) -> None:
    with pytest.raises(ValueError, match="groupsize must be a positive number"):
        QuantScheme("int4", granularity="per_group", groupsize=groupsize)


@pytest.mark.parametrize("groupsize", [128.0, "128", True], ids=["float", "str", "bool"])
def test_groupsize_must_be_an_int(groupsize: object) -> None:
    with pytest.raises(TypeError, match="groupsize must be an int"):
        QuantScheme("int4", granularity="per_group", groupsize=groupsize)  # type: ignore[arg-type]


@pytest.mark.parametrize("granularity", ["per_channel", "per_token", "per_tensor"])
def test_groupsize_only_with_per_group(granularity: str) -> None:
    with pytest.raises(ValueError, match="has no meaning with granularity"):
        QuantScheme("int4", granularity=granularity, groupsize=128)


def test_per_group_with_minus_one_is_per_channel() -> None:
    scheme = QuantScheme("int4", granularity="per_group", groupsize=-1)
    assert scheme.granularity == "per_channel"
    assert scheme == QuantScheme("int4", granularity="per_channel")
    assert scheme.scale_shape(7, 576) == (7, 1)


@pytest.mark.parametrize("dtype", ["fp4", "fp8", "fp8_e5m2"])
@pytest.mark.parametrize(
    "flags", [{"has_zero": True}, {"unsigned": True}], ids=["has_zero", "unsigned"]
)
def test_float_grids_are_signed_and_symmetric(dtype: str, flags: dict[str, bool]) -> None:
    with pytest.raises(ValueError, match="signed float grid"):
        QuantScheme(dtype, **flags)


@pytest.mark.parametrize("dtype", ["float16", "fp16"])
def test_float16_has_no_scheme(dtype: str) -> None:
    with pytest.raises(ValueError, match="means no quantization"):
        QuantScheme(dtype)


def test_unknown_dtype() -> None:
    with pytest.raises(ValueError, match="unknown quantization dtype 'int5'"):
        QuantScheme("int5")


def test_float_scheme_has_no_integer_range() -> None:
    with pytest.raises(TypeError, match="integer dtypes only"):
        QuantScheme("fp8").qmax  # noqa: B018


@pytest.mark.parametrize(
    ("kwargs", "rows", "cols", "shape"),
    [
        ({"granularity": "per_tensor"}, 7, 576, (1, 1)),
        ({"granularity": "per_channel"}, 7, 576, (7, 1)),
        ({"granularity": "per_token"}, 7, 576, (7, 1)),
        ({"granularity": "per_group", "groupsize": 64}, 7, 576, (7, 9)),
        ({"granularity": "per_group", "groupsize": 128}, 7, 576, (7, 5)),  # last group: 64 cols
        ({"granularity": "per_group", "groupsize": 128}, 3, 128, (3, 1)),
        ({"granularity": "per_group", "groupsize": 5}, 2, 13, (2, 3)),
        ({"granularity": "per_group", "groupsize": 1}, 2, 13, (2, 13)),
    ],
    ids=["tensor", "channel", "token", "g64-576", "g128-576", "g128-128", "g5-13", "g1-13"],
)
def test_scale_shape(kwargs: dict, rows: int, cols: int, shape: tuple[int, int]) -> None:
    assert QuantScheme("int4", **kwargs).scale_shape(rows, cols) == shape


def test_groups_of_576_with_g128() -> None:
    scheme = QuantScheme("int4", granularity="per_group", groupsize=128)
    assert scheme.group_cols(576) == 128
    assert scheme.num_groups(576) == 5  # 4 full groups and one of 576 - 512 = 64 columns


def test_groupsize_larger_than_cols_is_an_error() -> None:
    scheme = QuantScheme("int4", granularity="per_group", groupsize=128)
    with pytest.raises(ValueError, match="groupsize=128 is larger than the input dimension 64"):
        scheme.scale_shape(4, 64)


@pytest.mark.parametrize(
    ("scheme", "text"),
    [
        (QuantScheme("int4", "per_group", 128, has_zero=True), "int4 g128 asym"),
        (QuantScheme("int8", "per_channel"), "int8 channel"),
        (QuantScheme("fp8", "per_tensor"), "fp8 tensor"),
        (QuantScheme("int8", "per_token", unsigned=True), "int8 token unsigned"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_describe(scheme: QuantScheme, text: str) -> None:
    assert scheme.describe() == text


def test_scheme_is_frozen_and_hashable() -> None:
    scheme = QuantScheme("int4", "per_group", 128)
    with pytest.raises(dataclasses.FrozenInstanceError):
        scheme.groupsize = 64  # type: ignore[misc]
    assert {scheme: 1}[QuantScheme("int4", "per_group", 128)] == 1
