"""QuantScheme validation, normalisation and scale shapes."""

from __future__ import annotations

import dataclasses

import pytest

from quantkit.dtypes import get_dtype
from quantkit.scheme import GRANULARITIES, QuantScheme, check_grid


def test_defaults_and_dtype_by_name() -> None:
    scheme = QuantScheme("int4")
    assert scheme.dtype is get_dtype("int4")
    assert (scheme.granularity, scheme.groupsize, scheme.has_zero, scheme.unsigned) == (
        "per_channel", -1, False, False,
    )
    assert (scheme.bits, scheme.qmin, scheme.qmax) == (4, -8, 7)
    assert scheme.symmetric_range == "full" and scheme.symmetric


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"dtype": "int4"}, 7.5),
        ({"dtype": "int4", "symmetric_range": "restricted"}, 7.0),
        ({"dtype": "int3"}, 3.5),
        ({"dtype": "int2"}, 1.5),
        ({"dtype": "int8"}, 127.5),
        ({"dtype": "int8", "symmetric_range": "restricted"}, 127.0),
        ({"dtype": "int4", "unsigned": True}, 15.0),  # max(x, 0) / qmax
        ({"dtype": "fp8"}, 448.0),
        ({"dtype": "fp4"}, 6.0),
    ],
    ids=["int4", "int4-restricted", "int3", "int2", "int8", "int8-restricted", "uint4", "fp8", "fp4"],
)
def test_absmax_code(kwargs: dict, code: float) -> None:
    assert QuantScheme(**kwargs).absmax_code == code


def test_absmax_code_is_undefined_with_a_zero_point() -> None:
    with pytest.raises(ValueError, match="has a zero point"):
        QuantScheme("int4", has_zero=True).absmax_code  # noqa: B018


@pytest.mark.parametrize(
    "kwargs",
    [{"has_zero": True}, {"unsigned": True}, {"has_zero": True, "unsigned": True}],
    ids=["asym", "unsigned", "asym-unsigned"],
)
@pytest.mark.parametrize("dtype", ["int4", "fp8"])
def test_restricted_range_only_on_symmetric_signed_int_grids(dtype: str, kwargs: dict) -> None:
    if dtype == "fp8":
        kwargs = {}
    with pytest.raises(ValueError, match="symmetric_range=restricted acts on signed integer grids"):
        QuantScheme(dtype, symmetric_range="restricted", **kwargs)


def test_unknown_symmetric_range_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="symmetric_range='narrow' is not valid; choose one of: full, restricted"):
        QuantScheme("int4", symmetric_range="narrow")


# the one grid rule of every run: (dtype, has_zero, unsigned, symmetric_range) -> error or None
GRID_CASES = {
    "int4-sym": (("int4", False, False, None), None),
    "int4-sym-restricted": (("int4", False, False, "restricted"), None),
    "int4-sym-full": (("int4", False, False, "full"), None),
    "int4-asym-unsigned": (("int4", True, True, None), None),
    "int4-asym-signed": (("int4", True, False, None), None),
    "fp8": (("fp8", False, False, None), None),
    "float16": (("float16", False, False, None), None),
    "int4-unsigned-no-zero": (("int4", False, True, None),
                              r"w_dtype.unsigned=true without a zero point \(w_dtype.has_zero=false\) .*clip"),
    "int8-unsigned-no-zero-restricted": (("int8", False, True, "restricted"), "w_dtype.unsigned=true without"),
    "int4-asym-restricted": (("int4", True, True, "restricted"),
                             "w_dtype.symmetric_range=restricted acts on symmetric signed grids only"),
    "int4-asym-full": (("int4", True, False, "full"), "w_dtype.symmetric_range=full acts on symmetric"),
    "int4-bad-range": (("int4", False, False, "narrow"),
                       "w_dtype.symmetric_range='narrow' is not valid; choose one of: full, restricted"),
    "fp8-range": (("fp8", False, False, "full"), "w_dtype.symmetric_range=full is not valid with w_dtype=fp8"),
    "fp4-unsigned": (("fp4", False, True, None), "w_dtype.unsigned=True is not valid with w_dtype=fp4"),
    "float16-range": (("float16", False, False, "restricted"),
                      "w_dtype.symmetric_range=restricted has nothing to act on: w_dtype=float16"),
    "float16-zero": (("float16", True, False, None), "w_dtype.has_zero=True has nothing to act on"),
}
KEYS = {"dtype": "w_dtype", "has_zero": "w_dtype.has_zero", "unsigned": "w_dtype.unsigned",
        "symmetric_range": "w_dtype.symmetric_range"}


@pytest.mark.parametrize("case", GRID_CASES)
def test_check_grid_names_the_keys_and_the_allowed_combinations(case: str) -> None:
    args, message = GRID_CASES[case]
    if message is None:
        check_grid(*args, keys=KEYS)
        return
    with pytest.raises(ValueError, match=message) as info:
        check_grid(*args, keys=KEYS)
    if "without a zero point" in message:
        assert "Allowed integer grids: has_zero=true with unsigned=true or false" in str(info.value)


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
        (QuantScheme("int4", "per_group", 64), "int4 g64"),
        (QuantScheme("int8", "per_token", symmetric_range="restricted"), "int8 token restricted"),
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


