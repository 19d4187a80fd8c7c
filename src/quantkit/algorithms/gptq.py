"""GPTQ (Frantar et al. 2022): one-shot weight quantization with second-order error correction.

For a linear with weight ``W (out, in)`` and calibration inputs ``X (tokens, in)`` GPTQ
minimizes ``||X W^T - X Q^T||^2`` over ``Q`` on the quantization grid. With the Hessian
``H = 2/n X^T X`` it quantizes one input column at a time and spreads that column's rounding
error over the columns not yet quantized (the OBS update), using the upper Cholesky factor
``U`` of ``(H + damp I)^-1`` (``U^T U = H^-1``):

    err = (W[:, j] - Q[:, j]) / U[j, j]
    W[:, j:] -= err ⊗ U[j, j:]

Updates are applied lazily: inside a block of ``blocksize`` columns eagerly, to the columns
after the block with one matmul per block (the published "lazy batch" form).

Group parameters (``per_group``) are computed when a group's first column is reached, from
the already error-updated weights (including the updates still pending from the current
block, so the result does not depend on ``blocksize``), in the scheme's scale format: block
formats fix each block's scale there (an e8m0 power of two, or an e4m3 scale over the fp32
per-tensor scale, which is computed once from the whole weight before any column changes;
2-D blocks over all their rows), and every column is then rounded onto that block's grid with
its error fed back as usual. With ``actorder`` the columns are
processed by descending ``diag(H)``; the group parameters are then fixed up front from the
original weights in the original column order ("static groups"), so group ``k // groupsize``
of column ``k`` stays contiguous and the packed layout needs no ``g_idx``.

Ranges (``observer``): ``minmax`` takes each group's scale from its min/max; ``mse`` searches
a clipped range per group (:class:`~quantkit.quant_linear.MSERange`: the GPTQ reference
quantizer's ``mse=True``, QuaRot's weight clipping), wherever the group parameters are computed.

Scale refit (``refit_scales``): with the codes fixed, the dequantized weight is linear in the
group scales, so the scales that minimise GPTQ's objective for the codes found are the solution
of one small linear system per row (:func:`refit_scales`, GPTVQ's codebook update in scalar
form); further rounds run GPTQ again with those scales fixed and refit, while the loss falls.

Asymmetric calibration (``float_target``, GPTAQ: Li et al. 2025): with ``block_sequential`` a
linear's inputs ``X_q`` come from the already quantized blocks before it, whose error GPTQ alone
does not try to undo. With ``float_target = a > 0`` the pipeline also runs the full-precision
model alongside (:func:`quantkit.pipeline.quantize_model`), each observer also collects
``D = 2/n (X_fp - X_q)^T X_q`` from the full-precision inputs ``X_fp`` of the same tokens, and GPTQ
rounds the weight whose outputs on ``X_q`` best reproduce the full-precision layer's outputs,

    W' = W + a W D (H + damp I)^-1        (a = 1: argmin_W' ||X_fp W^T - X_q W'^T||^2 + damp ||W' - W||^2)

(:func:`float_target_weight`; the damped least-squares target stays ``W`` where the two streams
agree). Since the residual of that fit is orthogonal to ``X_q``, GPTQ's objective for ``W'``
equals the asymmetric objective ``||X_fp W^T - X_q Q^T||^2`` up to a constant; ``a < 1`` moves
only part of the way (GPTAQ's reference uses 0.25).

Inputs of the Hessian (``hessian_inputs``): ``raw`` collects ``H`` (and ``D``) from the inputs
as they reach the linear; ``quantized`` from those inputs after the linear's dynamic activation
quantization, the inputs the quantized linear actually multiplies (QuaRot's and GPTAQ's GPTQ for
W4A4), so GPTQ minimises ``||X^ W^T - X^ Q^T||`` (with ``float_target``: ``||X_fp W^T - X^_q Q^T||``, which
also pulls the weights towards undoing the activation rounding on average).

Compositions (``pre``): ``pre=smoothquant`` (SmoothQuant+GPTQ, with ``alpha``) or ``pre=awq``
(AWQ+GPTQ: AWQ's scale search with ``awq.yaml``'s defaults, no clip search, GPTQ does the
rounding) transform each linear group in :meth:`GPTQ.prepare_group`: per-input-channel scales
``s`` are searched and folded into the producing norm/linear, so the linears now read
``x / s``. The Hessian collected on ``x`` becomes exactly the one of ``x / s``,
``H -> diag(1/s) H diag(1/s)`` (no second calibration pass), and GPTQ quantizes the
transformed weights with it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantkit import ops
from quantkit.algorithms.awq import AWQConfig, AWQObserver, search_scales
from quantkit.algorithms.base import (
    A_QTYPES, ActRangeObserver, Algorithm, ChannelRangeObserver, Observer, activation_scheme, check_observer_keys,
    default_granularity, mse_range, weight_scheme,
)
from quantkit.algorithms.fold import FoldTarget, share
from quantkit.algorithms.smoothquant import check_alpha, search_and_fold, smooth_scales
from quantkit.algorithms.registry import register
from quantkit.config import ConfigError, DTypeConfig, check, check_choice, check_groupsize
from quantkit.layers import LayerScheme
from quantkit.quant_linear import MSERange, QuantLinear, storage_scale, weight_qparams
from quantkit.reference import dequantize, expand_to_cols, global_scale, quantize, round_to_int_grid
from quantkit.scheme import QuantScheme

log = logging.getLogger(__name__)

DAMP_GROWTH = 10.0  # damping multiplier after a failed factorization
MAX_DAMP_RAISES = 6  # 0.01 * 10**6: far past any Hessian with finite entries
HESSIAN_INPUTS = ("raw", "quantized")  # algo.hessian_inputs: before or after the activation quantization
PRE_ALGORITHMS = ("smoothquant", "awq")  # algo.pre: transforms run before GPTQ's rounding
DEFAULT_ALPHA = 0.5  # algo.alpha when pre=smoothquant leaves it null


@dataclass(frozen=True)
class GPTQConfig:
    """``conf/algo/gptq.yaml``; ``static_groups`` acts only with ``actorder`` (see module doc)."""

    name: str = "gptq"
    groupsize: int = 128
    blocksize: int = 128
    percdamp: float = 0.01
    actorder: bool = True  # the defaults study's winner (benchmarks/DEFAULTS_STUDY.md)
    static_groups: bool = True
    a_qtype: str = "per_token"
    block_sequential: bool = True
    layer_sequential: bool = True
    pre: str | None = None
    alpha: float | None = None
    gqa_fold: bool = False
    observer: str = "minmax"
    mse_grid: int = MSERange.n_grid
    mse_max_shrink: float = MSERange.max_shrink
    mse_norm: float = MSERange.norm
    refit_scales: int = 0
    float_target: float = 0.0
    hessian_inputs: str = "raw"

    def __post_init__(self) -> None:
        check_observer_keys(self)
        check(self.pre is None or self.pre in PRE_ALGORITHMS,
              f"algo.pre={self.pre!r} is not valid; choose one of: null, {', '.join(PRE_ALGORITHMS)}")
        if self.alpha is not None:
            check(self.pre == "smoothquant",
                  f"algo.alpha={self.alpha} acts only with algo.pre=smoothquant (algo.pre={self.pre}); set it to null")
            check_alpha("algo.alpha", self.alpha)
        check(not self.gqa_fold or self.pre is not None,
              "algo.gqa_fold=true acts only with algo.pre (smoothquant or awq: the scales it folds); set it to false")
        check_groupsize("algo.groupsize", self.groupsize)
        check(isinstance(self.refit_scales, int) and not isinstance(self.refit_scales, bool) and self.refit_scales >= 0,
              f"algo.refit_scales={self.refit_scales!r} must be an integer >= 0 (0: off; n: rounds of rounding + scale refit)")
        check(not isinstance(self.float_target, bool) and isinstance(self.float_target, (int, float))
              and 0.0 <= self.float_target <= 1.0,
              f"algo.float_target={self.float_target!r} must be a number in [0, 1] (0: off; 1: reproduce the "
              "full-precision model's outputs; GPTAQ uses 0.25)")
        check_choice("algo.hessian_inputs", self.hessian_inputs, HESSIAN_INPUTS)
        if self.hessian_inputs == "quantized":
            check(self.a_qtype == "per_token",
                  "algo.hessian_inputs=quantized needs algo.a_qtype=per_token (dynamic activation scales: static "
                  "scales are known only after calibration)")
            check(self.pre is None,
                  f"algo.hessian_inputs=quantized cannot be combined with algo.pre={self.pre} (its scales change "
                  "the inputs after they were observed); set algo.pre=null or algo.hessian_inputs=raw")
        check(self.blocksize >= 1, f"algo.blocksize={self.blocksize} must be >= 1 (columns updated at once)")
        check(0.0 < self.percdamp <= 1.0,
              f"algo.percdamp={self.percdamp} must be in (0, 1] (fraction of the mean Hessian diagonal)")
        check(
            not (self.actorder and self.groupsize > 0 and not self.static_groups),
            f"algo.actorder=true with algo.groupsize={self.groupsize} needs algo.static_groups=true: "
            "dynamic groups in activation order are not contiguous in the packed layout",
        )
        check_choice("algo.a_qtype", self.a_qtype, A_QTYPES)


@dataclass
class GPTQStats:
    """What :func:`gptq_quantize` reports about one weight."""

    loss: float  # tr((W - Q) H (W - Q)^T) with the undamped H: 2 * mean_x ||x (W - Q)^T||^2
    rel_loss: float  # loss / tr(W H W^T)
    damp: float  # absolute damping added to diag(H)
    percdamp: float  # damp / mean(diag H): the fraction used after any automatic raises
    damp_raises: int  # how often the damping was raised because the factorization failed
    dead_columns: int  # inputs that were always zero (H_ii == 0): weights set to 0
    weight: torch.Tensor  # (out, in) float32: the GPTQ weight, == dequantize(codes, scale, zero)
    global_scale: torch.Tensor | None = None  # (1, 1) fp32 per-tensor scale of e4m3 scales
    refit_rows: int = 0  # rows whose scales the last refit changed
    refit_rounds: int = 0  # rounding + refit rounds kept (each lowered the loss)


# --- pure tensor functions ------------------------------------------------------------------


def accumulate_hessian(H: torch.Tensor | None, n: int, x: torch.Tensor,
                       left: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Fold inputs ``x (..., in)`` into the running ``H = 2/n sum x x^T`` ``(in, in)`` float32
    (``left``, same shape as ``x``: the cross moment ``2/n sum left x^T`` instead).

    ``H`` is updated in place (allocated on ``x``'s device when None); returns ``(H, n)``
    with ``n`` the number of rows (tokens) seen so far.
    """
    x = x.reshape(-1, x.shape[-1])  # (t, in)
    if H is None:
        H = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
    t = x.shape[0]
    if t == 0:
        return H, n
    x = x.to(torch.float32)
    left = x if left is None else left.reshape(x.shape).to(torch.float32)
    total = n + t
    H.mul_(n / total).addmm_(left.T, x, alpha=2.0 / total)  # (in, in)
    return H, total


