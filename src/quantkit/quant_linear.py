"""``QuantLinear``: a drop-in replacement of ``nn.Linear`` holding packed low-bit weights.

Buffers (weight ``W (out, in)`` quantized under a :class:`QuantScheme` with ``G`` groups per row):

* ``qweight  (out, ceil(in / 8) * bits)`` uint8: codes packed by :mod:`quantkit.packing`
* ``scales   (out|1, G|1)`` float16: the stored scales (codes were computed with exactly these)
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

import torch
from torch import nn

from quantkit import ops
from quantkit.hadamard import OnlineHadamard, hadamard_quantize, hadamard_transform, input_transform
from quantkit.packing import packed_cols
from quantkit.scheme import QuantScheme

SCALE_DTYPE = torch.float16
# Smallest stored scale: the fp16 normal minimum, so a stored scale never flushes to zero.
MIN_SCALE = 2.0**-14


def storage_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round float32 scales to what :class:`QuantLinear` stores (float16), back in float32.

    Algorithms quantize with the rounded scale so that stored codes and scales agree exactly.
    """
    return scale.clamp(MIN_SCALE, torch.finfo(SCALE_DTYPE).max).to(SCALE_DTYPE).float()


def weight_qparams(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (storage-rounded) and zero of a weight ``(out, in)`` computed from ``w`` itself."""
    from quantkit.reference import compute_qparams

    scale, zero = compute_qparams(w, scheme)
    return storage_scale(scale), zero


class QuantLinear(nn.Module):
    """``y = out_quant(act_quant(T(x)) @ dequant(qweight, scales, qzeros).T + bias)``; ``T`` is the
    online Hadamard where ``online_hadamard`` is set, else the identity.

    ``backend`` (an attribute, not saved): ``auto`` runs the fused Triton matmuls on CUDA
    inputs and the torch reference elsewhere; ``triton`` forces the kernels (on a CPU only
    under ``TRITON_INTERPRET=1``, for tests); ``torch`` forces the reference.

    ``out_quant`` is the identity unless ``o_scheme`` is set (a ``per_token`` scheme: the
    output is fake-quantized with one scale per token, computed per call).
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
        if o_scheme is not None and o_scheme.granularity != "per_token":
            raise ValueError(f"an output scheme is dynamic per token; got {o_scheme.describe()}")
        self.in_features, self.out_features = in_features, out_features
        self.w_scheme, self.a_scheme, self.a_static = w_scheme, a_scheme, a_static
        self.o_scheme = o_scheme
        rows, groups = w_scheme.scale_shape(out_features, in_features)
        bits = w_scheme.bits
        self.register_buffer("qweight", torch.zeros(out_features, packed_cols(in_features, bits), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(rows, groups, dtype=SCALE_DTYPE, device=device))
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
    ) -> "QuantLinear":
        """Quantize ``linear.weight`` round-to-nearest on the grid given by ``qparams``.

        ``qparams`` (scale, zero) default to :func:`weight_qparams` of the weight itself;
        data-aware algorithms pass their own (e.g. clipped) ones or already-quantized weights.
        ``act_scale`` makes activation quantization static; an ``a_scheme`` with a zero point
        then needs ``act_zero`` too. ``o_scheme`` quantizes the output (see the class doc).
        """
        if act_scale is not None and a_scheme is not None and a_scheme.has_zero and act_zero is None:
            raise ValueError(f"static activations on {a_scheme.describe()} need act_zero (the calibrated zero point)")
        if act_zero is not None and (act_scale is None or a_scheme is None or not a_scheme.has_zero):
            raise ValueError("act_zero is the zero point of a static asymmetric activation grid: "
                             "it needs act_scale and an a_scheme with has_zero")
        w = linear.weight.detach()
        scale, zero = qparams if qparams is not None else weight_qparams(w, w_scheme)
        codes = ops.quantize_with_qparams(w, scale, zero, w_scheme)  # (out, in)
        module = cls(
            linear.in_features, linear.out_features, linear.bias is not None, w_scheme, a_scheme,
            a_static=act_scale is not None, device=w.device, o_scheme=o_scheme,
            online_hadamard=input_transform(linear) is not None,
        )
        module.set_weight(codes, scale, zero)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        if act_scale is not None:
            module.act_scale.copy_(act_scale.reshape(1, 1))
        if act_zero is not None:
            module.act_zero.copy_(act_zero.reshape(1, 1))
        return module

    def set_weight(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        """Store ``codes (out, in)``, ``scale`` and ``zero`` (shapes of ``w_scheme``)."""
        bits = self.w_scheme.bits
        self.qweight.copy_(ops.pack_codes(codes, bits))
        self.scales.copy_(scale.to(SCALE_DTYPE))
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

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``(out, in)`` this module computes with."""
        return ops.dequantize(self.weight_codes(), self.scales.float(), self.zeros(), self.w_scheme, dtype)

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
        sources = (self.qweight, self.scales, self.qzeros)
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
                                           backend=self.backend)
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
        if w.dtype.name == a.dtype.name == "int8" and w.qmin < 0 and a.qmin < 0:
            return ops.int8_matmul
        if w.dtype.name == a.dtype.name == "fp8":
            return ops.fp8_matmul
        return None

    def weight_storage_bits(self) -> int:
        """Bits that store the weight: packed codes, scales and packed zero points."""
        tensors = [self.qweight, self.scales] + ([self.qzeros] if self.qzeros is not None else [])
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
