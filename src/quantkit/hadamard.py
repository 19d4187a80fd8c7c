"""Hadamard matrices of every order a model needs, and the fast Walsh-Hadamard transform.

A Hadamard matrix ``A (K, K)`` has entries +-1 and ``A A^T = K I``; ``A / sqrt(K)`` is
orthogonal. Orders are 1, 2 and multiples of 4. Constructions (each checked by
``tests/test_hadamard.py``: ``A A^T = K I``):

* Sylvester: ``H_1 = [1]``, ``H_2m = [[H_m, H_m], [H_m, -H_m]]`` (powers of two; symmetric);
* Paley I: ``K = q + 1`` for a prime ``q = 3 (mod 4)`` (12, 20, 44, 60, 68, 84, 108, ...);
* Paley II: ``K = 2 (q + 1)`` for a prime ``q = 1 (mod 4)`` (28, 36, 76, 124, 148, ...);
* Williamson: ``K = 4 m`` from four symmetric circulant +-1 matrices ``A, B, C, D`` of order
  ``m`` with ``A^2 + B^2 + C^2 + D^2 = 4 m I``, in the array
  ``[[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]``; first rows for
  ``m = 23, 29, 39, 43`` (92, 116, 156, 172: Llama-2's 11008 = 172 x 64) are the blocks of
  the matrices of N. J. A. Sloane's library of Hadamard matrices (as shipped by SpinQuant and
  compressed-tensors).

A width ``n`` is factored as ``n = K * P`` with ``P`` a power of two (:func:`factor`: the
smallest constructible ``K``, and ``P <= MAX_CHUNK``), and ``H_n = (A_K kron H_P) / sqrt(n)``.
For a row vector ``x`` viewed as ``X (K, P)`` (``x[k * P + p] = X[k, p]``)::

    x H_n = vec(A_K^T X H_P) / sqrt(n)

computed in two steps: the *chunk mix* ``A_K^T X`` (a small matmul, torch), then the fast
Walsh-Hadamard transform of every length-``P`` chunk (``log2 P`` butterfly stages: stage
``h = 1, 2, 4, ..., P/2`` replaces each pair ``(a, b) = (y[i], y[i + h])`` with ``i & h == 0``
by ``(a + b, a - b)``) and the scale ``1 / sqrt(n)``. :func:`hadamard_transform_reference`
defines the float32 arithmetic (float64 for float64 inputs) bit for bit;
:mod:`quantkit.kernels.hadamard` is its Triton twin (the chunk mix stays in torch, shared).

:class:`OnlineHadamard` is the module a rotated model applies to a linear's input at run time
(QuaRot's online Hadamard on ``down_proj``), :class:`HadamardLinear` a float ``nn.Linear``
with one (:class:`~quantkit.quant_linear.QuantLinear` has its own, ``online_hadamard=True``).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from quantkit.scheme import QuantScheme

MAX_CHUNK = 1 << 14  # longest power-of-two chunk transformed from registers; larger powers go to the mix
MAX_ORDER = 1024  # largest non-power-of-two factor K searched

# Williamson first rows (m -> A, B, C, D; "+" = 1, "-" = -1), from Sloane's library (see module doc)
_WILLIAMSON = {
    23: ("+++-+++-+------+-+++-++", "+++---++-+-++-+-++---++",
         "+-++-++--++++++--++-++-", "++---+---+-++-+---+---+"),
    29: ("++--+--+-+++-++++-+++-+--+--+", "++++-++-+---++++++---+-++-+++",
         "+-+---++--+-++++++-+--++---+-", "+++---++--+-+----+-+--++---++"),
    39: ("+++--+-+-----+--++----++--+-----+-+--++", "++++---+--++----+-+--+-+----++--+---+++",
         "+++--++-+---+-+--+----+--+-+---+-++--++", "+---++-+-+-----+++-++-+++-----+-+-++---"),
    43: ("+---++--++++-+-+++-++--++-+++-+-++++--++---", "++-++++++----+-+--++-++-++--+-+----++++++-+",
         "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++", "++---++++-+--+--++--------++--+--+-++++---+"),
}


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def sylvester(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order ``n`` (a power of two), float64 +-1."""
    if not is_power_of_two(n):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)`` with the quadratic character ``chi`` of the prime field ``q``."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if r in squares else -1.0 for r in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q  # (q, q): j - i
    return chi[idx]


