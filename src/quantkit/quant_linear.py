"""``QuantLinear``: a drop-in replacement of ``nn.Linear`` holding packed low-bit weights.

Buffers (weight ``W (out, in)`` quantized under a :class:`QuantScheme` with ``G`` groups per row):

* ``qweight  (out, ceil(in / 8) * bits)`` uint8: codes packed by :mod:`quantkit.packing`
* ``scales   (out|1, G|1)``: the stored scales (codes were computed with exactly these), in the
  scheme's scale format (:mod:`quantkit.scales`): float16 (the default), float32, or uint8 codes
  of e8m0 (``2**(E - 127)``) or e4m3 (fp8 bits); 2-D blocks of ``R`` rows store
  ``ceil(out / R)`` rows
* ``global_scale (1, 1)`` float32, e4m3 scale formats only: the per-tensor scale ``g`` (a scale is
  ``value(E) / g``)
* ``qzeros   (out|1, ceil(G / 8) * bits)`` uint8: packed zero points (asymmetric grids only)
* ``bias     (out,)`` float16, optional
* ``act_scale (1, 1)`` float32, optional: a statically calibrated activation scale
* ``act_zero (1, 1)`` int32, optional: its zero point (static asymmetric activation grids)

Activations are quantized on the way in when an activation scheme is set: dynamically (scale
computed per call from the input, e.g. per token) or statically (``act_scale``/``act_zero``).
With ``online_hadamard`` (a rotated model, :mod:`quantkit.rotation`) the input is first
multiplied by the orthogonal Hadamard matrix ``H_in`` (:class:`~quantkit.hadamard.OnlineHadamard`,
buffer ``input_transform.hadamard_k``): the weight was quantized as ``W H_in``, so the layer
computes ``quant(x H_in) @ dequant(W H_in)^T``.
An output scheme (``o_scheme``, SmoothQuant's ``quant_out``) also quantizes the layer's
output, dynamically per token. On CPU the forward dequantizes through the torch reference;
the fused Triton matmuls replace this on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantkit import ops, scales as scale_formats
from quantkit.hadamard import OnlineHadamard, hadamard_quantize, hadamard_transform, input_transform
from quantkit.packing import packed_cols
from quantkit.scheme import QuantScheme

SCALE_DTYPE = torch.float16  # of the default scale format (and of the bias)
# Smallest stored float16 scale: the fp16 normal minimum, so a stored scale never flushes to zero.
MIN_SCALE = 2.0**-14
# torch dtype of the ``scales`` buffer per scale format (e8m0 and e4m3 store their bit patterns)
SCALE_STORAGE = {"float16": torch.float16, "float32": torch.float32, "e8m0": torch.uint8, "e4m3": torch.uint8}


def storage_scale(scale: torch.Tensor, scheme: QuantScheme | None = None,
                  global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Round float32 scales to what :class:`QuantLinear` stores, back in float32: float16 (the
    default, and ``scheme=None``) is clamped to ``[2**-14, 65504]`` and rounded; float32, e8m0 and
    e4m3 scales are kept (:func:`quantkit.reference.compute_qparams` computes them on their grid).

    Algorithms quantize with the rounded scale so that stored codes and scales agree exactly.
    """
    if scheme is None or scheme.scale_format == "float16":
        return scale.clamp(MIN_SCALE, torch.finfo(SCALE_DTYPE).max).to(SCALE_DTYPE).float()
    return scale.float()


OBSERVERS = ("minmax", "mse")


@dataclass(frozen=True)
class MSERange:
    """The range search of the GPTQ reference quantizer (``mse=True``; llm-compressor's ``mse``
    observer): each group's range ``[lo, hi]`` (or ``amax``) is shrunk by ``f = 1 - k / n_grid``,
    ``k = 0 .. round(max_shrink * n_grid)``, and the ``f`` with the smallest
    ``sum |w - dequant(quant(w))|^norm`` over the group wins (ties keep the larger range, so it is
    never worse than min/max on that loss). Shrinking both ends alike keeps the zero point."""

    n_grid: int = 100
    max_shrink: float = 0.8
    norm: float = 2.4