def float_target_weight(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor, alpha: float = 1.0,
                        percdamp: float = 0.01, name: str = "weight") -> torch.Tensor:
    """The weight GPTQ rounds under asymmetric calibration: ``W + alpha W D (H + damp I)^-1``
    ``(out, in)`` float32 (module doc), with ``H = 2/n X_q^T X_q`` and ``D = 2/n (X_fp - X_q)^T X_q``
    and the damping GPTQ itself uses (:func:`inverse_hessian_factor`, inputs that were always
    zero count with diagonal 1 as there). ``D = 0`` (both streams equal) returns ``W``."""
    W = W.detach().float()
    if D.shape != H.shape or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"gptq {name}: float target needs H and D of shape {(W.shape[1],) * 2}, "
                         f"got {tuple(H.shape)} and {tuple(D.shape)}")
    if not bool(torch.isfinite(D).all()):
        raise ValueError(f"gptq {name}: the float/quantized input moment contains NaN or inf")
    H = H.detach().float().clone()
    H.diagonal()[H.diagonal() == 0] = 1.0
    U, _, _ = inverse_hessian_factor(H, percdamp, name)  # U^T U = (H + damp I)^-1
    return W + alpha * ((W @ D.float()) @ U.T) @ U


def inverse_hessian_factor(
    H: torch.Tensor, percdamp: float, name: str = "weight"
) -> tuple[torch.Tensor, float, int]:
    """Upper ``U`` with ``U^T U = (H + damp I)^-1``, ``damp = percdamp * mean(diag H)``.

    Factorized in float64 (cheap next to the column loop; the inverse of an ill-conditioned
    Hessian is where float32 loses accuracy). If the factorization fails (``H`` indefinite or
    numerically singular) the damping grows by ``DAMP_GROWTH``, with a warning, at most
    ``MAX_DAMP_RAISES`` times. Returns ``(U float32, damp, raises)``.

    ``U = R^-1`` where ``H + damp I = R R^T`` with ``R`` upper, and ``R = J chol(J H J) J``
    (``J`` reverses the order): one Cholesky and one triangular inverse.
    """
    n = H.shape[0]
    flipped = H.to(torch.float64).flip(0, 1)  # (in, in) J H J
    damp = percdamp * flipped.diagonal().abs().mean().item()
    eye = torch.eye(n, dtype=torch.float64, device=H.device)
    for raises in range(MAX_DAMP_RAISES + 1):
        L, info = torch.linalg.cholesky_ex(flipped + damp * eye)
        if int(info) == 0:
            U = torch.linalg.solve_triangular(L.flip(0, 1), eye, upper=True)  # (in, in)
            if bool(torch.isfinite(U).all()):
                return U.to(torch.float32), damp, raises
        if raises == MAX_DAMP_RAISES:
            break
        log.warning("gptq %s: Cholesky of the damped Hessian failed with damping %.3g; raising it to %.3g",
                    name, damp, damp * DAMP_GROWTH)
        damp *= DAMP_GROWTH
    raise RuntimeError(
        f"gptq {name}: the Hessian could not be factorized even with damping {damp:.3g} "
        f"({MAX_DAMP_RAISES} raises); check the calibration data of this layer"
    )