def paley1(q: int) -> torch.Tensor:
    """Order ``q + 1`` for a prime ``q = 3 (mod 4)``: ``I + S`` with the skew conference matrix
    ``S = [[0, 1^T], [-1, Q]]``."""
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley I needs a prime q = 3 (mod 4), got {q}")
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def paley2(q: int) -> torch.Tensor:
    """Order ``2 (q + 1)`` for a prime ``q = 1 (mod 4)``: the symmetric conference matrix
    ``C = [[0, 1^T], [1, Q]]`` with ``0 -> [[1, -1], [-1, -1]]`` and ``+-1 -> +-[[1, 1], [1, -1]]``."""
    if not (_is_prime(q) and q % 4 == 1):
        raise ValueError(f"Paley II needs a prime q = 1 (mod 4), got {q}")
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, one) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)


def _circulant(row: str) -> torch.Tensor:
    first = torch.tensor([1.0 if c == "+" else -1.0 for c in row], dtype=torch.float64)
    m = first.shape[0]
    return first[(torch.arange(m)[None, :] - torch.arange(m)[:, None]) % m]  # row r = first rolled by r


def williamson(m: int) -> torch.Tensor:
    """Order ``4 m`` from the stored Williamson first rows (``m`` in 23, 29, 39, 43)."""
    if m not in _WILLIAMSON:
        raise ValueError(f"no Williamson matrices of order {m} stored; have {sorted(_WILLIAMSON)}")
    a, b, c, d = (_circulant(r) for r in _WILLIAMSON[m])
    return torch.cat([torch.cat(row, 1) for row in ((a, b, c, d), (-b, a, -d, c), (-c, d, a, -b), (-d, -c, b, a))], 0)