# --- the grid rule in runs: every algorithm, refused before the model loads ----------------------

SYM = ("w_dtype.has_zero=false", "w_dtype.unsigned=false")
RUN_GRID_ERRORS = {
    # w_dtype.has_zero=false alone keeps the stub's unsigned=true: negative weights would clip
    **{f"{algo}-has-zero-false-alone": ([f"algo={algo}", "w_dtype.has_zero=false"],
                                        r"w_dtype.unsigned=true without a zero point \(w_dtype.has_zero=false\)")
       for algo in ("rtn", "gptq", "awq")},
    "smoothquant-has-zero-false-alone": (["algo=smoothquant", "a_dtype=int8", "w_dtype.has_zero=false"],
                                         r"w_dtype.unsigned=true without a zero point"),
    "zeroquant-has-zero-false-alone": (["algo=zeroquant", "a_dtype=int8", "w_dtype.has_zero=false"],
                                       r"w_dtype.unsigned=true without a zero point \(w_dtype.has_zero=false\)"),
    "zeroquant-w-has-zero-key": (["algo=zeroquant", "a_dtype=int8", "algo.w_has_zero=false"],
                                 r"w_dtype.unsigned=true without a zero point \(algo.w_has_zero=false\)"),
    "unsigned-activations": (["a_dtype=int8", "a_dtype.unsigned=true"],
                             r"a_dtype.unsigned=true without a zero point \(a_dtype.has_zero=false\)"),
    "range-on-asymmetric-weights": (["w_dtype.symmetric_range=restricted"],
                                    "w_dtype.symmetric_range=restricted acts on symmetric signed grids only"),
    "range-value": ([*SYM, "w_dtype.symmetric_range=narrow"],
                    "w_dtype.symmetric_range='narrow' is not valid; choose one of: full, restricted"),
    "range-on-float16-activations": (["a_dtype.symmetric_range=full"],
                                     "a_dtype.symmetric_range=full has nothing to act on: a_dtype=float16"),
    "range-on-fp8": (["w_dtype=fp8", "algo.groupsize=-1", "w_dtype.symmetric_range=full"],
                     "w_dtype.symmetric_range=full is not valid with w_dtype=fp8"),
    "clip-on-weights": (["w_dtype.clip_ratio=0.9"], "w_dtype.clip_ratio=0.9: a fixed clip ratio applies to activations"),
    "clip-value": (["a_dtype=int4", "a_dtype.clip_ratio=1.5"], r"clip_ratio=1.5 must be a number in \(0, 1\]"),
    "clip-on-asymmetric-activations": (["a_dtype=int4", "a_dtype.has_zero=true", "a_dtype.unsigned=true",
                                        "a_dtype.clip_ratio=0.9"], "a_dtype.clip_ratio=0.9 shrinks a scale"),
    "observer-value": (["algo=gptq", "algo.observer=l2"], "algo.observer='l2' is not valid"),
}


@pytest.mark.parametrize("case", RUN_GRID_ERRORS)
def test_bad_grids_fail_before_the_model_loads_naming_the_keys(case, tmp_path, monkeypatch):
    from quantkit import models, runner
    from quantkit.config import ConfigError, build_run_config
    from tests.test_config import compose_dict

    overrides, message = RUN_GRID_ERRORS[case]
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    resolved = compose_dict("model=tiny-llama", *overrides, f"output_dir={tmp_path}")
    with pytest.raises(ConfigError, match=message):
        runner.run(build_run_config(resolved), resolved)
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    ("overrides", "w_range", "a_range"),
    [
        ([*SYM], "full", None),
        ([*SYM, "w_dtype.symmetric_range=restricted"], "restricted", None),
        (["w_dtype=int8", "a_dtype=int8"], "full", "restricted"),  # int8 weights are symmetric by default
        (["w_dtype=int8", "a_dtype=int8", "a_dtype.symmetric_range=full"], "full", "full"),
        (["algo=zeroquant", "a_dtype=int8", "algo.w_has_zero=false", "algo.w_unsign=false",
          "w_dtype.symmetric_range=restricted"], "restricted", "restricted"),
        (["algo=gptq", *SYM], "full", None),
        (["algo=awq", *SYM, "w_dtype.symmetric_range=restricted"], "restricted", None),
    ],
    ids=["w-sym", "w-sym-restricted", "w8a8", "w8a8-full-act", "zeroquant-keys", "gptq", "awq-restricted"],
)
def test_symmetric_range_reaches_the_schemes(overrides, w_range, a_range):
    from quantkit.algorithms.registry import build_algorithm
    from quantkit.config import build_run_config
    from tests.test_config import compose_dict

    run = build_run_config(compose_dict("model=tiny-llama", *overrides))
    algorithm = build_algorithm(run.algo, run.w_dtype, run.a_dtype)
    assert algorithm.w_scheme.symmetric_range == w_range and algorithm.w_scheme.symmetric
    assert (algorithm.a_scheme.symmetric_range if algorithm.a_scheme else None) == a_range
