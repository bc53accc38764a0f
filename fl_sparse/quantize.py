r"""Value quantizers for sparse gradient payloads.

Both quantizers work on flat (1-D) floating tensors on any device (CPU or
CUDA), are fully vectorised (no Python loop over values) and are
deterministic: the same input on the same device always gives bit-identical
codes and reconstruction. They are split into ``encode`` (what goes on the
wire), ``decode`` (what the receiver rebuilds) and ``__call__`` (=
``decode(encode(v))``), so a sender can run error feedback against exactly
what the receiver will see.

Computation happens in float32 (inputs of another floating dtype are cast
first; non-finite values after the cast are rejected with ``ValueError``).
Internal log arithmetic and sums use float64 so that interval assignment and
means are accurate even for a dynamic range of ~1e80 (float32 subnormals to
float32 max).

Fractional quantization (SSGD-MV paper, section 4.3.2)
------------------------------------------------------
For a vector :math:`v \in \mathbb{R}^n` and a bit budget :math:`q`, let

.. math::

    v_{\max} = \max_i |v_i|, \qquad v_{\min} = \min_{i : v_i \ne 0} |v_i|,
    \qquad L = 2^{q-1}, \qquad \alpha = (v_{\max} / v_{\min})^{1/L}.

The magnitude range :math:`[v_{\min}, v_{\max}]` is cut into :math:`L`
geometric intervals

.. math::

    I_l = \left[ \frac{v_{\max}}{\alpha^{l+1}}, \frac{v_{\max}}{\alpha^{l}} \right],
    \qquad l = 0, \dots, L-1

(0-based here; the paper numbers them :math:`1..L`). Each value is sent as a
``q``-bit code: its sign bit (top bit, 1 = negative) and the index
:math:`l(v_i) = \min(L-1, \lfloor L \log(v_{\max}/|v_i|) / \log(v_{\max}/v_{\min}) \rfloor)`
of its interval (lower ``q-1`` bits). The :math:`L` interval means
:math:`\mu_l = \operatorname{mean}\{|v_i| : l(v_i) = l\}` are sent as float32
and the receiver reconstructs :math:`\hat v_i = \operatorname{sign}(v_i)\,\mu_{l(v_i)}`.
Because :math:`\mu_l` is the mean of the magnitudes it replaces,
:math:`\hat v` is the least-squares reconstruction for the chosen partition,
and, for values without an exact zero, doubling :math:`L` (``q -> q+1``)
refines the partition, so the squared error cannot grow (up to floating-point
ties on interval boundaries). With an exact zero the non-zero values share
:math:`L-1` intervals (see :class:`FractionalQuantizer`: 7 at ``q = 4``, 15 at
``q = 5``), which is no refinement, and one more bit can cost more error.

Geometric (log-spaced) intervals give a bounded *relative* error
:math:`|\hat v_i - v_i| / |v_i| \le \alpha - 1`, which suits heavy-tailed
gradient magnitudes better than uniform levels.

Scaled sign (Karimireddy et al. 2019, eq. 17 of the SSGD-MV paper)
-------------------------------------------------------------------

.. math::

    Q(v) = \frac{\lVert v \rVert_1}{d} \operatorname{sign}(v),

one bit per value plus one float32 scale. It preserves the L1 norm exactly
(up to rounding): :math:`\lVert Q(v) \rVert_1 = \lVert v \rVert_1`.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["FractionalQuantizer", "ScaledSign"]

MIN_BITS = 2
MAX_BITS = 16


def _as_finite_float32(values: torch.Tensor) -> torch.Tensor:
    """``values`` as a detached 1-D float32 tensor; ValueError on NaN/Inf.

    The check is needed because a NaN would silently poison every mean. On CPU it is
    numpy's one pass (``torch.isfinite(v).all()`` is two kernels, ~130 us at d = 50,890
    on one thread); elsewhere one host sync.
    """
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(values).__name__}")
    if values.dim() != 1:
        raise ValueError(f"expected a flat 1-D tensor, got shape {tuple(values.shape)}")
    if not values.is_floating_point():
        raise ValueError(f"expected a floating tensor, got {values.dtype}")
    v = values if values.dtype == torch.float32 and not values.requires_grad else values.detach().to(torch.float32)
    if v.device.type == "cpu":
        finite = not v.numel() or bool(np.isfinite(v.numpy()).all())
    else:
        finite = not v.numel() or bool(torch.isfinite(v).all())
    if not finite:
        raise ValueError("values contain NaN or Inf (after casting to float32)")
    return v


def _code_dtype(bits: int) -> torch.dtype:
    """Smallest integer dtype holding codes in ``[0, 2**bits)``."""
    if bits <= 8:
        return torch.uint8
    if bits <= 15:
        return torch.int16
    return torch.int32  # 16-bit codes reach 65535, beyond int16


_NUMPY_CODE_DTYPES = {torch.uint8: np.uint8, torch.int16: np.int16, torch.int32: np.int32}


def _numpy_path(device: torch.device) -> bool:
    """Whether FractionalQuantizer computes in numpy (CPU tensors; the tests also run the torch code there)."""
    return device.type == "cpu"


def _interval_means(magnitudes: torch.Tensor, interval: torch.Tensor, levels: int) -> torch.Tensor:
    """Float32 mean of ``magnitudes`` per interval index (0 for empty intervals).

    Deterministic on every device: on CPU ``index_add_`` accumulates in a fixed
    order; on CUDA ``index_add_`` uses float atomics (order varies run to run),
    so there we sort by interval and take differences of a float64 prefix
    sum instead. Sorting small-magnitude intervals first keeps the prefix sum
    at each interval's end bounded by ``n`` times the interval's own values,
    so the cancellation error is ~``n * 2**-53`` relative, far below float32
    resolution.
    """
    mags = magnitudes.to(torch.float64)
    if mags.device.type == "cpu":
        sums = torch.zeros(levels, dtype=torch.float64).index_add_(0, interval, mags)
        counts = torch.bincount(interval, minlength=levels).to(torch.float64)
    else:
        sums, counts = _interval_sums_by_sorting(mags, interval, levels)
    means = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
    return means.to(torch.float32)


def _interval_sums_by_sorting(mags: torch.Tensor, interval: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-interval (sum, count) via a stable sort and a float64 prefix sum.

    Device-agnostic and free of atomics, hence deterministic on CUDA. Larger
    interval index = smaller magnitude, so sorting by descending index puts
    small magnitudes first (see :func:`_interval_means`).
    """
    key = (levels - 1) - interval
    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    prefix = torch.cat([mags.new_zeros(1), torch.cumsum(mags[order], 0)])
    all_keys = torch.arange(levels, device=mags.device, dtype=sorted_key.dtype)
    start = torch.searchsorted(sorted_key, all_keys, right=False)
    end = torch.searchsorted(sorted_key, all_keys, right=True)
    sums_by_key = prefix[end] - prefix[start]
    counts_by_key = (end - start).to(torch.float64)
    # back from key order (key = levels-1-interval) to interval order
    return sums_by_key.flip(0), counts_by_key.flip(0)