def weight_qparams(w: torch.Tensor, scheme: QuantScheme, global_scale: torch.Tensor | None = None,
                   mse: MSERange | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (storage-rounded) and zero of a weight ``(out, in)`` computed from ``w`` itself
    (e4m3 schemes: with the per-tensor ``global_scale``, by default that of ``w``): from its
    min/max, or with ``mse`` the clipped range of :class:`MSERange`."""
    from quantkit import reference

    scale, zero = reference.compute_qparams(w, scheme, global_scale)
    if mse is None:
        return storage_scale(scale, scheme), zero
    w = reference.as_rows(w).float()
    intrinsic = scheme.scale_format in ("e8m0", "e4m3")  # scales computed from amax by their own rule
    if intrinsic:
        amax = reference.group_amax(w, scheme)
        if scheme.has_global_scale and global_scale is None:
            global_scale = reference.global_scale(w, scheme)
    rows, cols = w.shape
    # integer grids: reference.round_to_int_grid on parameters expanded once per candidate (the
    # reference's float32 operations without its per-call conversions); float grids: the reference
    zero_cols = None if zero is None else reference.expand_to_cols(zero, rows, cols, scheme).float()
    best, best_err = storage_scale(scale, scheme), None
    for k in range(int(round(mse.max_shrink * mse.n_grid)) + 1):
        f = 1.0 - k / mse.n_grid
        cand = (scale_formats.scale_from_amax(amax * f, scheme.dtype, scheme.absmax_code, scheme.scale_format,
                                              global_scale) if intrinsic else storage_scale(scale * f, scheme))
        if scheme.dtype.is_int:
            s_cols = reference.expand_to_cols(cand, rows, cols, scheme)  # (rows, cols)
            d = reference.round_to_int_grid(w, s_cols, zero_cols, scheme)[1].sub_(w)
        else:
            d = reference.dequantize(reference.quantize(w, cand, zero, scheme), cand, zero, scheme).sub_(w)
        err = reference.group_sum(d.abs_().pow_(mse.norm), scheme)  # scale_shape
        if best_err is None:
            best, best_err = cand, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, cand, best)
    return best, zero


class QuantLinear(nn.Module):
    """``y = out_quant(act_quant(T(x)) @ dequant(qweight, scales, qzeros).T + bias)``; ``T`` is the
    online Hadamard where ``online_hadamard`` is set, else the identity.

    ``backend`` (an attribute, not saved): ``auto`` runs the fused Triton matmuls on CUDA
    inputs and the torch reference elsewhere; ``triton`` forces the kernels (on a CPU only
    under ``TRITON_INTERPRET=1``, for tests); ``torch`` forces the reference.

    ``out_quant`` is the identity unless ``o_scheme`` is set (a ``per_token`` scheme, or per group
    of a token for block formats: the output is fake-quantized with scales computed per call).
    """

    backend: ops.Backend = "auto"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        w_scheme: QuantScheme,
        a_scheme: QuantScheme | None = None,
        a_static: bool = False,
        device: torch.device | str | None = None,
        o_scheme: QuantScheme | None = None,
        online_hadamard: bool = False,
    ) -> None:
        super().__init__()
        if o_scheme is not None and o_scheme.granularity not in ("per_token", "per_group"):
            raise ValueError(f"an output scheme is dynamic per token (or per group of a token); got "
                             f"{o_scheme.describe()}")
        self.in_features, self.out_features = in_features, out_features
        self.w_scheme, self.a_scheme, self.a_static = w_scheme, a_scheme, a_static
        self.o_scheme = o_scheme
        rows, groups = w_scheme.scale_shape(out_features, in_features)
        bits = w_scheme.bits
        self.register_buffer("qweight", torch.zeros(out_features, packed_cols(in_features, bits), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(rows, groups, dtype=SCALE_STORAGE[w_scheme.scale_format],
                                                  device=device))
        glob = torch.ones(1, 1, dtype=torch.float32, device=device)
        self.register_buffer("global_scale", glob if w_scheme.has_global_scale else None)
        zeros = torch.zeros(rows, packed_cols(groups, bits), dtype=torch.uint8, device=device)
        self.register_buffer("qzeros", zeros if w_scheme.has_zero else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=SCALE_DTYPE, device=device) if bias else None)
        act_scale = torch.ones(1, 1, dtype=torch.float32, device=device)
        static = a_scheme is not None and a_static
        self.register_buffer("act_scale", act_scale if static else None)
        act_zero = torch.zeros(1, 1, dtype=torch.int32, device=device)
        self.register_buffer("act_zero", act_zero if static and a_scheme.has_zero else None)
        self.online_hadamard = False
        self.input_transform: OnlineHadamard | None = None
        if online_hadamard:
            self.add_online_hadamard(device)

    def add_online_hadamard(self, device: torch.device | str | None = None) -> None:
        """Multiply every input by ``H_in`` first (the weight must already be ``W H_in``)."""
        self.online_hadamard = True
        self.input_transform = OnlineHadamard(self.in_features, device)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ H_in`` with ``online_hadamard``, else ``x``."""
        if self.input_transform is None:
            return x
        return hadamard_transform(x, self.input_transform.hadamard_k, self.backend)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        w_scheme: QuantScheme,
        a_scheme: QuantScheme | None = None,
        act_scale: torch.Tensor | None = None,
        qparams: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        act_zero: torch.Tensor | None = None,
        o_scheme: QuantScheme | None = None,
        global_scale: torch.Tensor | None = None,
    ) -> "QuantLinear":
        """Quantize ``linear.weight`` round-to-nearest on the grid given by ``qparams``.

        ``qparams`` (scale, zero) default to :func:`weight_qparams` of the weight itself;
        data-aware algorithms pass their own (e.g. clipped) ones or already-quantized weights.
        ``global_scale``: e4m3 schemes' per-tensor scale the ``qparams`` were computed with
        (default: that of the weight, :func:`quantkit.reference.global_scale`).
        ``act_scale`` makes activation quantization static; an ``a_scheme`` with a zero point
        then needs ``act_zero`` too. ``o_scheme`` quantizes the output (see the class doc).
        """
        if act_scale is not None and a_scheme is not None and a_scheme.has_zero and act_zero is None:
            raise ValueError(f"static activations on {a_scheme.describe()} need act_zero (the calibrated zero point)")
        if act_zero is not None and (act_scale is None or a_scheme is None or not a_scheme.has_zero):
            raise ValueError("act_zero is the zero point of a static asymmetric activation grid: "
                             "it needs act_scale and an a_scheme with has_zero")
        w = linear.weight.detach()
        if w_scheme.has_global_scale and global_scale is None:
            from quantkit.reference import global_scale as tensor_global_scale

            global_scale = tensor_global_scale(w, w_scheme)
        scale, zero = qparams if qparams is not None else weight_qparams(w, w_scheme, global_scale)
        codes = ops.quantize_with_qparams(w, scale, zero, w_scheme)  # (out, in)
        module = cls(
            linear.in_features, linear.out_features, linear.bias is not None, w_scheme, a_scheme,
            a_static=act_scale is not None, device=w.device, o_scheme=o_scheme,
            online_hadamard=input_transform(linear) is not None,
        )
        module.set_weight(codes, scale, zero, global_scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        if act_scale is not None:
            module.act_scale.copy_(act_scale.reshape(1, 1))
        if act_zero is not None:
            module.act_zero.copy_(act_zero.reshape(1, 1))
        return module

    def set_weight(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   global_scale: torch.Tensor | None = None) -> None:
        """Store ``codes (out, in)``, ``scale`` (float32 values, shapes of ``w_scheme``) in the
        scheme's scale format and ``zero``; e4m3 schemes need the per-tensor ``global_scale``
        the scales were computed with (a scale off the format's grid is a ValueError)."""
        bits = self.w_scheme.bits
        fmt = self.w_scheme.scale_format
        if self.w_scheme.has_global_scale:
            if global_scale is None:
                raise ValueError(f"{self.w_scheme.describe()}: e4m3 scales need their per-tensor global_scale")
            self.global_scale.copy_(global_scale.reshape(1, 1))
        elif global_scale is not None:
            raise ValueError(f"global_scale given but {self.w_scheme.describe()} has {fmt} scales without one")
        self.qweight.copy_(ops.pack_codes(codes, bits))
        self.scales.copy_(scale_formats.encode_scales(scale, fmt, self.global_scale, MIN_SCALE))
        if self.w_scheme.has_zero:
            assert zero is not None, "an asymmetric scheme needs zero points"
            zero_codes = zero.to(torch.int8 if self.w_scheme.qmin < 0 else torch.uint8)
            self.qzeros.copy_(ops.pack_codes(zero_codes, bits))

    def weight_codes(self) -> torch.Tensor:
        """Unpacked codes ``(out, in)``."""
        signed = self.w_scheme.dtype.is_int and self.w_scheme.qmin < 0
        return ops.unpack_codes(self.qweight, self.w_scheme.bits, self.in_features, signed)

    def zeros(self) -> torch.Tensor | None:
        """Unpacked zero points ``(out|1, G|1)`` int32, or None."""
        if self.qzeros is None:
            return None
        signed = self.w_scheme.qmin < 0
        groups = self.scales.shape[1]
        return ops.unpack_codes(self.qzeros, self.w_scheme.bits, groups, signed).to(torch.int32)

    def effective_scales(self) -> torch.Tensor:
        """The float32 scales ``(out|1, G|1)`` the codes are multiplied by (decoded from the
        scale format)."""
        return scale_formats.decode_scales(self.scales, self.w_scheme.scale_format, self.global_scale)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``(out, in)`` this module computes with."""
        return ops.dequantize(self.weight_codes(), self.effective_scales(), self.zeros(), self.w_scheme, dtype)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize activations ``x (..., in)`` under ``a_scheme`` (identity if none)."""
        if self.a_scheme is None:
            return x
        if self.a_static:
            codes = ops.quantize_with_qparams(x, self.act_scale, self.act_zero, self.a_scheme)
            return ops.dequantize(codes, self.act_scale, self.act_zero, self.a_scheme, x.dtype).reshape(x.shape)
        return ops.fake_quantize(x, self.a_scheme, check_finite=False)  # hot path: no host sync

    def quantize_output(self, y: torch.Tensor) -> torch.Tensor:
        """Fake-quantize outputs ``y (..., out)`` per token under ``o_scheme`` (identity if none)."""
        if self.o_scheme is None:
            return y
        return ops.fake_quantize(y, self.o_scheme, check_finite=False)

    def _forward_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight for ``forward``. Off CUDA it is kept between calls (the torch
        reference path simulates the low-bit matmul with a dense weight anyway), keyed on the
        storage and in-place version of every buffer it comes from, so a moved or rewritten
        buffer is never served stale."""
        if self.qweight.device.type == "cuda":
            return self.dequantized_weight(dtype)
        sources = (self.qweight, self.scales, self.qzeros, self.global_scale)
        key = (dtype, *((t.data_ptr(), t._version) for t in sources if t is not None))
        cached = self.__dict__.get("_weight_cache")
        if cached is None or cached[0] != key:
            cached = (key, self.dequantized_weight(dtype))
            self.__dict__["_weight_cache"] = cached
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ops.use_triton(x, self.backend):
            return self.quantize_output(self._fused_forward(x))
        x = self.quantize_input(self.transform_input(x))
        w = self._forward_weight(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return self.quantize_output(nn.functional.linear(x, w, bias))

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The Triton path: W8A8 int8 / fp8 GEMMs on the codes of both operands where the
        schemes allow (symmetric, per-channel/tensor weights, per-token/tensor activations),
        else activations fake-quantized and the fused dequant-GEMM (GEMV for small M) on the
        packed weight codes. Same numbers as the torch path up to float accumulation order."""
        kernel = self._code_matmul()
        if kernel is None:
            x = self.quantize_input(self.transform_input(x))
            return ops.quant_linear_matmul(x, self.qweight, self.scales, self.qzeros, self.bias, self.w_scheme,
                                           backend=self.backend, global_scale=self.global_scale)
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.input_transform is not None and not self.a_static:  # transform + quantize, one kernel
            codes, x_scale, _ = hadamard_quantize(x2, self.input_transform.hadamard_k, self.a_scheme, self.backend)
        elif self.a_static:
            x2 = self.transform_input(x2)
            x_scale = self.act_scale
            codes = ops.quantize_with_qparams(x2, x_scale, None, self.a_scheme, backend=self.backend)
        else:
            codes, x_scale, _ = ops.quantize(x2, self.a_scheme, backend=self.backend, check_finite=False)
        y = kernel(codes, x_scale, self.code_matrix(), self.scales, self.bias, out_dtype=x.dtype,
                   backend=self.backend)
        return y.reshape(*x.shape[:-1], self.out_features)

    def code_matrix(self) -> torch.Tensor:
        """The 8-bit weight codes ``(out, in)`` as a view of ``qweight`` (int8 for signed int
        grids, else uint8: unsigned codes or fp8 bit patterns). 8-bit packing stores each code
        in its own byte and pads a row to a multiple of 8 bytes, so the first ``in_features``
        bytes of a row are its codes; kernels taking ``(N, K)`` codes get this, not ``qweight``."""
        if self.w_scheme.bits != 8:
            raise ValueError(f"code_matrix needs 8-bit weight codes, got {self.w_scheme.describe()}")
        codes = self.qweight[:, : self.in_features]  # (out, in), row stride ceil(in / 8) * 8
        signed = self.w_scheme.dtype.is_int and self.w_scheme.qmin < 0
        return codes.view(torch.int8) if signed else codes

    def _code_matmul(self):
        """``ops.int8_matmul`` / ``ops.fp8_matmul`` when both operands' codes can be multiplied
        directly, else None."""
        w, a = self.w_scheme, self.a_scheme
        if a is None or w.has_zero or a.has_zero or w.granularity == "per_group" or self.act_zero is not None:
            return None
        if w.scale_format not in ("float16", "float32") or a.scale_format not in ("float16", "float32"):
            return None  # the scaled GEMMs take float scales
        if w.dtype.name == a.dtype.name == "int8" and w.qmin < 0 and a.qmin < 0:
            return ops.int8_matmul
        if w.dtype.name == a.dtype.name == "fp8":
            return ops.fp8_matmul
        return None

    def weight_storage_bits(self) -> int:
        """Bits that store the weight: packed codes, scales (in their format: 16, 32 or 8 bits
        each), the per-tensor scale of e4m3 formats and packed zero points."""
        tensors = [t for t in (self.qweight, self.scales, self.global_scale, self.qzeros) if t is not None]
        return sum(t.numel() * t.element_size() * 8 for t in tensors)

    def extra_repr(self) -> str:
        act = f", act={self.a_scheme.describe()}{' static' if self.a_static else ''}" if self.a_scheme else ""
        out = f", out_act={self.o_scheme.describe()}" if self.o_scheme else ""
        had = ", online_hadamard" if self.online_hadamard else ""
        return f"in={self.in_features}, out={self.out_features}, w={self.w_scheme.describe()}{act}{out}{had}"


def carry_input_transform(original: nn.Module, replacement: nn.Module) -> nn.Module:
    """``replacement`` of ``original`` with ``original``'s online transform (an algorithm that
    built its QuantLinear itself does not know about it); a float replacement becomes a
    :class:`~quantkit.hadamard.HadamardLinear`."""
    from quantkit.hadamard import HadamardLinear

    if input_transform(original) is None or input_transform(replacement) is not None:
        return replacement
    if isinstance(replacement, QuantLinear):
        replacement.add_online_hadamard(replacement.qweight.device)
        return replacement
    if type(replacement) is nn.Linear:
        return HadamardLinear.from_linear(replacement)
    raise TypeError(f"cannot give a {type(replacement).__name__} the online Hadamard of the layer it replaces")