class _ColumnQuantizer:
    """Quantize one column ``w (out,)`` with per-row ``scale``/``zero`` ``(out,)`` on ``scheme``'s grid.

    Integer grids use :func:`quantkit.reference.round_to_int_grid` (the reference's float32
    operations on per-row parameters, so the codes are identical); float grids call the
    reference on ``(out, 1)``.
    """

    def __init__(self, scheme: QuantScheme) -> None:
        self.scheme = dataclasses.replace(scheme, granularity="per_channel", groupsize=-1, block_rows=1)
        self.block_rows = scheme.block_rows
        self.is_int = scheme.dtype.is_int

    def group_scheme(self, group: torch.Tensor) -> QuantScheme:
        """The scheme giving one scale per row (2-D blocks: per block of rows) of ``group (out, <=g)``."""
        if self.block_rows == 1:
            return self.scheme
        return dataclasses.replace(self.scheme, granularity="per_group", groupsize=group.shape[1],
                                   block_rows=self.block_rows)

    def rows(self, p: torch.Tensor, rows: int) -> torch.Tensor:
        """One value per weight row of per-row-block values ``p (ceil(rows / R),)``."""
        return p if self.block_rows == 1 else p.repeat_interleave(self.block_rows)[:rows]

    def __call__(
        self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, values)``: codes as float32 (int grids) or uint8 (float grids), values float32."""
        if not self.is_int:
            codes = quantize(w[:, None], scale[:, None], None, self.scheme)  # (out, 1) uint8
            return codes[:, 0], dequantize(codes, scale[:, None], None, self.scheme)[:, 0]
        return round_to_int_grid(w, scale, zero, self.scheme)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    scheme: QuantScheme,
    blocksize: int = 128,
    percdamp: float = 0.01,
    actorder: bool = False,
    static_groups: bool = True,
    name: str = "weight",
    mse: MSERange | None = None,
    refit: int = 0,
    qparams: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, GPTQStats]:
    """GPTQ-quantize ``W (out, in)`` given the Hessian ``H (in, in)`` of its inputs.

    Returns ``codes (out, in)`` (int8/uint8 as :func:`quantkit.reference.quantize`, in the
    original column order), ``scale`` (storage-rounded float32) and ``zero`` (int32 or None)
    of ``scheme.scale_shape(out, in)``, and :class:`GPTQStats` (with the per-tensor scale of
    e4m3 scale formats, which ``scale`` was computed with). ``static_groups`` only acts
    with ``actorder``; ``actorder`` with ``per_group`` requires it. ``name`` labels log lines.
    ``mse``: every scale from the range search of :class:`~quantkit.quant_linear.MSERange`
    (of the group's current, error-updated weights where groups are dynamic) instead of min/max.
    ``refit`` rounds (free-valued scale formats only): after the rounding, :func:`refit_scales`
    moves every row's scales to the minimum of the damped objective for the codes found; each
    further round runs GPTQ again on the refit scales (fixed, as static groups) and refits, and is
    kept only while the loss falls. ``qparams``: ``(scale, zero)`` to round with instead of
    computing them (storage-rounded, ``scheme.scale_shape``).
    """
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"gptq {name}: Hessian shape {tuple(H.shape)} does not match weight {tuple(W.shape)}")
    if blocksize < 1 or not 0.0 < percdamp <= 1.0:
        raise ValueError(f"gptq {name}: need blocksize >= 1 and percdamp in (0, 1], got {blocksize}, {percdamp}")
    per_group = scheme.granularity == "per_group"
    if per_group and scheme.groupsize > cols:
        raise ValueError(f"gptq {name}: groupsize={scheme.groupsize} is larger than the input dimension {cols}")
    if actorder and per_group and not static_groups:
        raise ValueError(f"gptq {name}: actorder with per_group needs static_groups (contiguous group layout)")
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"gptq {name}: the Hessian contains NaN or inf (non-finite calibration inputs?)")
    if refit < 0:
        raise ValueError(f"gptq {name}: refit={refit} must be >= 0")
    if refit:
        check_refit_scheme(scheme, f"gptq {name}: refit")
    W_in, H_in = W.detach().float(), H.detach().float()
    W, H = W_in.clone(), H_in.clone()  # (out, in), (in, in)
    dead = H.diagonal() == 0  # inputs that were always zero: any weight is as good, take 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0

    W_fit, H_fit = (W.clone(), H.clone()) if refit else (None, None)  # the objective, original order
    dynamic = per_group and not actorder and qparams is None  # group params from the error-updated weights
    g = scheme.group_cols(cols)
    col_quant = _ColumnQuantizer(scheme)
    glob = global_scale(W, scheme)  # e4m3 scales: fixed before any column changes
    if dynamic:
        shape = scheme.scale_shape(rows, cols)
        scale = torch.ones(shape, dtype=torch.float32, device=W.device)
        zero = torch.zeros(shape, dtype=torch.int32, device=W.device) if scheme.has_zero else None
    else:  # per channel/tensor, or static groups: fixed up front from the original order
        scale, zero = qparams if qparams is not None else weight_qparams(W, scheme, glob, mse)
        col_scale = expand_to_cols(scale, rows, cols, scheme)  # (out, in) view
        col_zero = expand_to_cols(zero, rows, cols, scheme).float() if zero is not None else None

    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if actorder else None  # (in,)
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
        if not dynamic:
            col_scale = col_scale[:, perm]
            col_zero = col_zero[:, perm] if col_zero is not None else None

    U, damp, raises = inverse_hessian_factor(H, percdamp, name)  # (in, in) upper
    del H
    Q = torch.empty_like(W)  # (out, in) dequantized, processing order
    codes = torch.empty(rows, cols, dtype=torch.float32 if scheme.dtype.is_int else torch.uint8, device=W.device)
    s = z = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()  # (out, b)
        Err1 = torch.zeros_like(W1)  # (out, b) scaled errors, pending for columns >= i2
        U1 = U[i1:i2, i1:i2]  # (b, b)
        with _serial(W.device):  # tiny per-column ops: threads only add sync overhead
            for i in range(i2 - i1):
                j = i1 + i
                if dynamic:
                    if j % g == 0:
                        group = _current_group(W, W1, Err1, U, i1, i, j, g)  # (out, <=g)
                        gs, gz = weight_qparams(group, col_quant.group_scheme(group), glob, mse)  # (out|RB, 1)
                        scale[:, j // g] = gs[:, 0]
                        s = col_quant.rows(gs[:, 0], rows)  # (out,)
                        if zero is not None:
                            zero[:, j // g], z = gz[:, 0], gz[:, 0].float()
                else:
                    s = col_scale[:, j]
                    z = col_zero[:, j] if col_zero is not None else None
                w = W1[:, i]  # (out,)
                codes[:, j], Q[:, j] = col_quant(w, s, z)
                err = (w - Q[:, j]) / U1[i, i]  # (out,)
                W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)  # OBS update inside the block
                Err1[:, i] = err
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)  # lazy update of the later columns

    if perm is not None:
        inv = torch.argsort(perm)
        Q, codes = Q[:, inv], codes[:, inv]
    if scheme.dtype.is_int:
        codes = codes.to(torch.int8 if scheme.qmin < 0 else torch.uint8)
    refit_rows = 0
    if refit:  # the damped objective GPTQ minimised, for the codes it chose
        H_fit.diagonal().add_(damp)
        scale, refit_rows = refit_scales(W_fit, H_fit, codes, scale, zero, scheme)
        Q = dequantize(codes, scale, zero, scheme)
        del W_fit, H_fit
    E = W_in - Q  # (out, in)
    loss = float((E @ H_in * E).sum())
    energy = float((W_in @ H_in * W_in).sum())  # tr(W H W^T)
    stats = GPTQStats(loss, loss / energy if energy > 0 else 0.0, damp, percdamp * DAMP_GROWTH**raises,
                      raises, int(dead.sum()), Q, glob, refit_rows, int(refit > 0))
    result = codes, scale, zero, stats
    for _ in range(refit - 1):  # round again with the refit scales, while that lowers the loss
        again = gptq_quantize(W_in, H_in, scheme, blocksize, percdamp, actorder, static_groups, name, mse,
                              refit=1, qparams=(result[1], result[2]))
        if not again[3].loss < result[3].loss:
            break
        again[3].refit_rounds = result[3].refit_rounds + 1
        result = again
    return result


REFIT_CHUNK_ELEMENTS = 2**24  # refit_scales: rows per chunk so its (rows, in, groups) product stays ~64 MiB
REFIT_SCALE_FORMATS = ("float16", "float32")  # free-valued scales (e8m0 / e4m3 are fixed by their rule)


def check_refit_scheme(scheme: QuantScheme, label: str = "algo.refit_scales") -> None:
    """Refuse a scheme whose scales :func:`refit_scales` cannot move (ValueError naming it)."""
    if (scheme.scale_format not in REFIT_SCALE_FORMATS or scheme.block_rows != 1
            or scheme.granularity not in ("per_channel", "per_group")):
        raise ValueError(f"{label} refits free-valued scales of one row each (per_channel or per_group, "
                         f"{' or '.join(REFIT_SCALE_FORMATS)} scale format, one row per block); "
                         f"{scheme.describe()} is {scheme.granularity} with {scheme.scale_format} scales "
                         f"and {scheme.block_rows}-row blocks")


def refit_scales(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor | None, scheme: QuantScheme) -> tuple[torch.Tensor, int]:
    """The per-group scales that minimise GPTQ's objective for fixed codes (zeros stay).

    With the codes fixed, a row's dequantized weight ``sum_g s_g u_g`` (``u_g``: the group's
    values at unit scale, ``q - z`` or the float grid's ``value(q)``, zero outside group ``g``)
    is linear in its scales, so ``(w - sum_g s_g u_g)^T H (w - sum_g s_g u_g)`` has its minimum
    at the solution of ``M s = b``, ``M_gh = u_g^T H u_h`` and ``b_g = u_g^T H w`` (one small
    system per row, groups coupled through ``H``). This is the scalar version of GPTVQ's
    codebook update after GPTQ's rounding. The solution is rounded to the storage format and a
    row keeps its old scales unless the rounded ones lower its error, so no row gets worse.

    ``W (out, in)`` and ``H (in, in)``: the weight and the (damped) Hessian GPTQ used; ``codes``,
    ``scale``, ``zero``: its result. Returns ``(scale, rows changed)``; ``scale`` storage-rounded.
    """
    check_refit_scheme(scheme, "refit_scales")
    rows, cols = W.shape
    g = scheme.group_cols(cols)
    G = scheme.num_groups(cols)
    pad = G * g - cols  # a shorter last group: zero columns that no scale reaches
    unit = dequantize(codes, torch.ones_like(scale), zero, scheme)  # (out, in) values at scale 1
    W, H = W.float(), H.float()
    out = scale.clone()
    changed = 0
    chunk = max(1, REFIT_CHUNK_ELEMENTS // (cols * G))
    Hg = torch.nn.functional.pad(H, (0, pad)).reshape(cols, G, g)  # (in, G, g): H's columns by group
    for r0 in range(0, rows, chunk):
        r1 = min(r0 + chunk, rows)
        u = torch.nn.functional.pad(unit[r0:r1], (0, pad)).reshape(r1 - r0, G, g)  # (r, G, g)
        Hu = torch.einsum("khb,rhb->rkh", Hg, u)  # (r, in, G): H u_h for every group h
        Hu = torch.nn.functional.pad(Hu, (0, 0, 0, pad)).reshape(r1 - r0, G, g, G)
        M = torch.einsum("rga,rgah->rgh", u, Hu)  # (r, G, G)
        b = torch.einsum("rga,rga->rg", u, torch.nn.functional.pad(W[r0:r1] @ H, (0, pad)).reshape(-1, G, g))
        s0 = scale[r0:r1].float()  # (r, G)
        empty = u.abs().sum(-1) == 0  # groups whose codes all sit at zero: any scale is as good
        pin = empty[:, :, None] | empty[:, None, :]  # their rows and columns of M become the
        M = torch.where(pin, torch.eye(G, device=M.device).expand_as(M), M)  # identity's, with b = s0
        b = torch.where(empty, s0, b)
        s = torch.linalg.solve(M.double(), b.double()[..., None])[..., 0].float()  # (r, G)
        s = storage_scale(torch.where(torch.isfinite(s) & (s > 0), s, s0), scheme)
        def err(sc: torch.Tensor) -> torch.Tensor:  # (r,) the row's objective with scales sc
            e = W[r0:r1] - (u * sc[..., None]).reshape(r1 - r0, -1)[:, :cols]
            return (e @ H * e).sum(-1)
        better = err(s) < err(s0)  # (r,)
        out[r0:r1] = torch.where(better[:, None], s, s0)
        changed += int(better.sum())
    return out, changed


@contextmanager
def _serial(device: torch.device) -> Iterator[None]:
    """Run CPU work single-threaded: per-column ops on a few thousand elements are slower with
    an OpenMP team, badly so on a shared machine (a busy core stalls every barrier)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _current_group(W: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, U: torch.Tensor,
                   i1: int, i: int, j: int, g: int) -> torch.Tensor:
    """Columns ``j .. j+g-1`` as they are now: the block's eagerly updated part, and the part
    after the block with the updates this block has not yet applied lazily."""
    i2 = i1 + W1.shape[1]
    inside = W1[:, i:i + g]  # (out, <=g)
    end = min(j + g, W.shape[1])
    if end <= i2:
        return inside
    after = W[:, i2:end] - Err1 @ U[i1:i2, i2:end]  # (out, end - i2)
    return torch.cat([inside, after], dim=1)


# --- orchestration ---------------------------------------------------------------------------


class HessianObserver(Observer):
    """Accumulates ``H = 2/n X^T X`` of one linear's inputs (and, for static activation
    scales, their range: the composite of a Hessian and an :class:`ActRangeObserver`)."""

    def __init__(self, name: str, act_range: ActRangeObserver | None = None, float_target: bool = False,
                 act_quant: QuantScheme | None = None) -> None:
        self.name = name
        self.act_quant = act_quant  # hessian_inputs=quantized: the linear's dynamic activation scheme
        self.H: torch.Tensor | None = None  # (in, in) float32
        self.n = 0
        self.act_range = act_range
        self.float_target = float_target  # also collect D from the full-precision inputs (stash_float)
        self.D: torch.Tensor | None = None  # (in, in) float32: 2/n sum (x_fp - x)^T x
        self._fp: torch.Tensor | None = None  # the full-precision inputs of the batch update() gets next

    def stash_float(self, x: torch.Tensor) -> None:
        """The full-precision model's inputs of this linear for the batch :meth:`update` gets next
        (the same tokens)."""
        if self._fp is not None:
            raise RuntimeError(f"gptq {self.name}: full-precision inputs of a batch were never paired "
                               "with the quantized model's inputs")
        self._check_finite(x, "full-precision calibration inputs")
        self._fp = x

    def _check_finite(self, x: torch.Tensor, what: str) -> None:
        if not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"gptq {self.name}: {what} contain NaN or inf (batch after {self.n} tokens); "
                "the model produces non-finite activations on the calibration data"
            )

    def update(self, x: torch.Tensor) -> None:
        self._check_finite(x, "calibration inputs")
        if self.act_quant is not None:
            x = ops.fake_quantize(x, self.act_quant, check_finite=False)
        if self.float_target:
            fp, self._fp = self._fp, None
            if fp is None or fp.numel() != x.numel():
                raise RuntimeError(f"gptq {self.name}: no full-precision inputs of the same tokens came with this "
                                   "batch (algo.float_target needs the pipeline's full-precision stream)")
            x32 = x.to(torch.float32)
            self.D, _ = accumulate_hessian(self.D, self.n, x32, left=fp.to(torch.float32).reshape(x32.shape) - x32)
        self.H, self.n = accumulate_hessian(self.H, self.n, x)
        if self.act_range is not None:
            self.act_range.update(x)