class FractionalQuantizer:
    r"""The SSGD-MV fractional quantizer with a ``bits``-bit budget per value.

    See the module docstring for the math. ``bits`` is ``q`` in the paper,
    ``2 <= bits <= 16``; there are ``levels = L = 2**(bits-1)`` magnitude
    intervals and codes are ``sign << (bits-1) | interval``.

    Edge cases (all reconstruct without NaN/Inf):

    * **empty input** -> empty codes, ``L`` zero means.
    * **exact zeros** (``+0.0`` or ``-0.0``) have no sign and no logarithm, and
      must come back as exactly zero (a sparse vector's support may contain
      zeros). When any are present, interval ``L-1`` is reserved for them with
      ``mu_{L-1} = 0`` (code ``L-1``, sign bit 0), and the non-zero magnitudes
      are split into the remaining ``L-1`` intervals (``alpha = (v_max /
      v_min)^{1/(L-1)}``, ``v_min`` = smallest *non-zero* magnitude). With
      ``bits=2`` this makes a ternary ``{-mu, 0, +mu}`` quantizer.
    * **all zeros** -> every code is ``L-1``, all means 0.
    * **a single value, or all magnitudes equal** -> ``v_max == v_min``; every
      non-zero value goes to interval 0 and ``mu_0 = v_max``: exact
      reconstruction.
    * **empty intervals** get mean 0 (never referenced by a code).

    ``encode`` returns ``(codes, means)``: ``codes`` one integer per value in
    ``[0, 2**bits)`` as ``uint8`` (bits <= 8), ``int16`` (bits <= 15) or
    ``int32`` (bits == 16), on the input's device; ``means`` float32 of length
    ``L`` on the same device.
    """

    def __init__(self, bits: int = 4) -> None:
        if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
        self.bits = bits
        self.levels = 1 << (bits - 1)
        self.code_dtype = _code_dtype(bits)

    def __repr__(self) -> str:
        return f"FractionalQuantizer(bits={self.bits})"

    # ------------------------------------------------------------------ encode
    def encode(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize ``values`` to ``(codes, means)``; see the class docstring."""
        v = _as_finite_float32(values)
        levels = self.levels
        device = v.device
        if v.numel() == 0:
            return (torch.empty(0, dtype=self.code_dtype, device=device),
                    torch.zeros(levels, dtype=torch.float32, device=device))
        if _numpy_path(device):
            codes, means = self._encode_numpy(v.numpy())
            return torch.from_numpy(codes), torch.from_numpy(means)

        magnitude = v.abs().to(torch.float64)
        negative = v < 0  # -0.0 < 0 is False: zeros are sent with sign bit 0
        is_zero = magnitude == 0
        # One sync for three scalars; tiny compared with the work below.
        v_max, smallest_nonzero, n_zero = torch.stack([
            magnitude.max(),
            torch.where(is_zero, torch.full_like(magnitude, torch.inf), magnitude).min(),
            is_zero.sum().to(torch.float64),
        ]).tolist()

        zero_slot = levels - 1
        n_intervals = levels - 1 if n_zero > 0 else levels
        interval = torch.full(v.shape, zero_slot, dtype=torch.int64, device=device)
        if n_zero < v.numel():  # there are non-zero values to place
            log_range = _log(v_max) - _log(smallest_nonzero)
            if log_range > 0:
                # t in [0, n_intervals]: position of |v| on the log scale,
                # 0 at v_max, n_intervals at v_min; floor gives the interval.
                t = (_log(v_max) - torch.log(magnitude)) * (n_intervals / log_range)
                nonzero_interval = t.floor().clamp_(0, n_intervals - 1).to(torch.int64)
            else:  # all non-zero magnitudes equal: one interval is exact
                nonzero_interval = torch.zeros_like(interval)
            interval = torch.where(is_zero, interval, nonzero_interval)

        # With zeros present the zero slot holds only zeros, so its mean is 0.
        means = _interval_means(magnitude, interval, levels)
        codes = (negative.to(torch.int64) << (self.bits - 1)) | interval
        return codes.to(self.code_dtype), means

    def _encode_numpy(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`encode` of a non-empty finite float32 vector on CPU, in numpy.

        The same steps as the torch code above, which a CPU tensor no longer takes:
        at payload sizes (hundreds of values) each of its two dozen torch ops costs
        more than the arithmetic (233 us for 509 values, against about 40 here).
        numpy's float64 log replaces torch's for the endpoints and the values alike;
        ``t`` is clamped into ``[0, n_intervals - 1]`` either way, so an endpoint
        whose log rounds differently still lands in its interval. Means: float64
        sums in index order (``np.bincount``), as ``index_add_`` accumulates on CPU.
        """
        levels = self.levels
        magnitude = np.abs(v).astype(np.float64)
        negative = v < 0  # -0.0 < 0 is False: zeros are sent with sign bit 0
        is_zero = magnitude == 0
        n_zero = int(np.count_nonzero(is_zero))
        n_intervals = levels - 1 if n_zero else levels
        interval = np.full(v.shape, levels - 1, dtype=np.int64)  # the zero slot
        if n_zero < v.size:  # there are non-zero values to place
            v_max = magnitude.max()
            smallest_nonzero = magnitude.min(where=~is_zero, initial=np.inf)
            log_max = np.log(v_max)
            log_range = log_max - np.log(smallest_nonzero)
            if log_range > 0:
                with np.errstate(divide="ignore"):  # log(0) of the zeros: replaced just below
                    t = (log_max - np.log(magnitude)) * (n_intervals / log_range)
                nonzero_interval = np.clip(np.floor(t), 0, n_intervals - 1).astype(np.int64)
            else:  # all non-zero magnitudes equal: one interval is exact
                nonzero_interval = np.zeros_like(interval)
            interval = np.where(is_zero, interval, nonzero_interval)
        sums = np.bincount(interval, weights=magnitude, minlength=levels)
        counts = np.bincount(interval, minlength=levels)
        means = np.divide(sums, counts, out=np.zeros(levels), where=counts > 0).astype(np.float32)
        codes = (negative.astype(np.int64) << (self.bits - 1)) | interval
        return codes.astype(_NUMPY_CODE_DTYPES[self.code_dtype]), means

    # ------------------------------------------------------------------ decode
    def decode(self, codes: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        """Reconstruct float32 values ``sign * means[interval]`` from codes.

        Raises ``ValueError`` if ``means`` is not ``L`` finite non-negative
        numbers or a code is outside ``[0, 2**bits)``.
        """
        if means.dim() != 1 or means.numel() != self.levels:
            raise ValueError(f"means must have shape ({self.levels},), got {tuple(means.shape)}")
        if codes.dim() != 1 or codes.is_floating_point() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be a 1-D integer tensor, got {codes.dtype} {tuple(codes.shape)}")
        if not bool(torch.isfinite(means).all()) or bool((means < 0).any()):
            raise ValueError("means must be finite and non-negative")
        if codes.numel():
            lo, hi = torch.stack([codes.min(), codes.max()]).to(torch.int64).tolist()
            if lo < 0 or hi >= 1 << self.bits:
                raise ValueError(f"codes must lie in [0, {1 << self.bits}), got [{lo}, {hi}]")
        return self._decode_trusted(codes, means)

    def _decode_trusted(self, codes: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        if _numpy_path(codes.device) and _numpy_path(means.device):  # see _encode_numpy
            c = codes.numpy().astype(np.int64)
            magnitude = means.numpy().astype(np.float32, copy=False)[c & (self.levels - 1)]
            return torch.from_numpy(np.where((c >> (self.bits - 1)) & 1 == 1, -magnitude, magnitude))
        c = codes.to(torch.int64)
        magnitude = means.to(torch.float32)[c & (self.levels - 1)]
        negative = (c >> (self.bits - 1)) & 1
        return torch.where(negative.bool(), -magnitude, magnitude)

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """The lossy reconstruction ``decode(encode(values))`` (float32)."""
        return self._decode_trusted(*self.encode(values))


def _log(x: float) -> float:
    # torch's float64 log, so the scalar endpoints use the same log as the
    # per-value logs they are compared with (t = 0 exactly at v_max).
    return float(torch.log(torch.tensor(x, dtype=torch.float64)))


_SMALLEST_SUBNORMAL = float(np.finfo(np.float32).smallest_subnormal)


class ScaledSign:
    r"""Scaled sign: :math:`Q(v) = \lVert v \rVert_1 / d \cdot \operatorname{sign}(v)`.

    ``encode`` returns ``(negative, scale)``: a bool tensor, True where the
    value is negative, and a float32 0-d tensor ``||v||_1 / d`` (computed in
    float64). One bit cannot express ``sign(0) = 0``, so zeros are sent as
    positive and come back as ``+scale``; this keeps ``||Q(v)||_1 = ||v||_1``
    (but for a vector so small that its mean magnitude is below float32's
    smallest subnormal: the scale is then that subnormal, so the signs survive).
    Empty input gives an empty mask and scale 0.
    """

    bits = 1

    def __repr__(self) -> str:
        return "ScaledSign()"

    def encode(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = _as_finite_float32(values)
        if v.numel() == 0:
            return torch.zeros(0, dtype=torch.bool, device=v.device), v.new_zeros(())
        l1 = v.abs().sum(dtype=torch.float64)
        scale = (l1 / v.numel()).to(torch.float32)
        if bool(l1 > 0):  # ||v||_1 / d can round to 0 in float32 (subnormal v): keep the signs, 1 ulp
            scale = scale.clamp_min(_SMALLEST_SUBNORMAL)
        return v < 0, scale

    def decode(self, negative: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """float32 ``where(negative, -scale, +scale)``; ValueError on a bad scale."""
        if negative.dtype != torch.bool or negative.dim() != 1:
            raise ValueError(f"negative must be a 1-D bool tensor, got {negative.dtype} {tuple(negative.shape)}")
        if scale.numel() != 1 or not bool(torch.isfinite(scale).all()) or float(scale) < 0:
            raise ValueError("scale must be one finite non-negative number")
        return self._decode_trusted(negative, scale)

    @staticmethod
    def _decode_trusted(negative: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        s = scale.reshape(()).to(device=negative.device, dtype=torch.float32)
        magnitude = s.expand(negative.shape)
        return torch.where(negative, -magnitude, magnitude)

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """The lossy reconstruction ``decode(encode(values))`` (float32)."""
        return self._decode_trusted(*self.encode(values))