@functools.lru_cache(maxsize=None)
def _construction(k: int) -> str | None:
    """Which construction gives order ``k`` (None: none here)."""
    if is_power_of_two(k):
        return "sylvester"
    if k % 4:
        return None
    if _is_prime(k - 1) and (k - 1) % 4 == 3:
        return "paley1"
    if _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return "paley2"
    if k // 4 in _WILLIAMSON:
        return "williamson"
    if _construction(k // 2) is not None:
        return "double"
    return None


def small_hadamard(k: int) -> torch.Tensor:
    """A Hadamard matrix of order ``k`` (+-1, float64); ValueError where none is constructed here."""
    kind = _construction(k)
    if kind is None:
        raise ValueError(f"no Hadamard matrix of order {k} is constructed here (Sylvester, Paley I/II with a "
                         f"prime q, Williamson for {', '.join(str(4 * m) for m in sorted(_WILLIAMSON))})")
    if kind == "sylvester":
        return sylvester(k)
    if kind == "paley1":
        return paley1(k - 1)
    if kind == "paley2":
        return paley2(k // 2 - 1)
    if kind == "williamson":
        return williamson(k // 4)
    return torch.kron(sylvester(2), small_hadamard(k // 2))


def factor(n: int, max_chunk: int = MAX_CHUNK) -> tuple[int, int]:
    """``(K, P)`` with ``n = K * P``, ``P`` a power of two ``<= max_chunk`` and the smallest ``K``
    that has a Hadamard matrix here; ValueError naming ``n`` where there is none."""
    if n < 1:
        raise ValueError(f"a Hadamard transform needs a positive width, got {n}")
    twos = (n & -n).bit_length() - 1  # n = odd * 2**twos
    odd = n >> twos
    for j in range(0 if odd == 1 else 2, twos + 1):  # K = odd * 2**j, smallest first
        k = odd << j
        if n // k <= max_chunk and k <= max(MAX_ORDER, n // max_chunk) and _construction(k) is not None:
            return k, n // k
    raise ValueError(
        f"no Hadamard matrix of order {n} is available: {n} = {odd} x 2^{twos} needs one of order "
        f"{odd} x 2^j (j >= 2); constructed here are Sylvester (2^j), Paley I/II (q + 1, 2 (q + 1) "
        "for a prime q) and Williamson (92, 116, 156, 172) orders and their doublings")


def chunk_matrix(n: int, max_chunk: int = MAX_CHUNK) -> torch.Tensor:
    """The +-1 chunk-mix matrix ``A_K (K, K)`` int8 of width ``n`` (``[[1]]`` when ``n`` is a power
    of two up to ``max_chunk``: no mix)."""
    k, _ = factor(n, max_chunk)
    return small_hadamard(k).to(torch.int8)


def hadamard_matrix(n: int, max_chunk: int = MAX_CHUNK, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthogonal ``H_n = (A_K kron H_P) / sqrt(n)`` that :func:`hadamard_transform` multiplies by."""
    k, p = factor(n, max_chunk)
    return (torch.kron(small_hadamard(k), sylvester(p)) / math.sqrt(n)).to(dtype)


# ---- the transform: torch reference and dispatch -------------------------------------------------

def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def mix_chunks(x: torch.Tensor, had_k: torch.Tensor | None) -> torch.Tensor:
    """``A_K^T X`` for every row of ``x (rows, K * P)`` viewed as ``X (K, P)``, in the compute dtype
    (float32; float64 for float64 ``x``). Shared by the torch and Triton paths."""
    dtype = _compute_dtype(x)
    if had_k is None or had_k.shape[0] == 1:
        return x.to(dtype)
    k = had_k.shape[0]
    rows, n = x.shape
    columns = x.to(dtype).reshape(rows, k, n // k).transpose(1, 2).reshape(-1, k)  # (rows * P, K)
    mixed = columns @ had_k.to(dtype)  # (rows * P, K): one GEMM, y[j] = sum_k X[k, p] A[k, j]
    return mixed.reshape(rows, n // k, k).transpose(1, 2).reshape(rows, n)  # (rows, K * P)


def fwht_reference(y: torch.Tensor, chunk: int) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform of every length-``chunk`` piece of ``y (rows, n)``
    (butterfly stages ``h = 1, 2, ..., chunk / 2``, in ``y``'s dtype)."""
    rows, n = y.shape
    y, out = y.contiguous().clone(), torch.empty_like(y)  # ping-pong buffers
    h = 1
    while h < chunk:
        src = y.view(rows, n // (2 * h), 2, h)  # (rows, pairs, 2, h)
        dst = out.view(rows, n // (2 * h), 2, h)
        torch.add(src[:, :, 0], src[:, :, 1], out=dst[:, :, 0])
        torch.sub(src[:, :, 0], src[:, :, 1], out=dst[:, :, 1])
        y, out = out, y
        h *= 2
    return y


def _check(x: torch.Tensor, had_k: torch.Tensor | None) -> tuple[int, int]:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
        raise TypeError(f"x must be a floating-point tensor (..., n), got {getattr(x, 'dtype', type(x))}")
    n = x.shape[-1]
    k = 1 if had_k is None else had_k.shape[0]
    if had_k is not None and (had_k.dim() != 2 or had_k.shape[1] != k):
        raise ValueError(f"had_k must be a square (K, K) matrix, got {tuple(had_k.shape)}")
    if n % k or not is_power_of_two(n // k):
        raise ValueError(f"width {n} is not K x 2^j for the chunk matrix of order K={k}")
    return k, n // k


def norm_scale(n: int) -> float:
    """``1 / sqrt(n)`` as the float32 both paths multiply by."""
    return float(torch.tensor(1.0 / math.sqrt(n), dtype=torch.float32))


def hadamard_transform_reference(x: torch.Tensor, had_k: torch.Tensor | None,
                                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x (..., n) @ H_n`` (see the module doc), computed in float32 (float64 for float64 ``x``),
    returned in ``out_dtype`` (default ``x.dtype``)."""
    _, chunk = _check(x, had_k)
    rows = x.reshape(-1, x.shape[-1])  # (rows, n)
    y = fwht_reference(mix_chunks(rows, had_k), chunk)
    scale = torch.tensor(norm_scale(x.shape[-1]) if y.dtype == torch.float32 else 1 / math.sqrt(x.shape[-1]),
                         dtype=y.dtype, device=y.device)
    return (y * scale).to(out_dtype or x.dtype).reshape(x.shape)


def hadamard_transform(x: torch.Tensor, had_k: torch.Tensor | None, backend: str = "auto") -> torch.Tensor:
    """``x (..., n) @ H_n`` in ``x.dtype``: the Triton kernel on CUDA (or ``backend="triton"``),
    the torch reference elsewhere; both compute the same float32 values bit for bit."""
    from quantkit.ops import use_triton

    _check(x, had_k)
    if x.dtype != torch.float64 and use_triton(x, backend):
        from quantkit.kernels.hadamard import hadamard_transform as triton_hadamard

        rows = x.reshape(-1, x.shape[-1])
        return triton_hadamard(rows, had_k).reshape(x.shape)
    return hadamard_transform_reference(x, had_k)


def hadamard_quantize_reference(x: torch.Tensor, had_k: torch.Tensor | None, scheme: QuantScheme
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``quantize_tensor(x @ H_n, scheme)`` on ``x (rows, n)`` with one scale per row, the
    transform kept in float32 (never rounded to ``x.dtype`` in between)."""
    from quantkit.reference import quantize_tensor

    _check_per_row(scheme)
    return quantize_tensor(hadamard_transform_reference(x, had_k, torch.float32), scheme)


def hadamard_quantize(x: torch.Tensor, had_k: torch.Tensor | None, scheme: QuantScheme, backend: str = "auto"
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Transform and quantize per token in one pass: ``(codes (rows, n), scale (rows, 1) float32,
    zero (rows, 1) int32 | None)``, bit-exact with :func:`hadamard_quantize_reference`."""
    from quantkit.ops import use_triton

    _check(x, had_k)
    _check_per_row(scheme)
    rows = x.reshape(-1, x.shape[-1])  # (rows, n)
    if use_triton(x, backend):
        from quantkit.kernels.hadamard import hadamard_quantize as triton_hadamard_quantize

        return triton_hadamard_quantize(rows, had_k, scheme)
    return hadamard_quantize_reference(rows, had_k, scheme)


def _check_per_row(scheme: QuantScheme) -> None:
    if scheme.granularity not in ("per_token", "per_channel"):
        raise ValueError(f"the fused Hadamard quantization has one scale per row; got {scheme.describe()}")


# ---- modules -------------------------------------------------------------------------------------

class OnlineHadamard(nn.Module):
    """``x -> x @ H_n`` at run time (``n`` = the last dim). Buffer ``hadamard_k (K, K)`` int8: the
    +-1 chunk-mix matrix (``[[1]]`` when ``n`` is a power of two), saved with the model: a reader
    that does not know the transform finds a tensor it cannot place and refuses the checkpoint
    instead of silently dropping the transform."""

    def __init__(self, size: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("hadamard_k", chunk_matrix(size).to(device))
        self.backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(x, self.hadamard_k, self.backend)

    def extra_repr(self) -> str:
        k = self.hadamard_k.shape[0]
        return f"size={self.size} ({k} x {self.size // k})"

    def matrix(self) -> torch.Tensor:
        """The +-1 matrix ``A_K kron H_P (n, n)`` float32 (``H_n`` times ``sqrt(n)``)."""
        k = self.hadamard_k.shape[0]
        return torch.kron(self.hadamard_k.double().cpu(), sylvester(self.size // k)).float()


class HadamardLinear(nn.Linear):
    """A float ``nn.Linear`` reading ``x @ H_n``: ``y = (x @ H_n) W^T + b`` (a rotated layer kept in
    full precision). Observers of the calibration pipeline see the transformed input
    (:func:`transformed_input`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.input_transform = OnlineHadamard(in_features, device)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "HadamardLinear":
        """The same parameters (shared, not copied) with an online Hadamard in front."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight, module.bias = linear.weight, linear.bias
        module.input_transform = OnlineHadamard(linear.in_features, linear.weight.device)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.input_transform(x), self.weight, self.bias)


def input_transform(module: nn.Module) -> OnlineHadamard | None:
    """The online transform ``module`` applies to its input first (None: none)."""
    transform = getattr(module, "input_transform", None)
    return transform if isinstance(transform, OnlineHadamard) else None


def transformed_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``module`` multiplies by its weight for the input ``x``: ``x`` after its online
    transform (what calibration statistics must be computed on)."""
    transform = input_transform(module)
    return x if transform is None else transform(x)