class PreHessianObserver(HessianObserver):
    """A :class:`HessianObserver` that also feeds a pre-algorithm's statistics (``stats``:
    an ``AWQObserver`` or a ``ChannelRangeObserver``, whose per-channel range also gives the
    static activation scale when ``static``); :meth:`rescale` turns every statistic into that
    of the folded inputs ``x / s``."""

    def __init__(self, name: str, stats: ChannelRangeObserver, static: bool, float_target: bool = False) -> None:
        super().__init__(name, stats if static else None, float_target)
        self.stats = stats

    def update(self, x: torch.Tensor) -> None:
        super().update(x)  # feeds the stats too when they are the activation range
        if self.act_range is None:
            self.stats.update(x)

    def rescale(self, s: torch.Tensor) -> None:
        inv = 1.0 / s.to(self.H.device, torch.float32)  # (in,)
        self.H = self.H * inv[:, None] * inv[None, :]  # (in, in) diag(1/s) H diag(1/s); H is an inference tensor
        if self.D is not None:  # both streams are read as x / s too
            self.D = self.D * inv[:, None] * inv[None, :]
        self.stats.rescale(s)


@register("gptq", GPTQConfig)
class GPTQ(Algorithm):
    def __init__(self, config: GPTQConfig, w_dtype: DTypeConfig, a_dtype: DTypeConfig) -> None:
        super().__init__(config, w_dtype, a_dtype)
        self.w_scheme, self.a_scheme, self.o_scheme = self.build_schemes(config, w_dtype, a_dtype)
        check(
            self.w_scheme is not None or self.a_scheme is None,
            "algo=gptq quantizes weights; w_dtype=float16 with a quantized a_dtype is activation-only: use algo=rtn",
        )
        check(config.pre != "smoothquant" or self.a_scheme is not None,
              "algo.pre=smoothquant migrates activation outliers into the weights for quantized activations; "
              f"a_dtype={a_dtype.name} is not quantized: set a_dtype (e.g. int8) or use algo.pre=awq or null")
        check(config.hessian_inputs == "raw" or self.a_scheme is not None,
              f"algo.hessian_inputs=quantized observes the inputs after the activation quantization; a_dtype="
              f"{a_dtype.name} is not quantized: set a_dtype (e.g. int4) or algo.hessian_inputs=raw")
        if config.pre is not None and config.layer_sequential:
            # a warning where it was measured to cost (SmoothQuant+GPTQ W8A8); AWQ+GPTQ int4 is better
            # this way on SmolLM2 (benchmarks/DEFAULTS_STUDY.md), so its preset keeps it and is told only
            log.log(logging.WARNING if config.pre == "smoothquant" else logging.INFO,
                    "algo.pre=%s with algo.layer_sequential=true: a group whose input comes from a linear "
                    "(o_proj <- v_proj, down_proj <- up_proj) is reached after that linear is quantized, so "
                    "its scales cannot be folded and it stays untransformed; algo.layer_sequential=false "
                    "transforms every group", config.pre)
        self._seen: Counter[str] = Counter()  # quantize calls per linear name: the block index in logs

    def build_schemes(self, config: Any, w_dtype: DTypeConfig, a_dtype: DTypeConfig
                      ) -> tuple[QuantScheme | None, QuantScheme | None, QuantScheme | None]:
        qtype = "per_group" if config.groupsize > 0 else "per_channel"
        w_scheme = weight_scheme(w_dtype, qtype, config.groupsize, default_granularity(config))
        if config.refit_scales > 0 and w_scheme is not None:  # here, so a layers rule's dtype is checked too
            try:
                check_refit_scheme(w_scheme)
            except ValueError as e:
                raise ConfigError(f"{e}; set algo.refit_scales=0 for w_dtype={w_dtype.name}") from None
        return w_scheme, activation_scheme(a_dtype, config.a_qtype), None

    def calibrates(self, scheme: LayerScheme) -> bool:
        return scheme.w is not None

    def folds(self, scheme: LayerScheme) -> bool:
        return self.config.pre is not None and scheme.w is not None

    def make_observer(self, name: str, linear: nn.Linear, scheme: LayerScheme | None = None) -> Observer | None:
        scheme = scheme or self.run_scheme
        paired = self.float_target > 0
        if self.config.pre is None:
            act_quant = scheme.a if self.config.hessian_inputs == "quantized" and not scheme.a_static else None
            return HessianObserver(name, ActRangeObserver(scheme.a) if scheme.a_static else None, paired, act_quant)
        act = scheme.a if scheme.a_static else None  # the stats' range gives static activation scales
        stats = AWQObserver(AWQConfig().max_tokens, act) if self.config.pre == "awq" else ChannelRangeObserver(act)
        return PreHessianObserver(name, stats, scheme.a_static, paired)

    def prepare_group(
        self, linears: dict[str, nn.Linear], observers: dict[str, Observer], prev: FoldTarget | None,
        schemes: Mapping[str, LayerScheme] | None = None,
    ) -> None:
        """``pre``: search and fold the pre-algorithm's scales, and rescale the group's Hessian
        (``pre=awq`` with mixed weight schemes: the scales that minimise the group's summed
        error, each linear on its own grid; see :func:`~quantkit.algorithms.awq.search_scales`)."""
        if self.config.pre is None or not linears:
            return
        obs = observers[next(iter(linears))]  # one observer per group: the linears share the input
        st = obs.stats
        if self.config.pre == "smoothquant":
            alpha = DEFAULT_ALPHA if self.config.alpha is None else self.config.alpha
            s = search_and_fold(prev, linears, lambda w, _: smooth_scales(
                share(prev, st.absmax), share(prev, w.abs().amax(0)), alpha),
                                "gptq+smoothquant")
        else:
            grids = [self._scheme(schemes, n).w for n in linears]
            s = search_and_fold(prev, linears, lambda w, splits: search_scales(
                w, st.rows, share(prev, st.mean_abs, "mean"), grids, AWQConfig().n_grid, splits), "gptq+awq")
        if s is not None:
            obs.rescale(s)

    def quantize_group(
        self, linears: dict[str, nn.Linear], observers: dict[str, Observer], prev: FoldTarget | None,
        schemes: Mapping[str, LayerScheme] | None = None,
    ) -> dict[str, nn.Module]:
        out = {name: self._quantize_linear(name, linear, observers.get(name), self._scheme(schemes, name))
               for name, linear in linears.items()}
        for name in linears:  # free the (in, in) Hessian (and D) the group's linears shared
            if isinstance(observers.get(name), HessianObserver):
                observers[name].H = observers[name].D = None
        return out

    def _quantize_linear(self, name: str, linear: nn.Linear, observer: Observer | None,
                         layer: LayerScheme) -> QuantLinear:
        label = f"{name}[{self._seen[name]}]"  # [k]: k-th block (blocks where it is skipped shift k)
        self._seen[name] += 1
        if not isinstance(observer, HessianObserver) or observer.H is None:
            raise RuntimeError(f"gptq {label}: no calibration inputs reached this layer")
        scheme, cfg = layer.w, self.config
        if scheme.granularity == "per_group" and scheme.groupsize > linear.in_features:
            raise ConfigError(f"algo.groupsize={scheme.groupsize} is larger than the input dim "
                              f"{linear.in_features} of {label}")
        t0 = time.perf_counter()
        target, shift = linear.weight, ""
        if cfg.float_target > 0:
            if observer.D is None:
                raise RuntimeError(f"gptq {label}: algo.float_target is set but no full-precision inputs were paired")
            target = float_target_weight(linear.weight, observer.H, observer.D, cfg.float_target, cfg.percdamp, label)
            change = (target - linear.weight.float()).norm() / linear.weight.float().norm().clamp_min(1e-30)
            shift = f", float target moved the weight by {change.item():.3g} (relative)"
        codes, scale, zero, stats = gptq_quantize(
            target, observer.H, scheme, cfg.blocksize, cfg.percdamp, cfg.actorder, cfg.static_groups, label,
            mse_range(cfg), cfg.refit_scales,
        )
        weight = linear.weight
        module = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, scheme,
                             layer.a, a_static=layer.a_static, device=weight.device)
        module.set_weight(codes, scale, zero, stats.global_scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        if layer.a_static:
            act_scale, act_zero = observer.act_range.qparams(layer.a)
            module.act_scale.copy_(act_scale.reshape(1, 1))
            if act_zero is not None:
                module.act_zero.copy_(act_zero.reshape(1, 1))
        refit = (f", {stats.refit_rounds} scale refit round(s), the last changing {stats.refit_rows}/"
                 f"{linear.out_features} rows" if cfg.refit_scales else "")
        log.info("gptq %s: error %.4g (relative %.3g), damping %.3g (percdamp %.3g)%s%s, %.2f s", label, stats.loss,
                 stats.rel_loss, stats.damp, stats.percdamp, refit, shift, time.perf_counter() - t0)
        return module
