"""Gradient sparsifiers: every one maps a flat float vector to a :class:`SparseTensor`.

A *compressor* is a callable ``compressor(x) -> SparseTensor`` for a 1-D
floating tensor ``x`` of length ``d``. The same objects are used on the
uplink (client -> server) and on the downlink (server -> clients).

==================  ===========================================================
``TopK``            the ``k`` entries of largest magnitude (exact, fast on CPU)
``RandomK``         ``k`` positions drawn uniformly without replacement
``RTopK``           ``k`` positions drawn uniformly from the top-``r``
``HardThreshold``   every entry with ``|x_i| >= lambda``
``Identity``        every entry (no compression; name ``"none"``)
==================  ===========================================================

Every compressor satisfies the :class:`Compressor` protocol and is registered
by name in :data:`COMPRESSORS` (decorator :func:`register_compressor`); the
factory :func:`build_compressor` builds any registered compressor from plain
config values, so a new compressor is one decorated class.

Plus the schedules the papers in ``shared/papers`` give for choosing the
budget: :func:`hard_threshold_for_topk` (lambda from a top-k budget),
:func:`adaptive_k_schedule` (AdapTop-K's per-round ``k_t``) and
:func:`adaptive_k_budgeted` (the same, re-planned from what was already spent,
so that a changing ``t_hat`` never breaks the total budget).

Magnitude keys
--------------
Magnitudes are ranked by the IEEE-754 bit pattern with the sign bit
cleared, read as a signed integer ("key"). For non-negative floats the
integer order of the bit patterns *is* the numeric order, so ``key(a) >=
key(b) <=> |a| >= |b|`` exactly (``-0.0 == +0.0``, subnormals included).
NaN and +-Inf have keys at or above ``key(inf)``, above every finite
threshold, so a pass that keeps "everything at least t" also keeps every
non-finite entry, and non-finite input is detected on the small kept set
instead of by an extra full pass over ``x`` (the blocked CPU pass compares
floats as ``~(|x| < t)``, which keeps NaN in the same way).

float16 / bfloat16 inputs are widened to float32 first (exact, order
preserving); float32 and float64 are used as they are.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import os
from typing import Any, Callable, ClassVar, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch

from fl_sparse.sparse import SparseTensor

__all__ = [
    "Compressor",
    "TopK",
    "RandomK",
    "RTopK",
    "HardThreshold",
    "Identity",
    "magnitude_topk_indices",
    "hard_threshold_for_topk",
    "adaptive_k_schedule",
    "adaptive_k_rounds",
    "adaptive_k_t_hat",
    "adaptive_k_budgeted",
    "build_compressor",
    "register_compressor",
    "COMPRESSORS",
    "COMPRESSOR_NAMES",
    "FractionalQuantizer",
    "ScaledSign",
]

@runtime_checkable
class Compressor(Protocol):
    """What every compressor is: ``compressor(x, generator=None) -> SparseTensor``.

    Contract (checked by ``tests/test_compressors.py`` for every registered
    compressor):

    * input: a flat 1-D floating tensor ``x`` of length ``d`` (any device,
      float16/bfloat16/float32/float64); it is never modified, and the result
      does not track autograd;
    * output: a :class:`SparseTensor` of length ``d`` whose indices are
      sorted, unique int64 positions and whose values are ``x`` at those
      positions (same dtype and device as ``x``);
    * it works in either direction: the same object compresses client
      updates (uplink) and the server aggregate (downlink);
    * it keeps at most ``k_for(d)`` entries;
    * ``generator``: randomised compressors draw all their randomness from it
      when given, so equal generator states give equal results (reproducible);
      deterministic compressors accept and ignore it.

    ``k_for(numel)`` is the largest number of entries returned for a vector of
    length ``numel``: ``numel`` itself for compressors without a fixed budget
    (hard threshold, identity); ``None`` is allowed for "unbounded" but
    ``numel`` is preferred.

    ``isinstance(obj, Compressor)`` checks that both methods exist (not their
    signatures). Register a new class with :func:`register_compressor`.
    """

    def __call__(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> SparseTensor: ...

    def k_for(self, numel: int) -> int | None: ...


# --------------------------------------------------------------------------
# quantizers live in fl_sparse.quantize (written separately); re-exported
# lazily so that importing this module never depends on that file existing.
def __getattr__(name: str) -> Any:  # PEP 562 module attribute hook
    if name == "COMPRESSOR_NAMES":  # computed: the registry may grow after import
        return tuple(COMPRESSORS)
    if name in ("FractionalQuantizer", "ScaledSign"):
        from fl_sparse import quantize

        return getattr(quantize, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ============================================================ magnitude keys
# (integer view dtype, mask that clears the sign bit, key of +inf)
_KEY_SPEC: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.float32: (torch.int32, 0x7FFF_FFFF, 0x7F80_0000),
    torch.float64: (torch.int64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
}


def _widen(x: torch.Tensor) -> torch.Tensor:
    """``x`` as contiguous float32/float64 (float16 / bfloat16 -> float32 is exact and order preserving)."""
    if x.dtype not in _KEY_SPEC:
        x = x.float()
    return x.contiguous()


def _key_view(xw: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``(raw, abs_mask, inf_key)`` for a widened ``xw``: ``key = raw & abs_mask``."""
    int_dtype, abs_mask, inf_key = _KEY_SPEC[xw.dtype]
    return xw.view(int_dtype), abs_mask, inf_key


def _key_to_float(key: int, dtype: torch.dtype) -> float:
    """The non-negative float whose magnitude key is ``key`` (exact)."""
    return float(torch.tensor(key, dtype=_KEY_SPEC[dtype][0]).view(dtype))


def _key_of_threshold(lam: float, dtype: torch.dtype) -> int:
    """Smallest key ``q`` of ``dtype`` with ``key(v) >= q  <=>  |v| >= lam`` (exact, ``lam`` as a double).

    ``lam`` is rounded *up* to ``dtype``, so an entry just below ``lam`` in
    real arithmetic is never kept because of rounding.
    """
    exact = torch.tensor(lam, dtype=torch.float64)
    rounded = exact.to(dtype)
    if rounded.double() < exact:
        rounded = torch.nextafter(rounded, torch.tensor(math.inf, dtype=dtype))
    return int(rounded.view(_KEY_SPEC[dtype][0]))


def _check_flat_float(x: torch.Tensor, who: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"{who} expects a flat 1-D tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{who} expects a floating tensor, got {x.dtype}")
    # compressors act on gradients/updates, never on the autograd graph
    return x.detach()


def _raise_non_finite(who: str) -> None:
    raise ValueError(f"{who}: input contains NaN or Inf")


# ---------------------------------------------------------------- CPU passes
# Two implementations of the same selections on CPU:
#
# * numpy (the default): single-threaded, a handful of calls. torch's CPU
#   kernels for this kind of work are slow on one thread at model sizes (d =
#   50,890: ``torch.nonzero`` 118 us against ``np.flatnonzero``'s 18, a float
#   compare 61 us against 11), and the torch selection is a dozen ops.
#   Measured (median, one thread, 2026-11-26), d = 50,890 at 1 %: 0.06 ms
#   against 0.36 ms for the torch path and 0.21 ms for torch.topk; d = 1.2 M
#   at 0.1 %: 0.9 against 2.0 ms; d = 11.2 M at 0.1 %: 8 against 16 ms. Being
#   single-threaded it also cannot stall at a barrier on a busy machine.
# * torch (:func:`_cpu_threads_for` says when, on how many threads):
#   multi-threaded passes, which win only on large vectors with several free
#   cores (the 16-core H100 host, d = 11.2 M at 0.1 %: 4.8 ms on 4 threads,
#   2.8-3.4 ms on 16, against 6.6-11 ms for numpy; d = 1.2 M: a tie at 4
#   threads or more).
_THREADED_MIN_NUMEL = 1 << 21
_THREADED_MIN_THREADS = 4
# numpy scans: entries per chunk (the chunk's keys and mask stay in cache; a
# whole-vector temporary of a large model would page-fault its way in).
_SCAN_CHUNK = 1 << 16


def _cpu_threads_for(numel: int) -> int:
    """Threads for the multi-threaded torch path of a CPU selection over ``numel`` entries; 0: numpy.

    The torch path only for large vectors, with at least :data:`_THREADED_MIN_THREADS`
    torch threads that each get a core other processes leave free: when more threads
    are runnable than there are cores (other processes, simulated clients, a
    browser), one of torch's pool threads is descheduled at nearly every OpenMP
    barrier and each pass waits a time slice for it (measured at d = 11.2 M, 0.1 %,
    two busy processes on two cores: the threaded path fell from 17.6x to 0.8-2.3x
    faster than ``torch.topk``). So it runs on ``min(torch threads, cores - others)``
    threads, where ``others`` is the instantaneous count of other processes'
    runnable threads (not the load average, which lags a minute), read only when the
    other conditions hold; where it cannot be read, the cores are trusted. The count
    errs high right after our own multi-threaded work (see :func:`_runnable_elsewhere`),
    which costs a few threads, never a stall.
    """
    threads = torch.get_num_threads()
    if numel < _THREADED_MIN_NUMEL or threads < _THREADED_MIN_THREADS:
        return 0
    free = (os.cpu_count() or 1) - (_runnable_elsewhere() or 0)
    use = min(threads, free)
    return use if use >= _THREADED_MIN_THREADS else 0


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the enclosed torch ops on ``n`` intra-op threads; the count before is back afterwards."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _np_positions_at_least(raw: np.ndarray, abs_mask: int, threshold_key: int) -> np.ndarray:
    """Ascending int64 positions ``i`` with ``raw[i] & abs_mask >= threshold_key`` (numpy, CPU)."""
    numel = raw.size
    if numel <= _SCAN_CHUNK:
        return np.flatnonzero((raw & abs_mask) >= threshold_key)
    keys = np.empty(_SCAN_CHUNK, dtype=raw.dtype)
    hits = np.empty(_SCAN_CHUNK, dtype=bool)
    pieces = []
    for start in range(0, numel, _SCAN_CHUNK):
        n = min(_SCAN_CHUNK, numel - start)
        np.bitwise_and(raw[start : start + n], abs_mask, out=keys[:n])
        np.greater_equal(keys[:n], threshold_key, out=hits[:n])
        pos = np.flatnonzero(hits[:n])
        if pos.size:
            pos += start
            pieces.append(pos)
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)


def _np_largest_lowest_index(keys: np.ndarray, k: int) -> np.ndarray:
    """Ascending positions (into ``keys``) of the ``k`` largest keys, ties at the k-th to lower positions."""
    n = keys.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    kth = np.partition(keys, n - k)[n - k]
    chosen = keys > kth
    need = k - int(np.count_nonzero(chosen))
    if need:
        chosen[np.flatnonzero(keys == kth)[:need]] = True
    return np.flatnonzero(chosen)


def _np_magnitude_topk(raw: np.ndarray, abs_mask: int, inf_key: int, k: int, check_finite: bool) -> np.ndarray:
    """The numpy CPU path of :func:`magnitude_topk_indices`: ascending int64 positions (``1 <= k <= d``).

    The algorithm of :func:`magnitude_topk_indices`: a sampled threshold ``t``,
    the candidates ``{key >= t}``, their exact top-k; for a large tie group at
    ``t`` (the zeros of a mostly-zero ``x`` included) the entries strictly above
    ``t``, then the lowest-index entries equal to ``t``.
    """
    numel = raw.size
    if numel >= _NP_SAMPLE_MIN_NUMEL and k < numel:
        sample = raw[_sample_positions_np(numel)] & abs_mask
        m = sample.size
        expected = m * k / numel
        j = math.ceil(expected + _SAMPLE_Z * math.sqrt(expected) + 1)
        while j < m:
            # j-th largest sampled key, kept within the magnitudes: non-finite entries
            # (keys >= inf_key) are then always candidates, hence checked below
            t_key = min(int(np.partition(sample, m - j)[m - j]), inf_key)
            if t_key < inf_key and int(np.count_nonzero(sample >= t_key)) > 4 * j + 16:
                # {key >= t} would be far larger than planned (a tie group at t, e.g. the
                # zeros of a mostly-zero x): above t, then the lowest positions equal to t
                above = _np_positions_at_least(raw, abs_mask, t_key + 1)
                above_keys = raw[above] & abs_mask
                if check_finite and above.size and int(above_keys.max()) >= inf_key:
                    _raise_non_finite("TopK")
                if above.size >= k:
                    return above[_np_largest_lowest_index(above_keys, k)]
                tied = _np_tied_positions(raw, abs_mask, t_key, k - above.size)
                if above.size + tied.size == k:
                    return np.sort(np.concatenate([above, tied]))
            else:
                candidates = _np_positions_at_least(raw, abs_mask, t_key)
                if candidates.size >= k:
                    cand_keys = raw[candidates] & abs_mask
                    if check_finite and int(cand_keys.max()) >= inf_key:
                        _raise_non_finite("TopK")
                    return candidates[_np_largest_lowest_index(cand_keys, k)]
            j *= 4  # the estimate was too high (rare, or adversarial input): widen and redo the pass
    keys = raw & abs_mask
    if check_finite and int(keys.max()) >= inf_key:
        _raise_non_finite("TopK")
    return _np_largest_lowest_index(keys, k)


def _np_tied_positions(raw: np.ndarray, abs_mask: int, key: int, need: int) -> np.ndarray:
    """The (up to) ``need`` lowest positions whose key is exactly ``key``, ascending (numpy)."""
    pieces, found = [], 0
    for start in range(0, raw.size, _SCAN_CHUNK):
        pos = np.flatnonzero((raw[start : start + _SCAN_CHUNK] & abs_mask) == key)
        if pos.size:
            pos = pos[: need - found] + start
            pieces.append(pos)
            found += pos.size
            if found >= need:
                break
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)


# The torch passes (the threaded path). Two exact ways to list {i : |x_i| >= t}, both ~one read of x:
#
# * blocked (sparse hits): view x as rows of _BLOCK entries, take each row's
#   max |x| as max(amax, -amin) -- two vectorised reductions that run at
#   memory bandwidth and write only d/_BLOCK floats -- and inspect only the
#   rows whose max reaches t. Measured on the 2-core dev box, d = 11.2 M,
#   0.15 % hits: ~4 ms, against ~12 ms for a plain ``x.abs()``.
# * chunked (dense hits): key = bits & 0x7fff..., compare, nonzero, over
#   4 MiB chunks with reused buffers (cache resident, no page faults): ~9 ms.
#
# The blocked pass wins while few rows hold a hit: expected hit density
# times _BLOCK below _BLOCKED_MAX_HITS_PER_ROW.
_BLOCK = 64
_BLOCKED_MAX_HITS_PER_ROW = 0.2
_CHUNK_BYTES = 1 << 22


def _positions_at_least(xw: torch.Tensor, threshold_key: int) -> torch.Tensor:
    """Sorted int64 positions ``i`` with ``key(xw_i) >= threshold_key``.

    NaN and +-Inf entries are always included when ``threshold_key <=
    key(inf)`` (their keys are at least ``key(inf)``; in the float
    comparisons below ``~(|v| < t)`` is true for NaN). On CPU: the numpy
    scan, or the torch passes on the threads :func:`_cpu_threads_for` gives.
    """
    raw, abs_mask, _ = _key_view(xw)
    numel = xw.numel()
    if xw.device.type != "cpu":
        # one pass on accelerators; nonzero's output size needs a sync anyway
        return torch.nonzero(torch.bitwise_and(raw, abs_mask) >= threshold_key).flatten()
    threads = _cpu_threads_for(numel)
    if not threads:
        return torch.from_numpy(_np_positions_at_least(raw.numpy(), abs_mask, threshold_key))
    with torch_threads(threads):
        # the hit density picks the faster torch pass; sample it (cheap)
        sample_keys = torch.bitwise_and(raw[_sample_positions(numel, xw.device)], abs_mask)
        hits = int((sample_keys >= threshold_key).sum())
        density = (hits + _SAMPLE_Z * math.sqrt(hits) + 1) / sample_keys.numel()
        return _torch_positions_at_least(xw, threshold_key, density_hint=density)


def _torch_positions_at_least(xw: torch.Tensor, threshold_key: int, density_hint: float = 1.0) -> torch.Tensor:
    """The torch CPU passes of :func:`_positions_at_least` (blocked or chunked, by ``density_hint``)."""
    raw, abs_mask, _ = _key_view(xw)
    numel = xw.numel()
    if numel >= 4 * _BLOCK and density_hint * _BLOCK <= _BLOCKED_MAX_HITS_PER_ROW:
        return _positions_at_least_blocked(xw, _key_to_float(threshold_key, xw.dtype))
    chunk = max(1, _CHUNK_BYTES // raw.element_size())
    if numel <= chunk:
        return torch.nonzero(torch.bitwise_and(raw, abs_mask) >= threshold_key).flatten()
    key_buf = torch.empty(chunk, dtype=raw.dtype)
    mask_buf = torch.empty(chunk, dtype=torch.bool)
    pieces = []
    for start in range(0, numel, chunk):
        n = min(chunk, numel - start)
        keys = key_buf[:n]
        torch.bitwise_and(raw[start : start + n], abs_mask, out=keys)
        hit = mask_buf[:n]
        torch.ge(keys, threshold_key, out=hit)
        pos = torch.nonzero(hit).flatten()
        if pos.numel():
            pieces.append(pos.add_(start))
    if not pieces:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat(pieces)


def _positions_at_least_blocked(xw: torch.Tensor, threshold: float) -> torch.Tensor:
    """Blocked pass of :func:`_positions_at_least` (``threshold`` exactly representable in ``xw.dtype``)."""
    numel = xw.numel()
    n_rows = numel // _BLOCK
    head = n_rows * _BLOCK
    rows = xw[:head].view(n_rows, _BLOCK)
    row_max = torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg_())  # NaN propagates
    live = torch.nonzero(~(row_max < threshold)).flatten()
    hits = torch.nonzero(~(rows[live].abs_() < threshold))  # row-major: ascending positions
    positions = hits[:, 1].add_(live[hits[:, 0]] * _BLOCK)
    if head < numel:
        tail = torch.nonzero(~(xw[head:].abs() < threshold)).flatten()
        if tail.numel():
            positions = torch.cat([positions, tail.add_(head)])
    return positions


def _kth_largest(keys: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest of ``keys`` (0-dim tensor), ``1 <= k <= numel``."""
    n = keys.numel()
    # topk's partial sort wins for small k; kthvalue's quickselect otherwise
    if k <= n // 16:
        return torch.topk(keys, k, sorted=False).values.min()
    return torch.kthvalue(keys, n - k + 1).values


def _largest_keys_lowest_index(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted positions of the ``k`` largest ``keys``; ties at the k-th key go to lower positions.

    Deterministic tie-breaking makes the selection a pure function of the
    input (``torch.topk`` leaves ties unspecified).
    """
    n = keys.numel()
    if k >= n:
        return torch.arange(n, device=keys.device)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=keys.device)
    kth = _kth_largest(keys, k)
    above = torch.nonzero(keys > kth).flatten()
    tied = torch.nonzero(keys == kth).flatten()[: k - above.numel()]
    return torch.cat([above, tied]).sort().values


def _first_positions_with_key(raw: torch.Tensor, abs_mask: int, key: int, need: int) -> torch.Tensor:
    """The (up to) ``need`` lowest positions with magnitude key exactly ``key``, ascending (CPU).

    Scans growing chunks from the start and stops once ``need`` are found, so
    a dense tie group costs a few small chunks, not a pass over ``x``.
    """
    numel = raw.numel()
    pieces, found, start = [], 0, 0
    size = max(1 << 16, 4 * need)
    max_size = max(size, _CHUNK_BYTES // raw.element_size())
    while start < numel and found < need:
        n = min(size, numel - start)
        pos = torch.nonzero(torch.bitwise_and(raw[start : start + n], abs_mask) == key).flatten()
        if pos.numel():
            take = pos[: need - found].add_(start)
            pieces.append(take)
            found += take.numel()
        start += n
        size = min(2 * size, max_size)
    if not pieces:
        return torch.empty(0, dtype=torch.int64, device=raw.device)
    return torch.cat(pieces)


# Subsample used to estimate thresholds: up to _SAMPLE_SIZE positions,
# uniform with replacement from a fixed generator, so the estimate (and with
# it the running time, never the result) is deterministic.
_SAMPLE_SIZE = 1 << 16
_SAMPLE_SEED = 0x5EED_70B4
# Below this many entries a direct exact selection is as fast (torch path; numpy's calls
# are cheaper, so sampling pays off sooner there).
_FAST_MIN_NUMEL = 1 << 15
_NP_SAMPLE_MIN_NUMEL = 1 << 12
# Safety margin of the threshold estimate, in binomial standard deviations.
_SAMPLE_Z = 4.0
_sample_positions_cache: dict[tuple[int, str], torch.Tensor] = {}


def _sample_positions(numel: int, device: torch.device) -> torch.Tensor:
    key = (numel, str(device))
    pos = _sample_positions_cache.get(key)
    if pos is None:
        gen = torch.Generator().manual_seed(_SAMPLE_SEED)
        # at most ~3 % of the entries: the random gather must stay cheap next to the pass
        m = min(_SAMPLE_SIZE, max(1, numel // 32))
        # sorted -> the gather walks memory forward (prefetch friendly)
        pos = torch.randint(numel, (m,), generator=gen).sort().values.to(device)
        if len(_sample_positions_cache) >= 16:  # bounded: a few model sizes at most
            _sample_positions_cache.pop(next(iter(_sample_positions_cache)))
        _sample_positions_cache[key] = pos
    return pos


def _sample_positions_np(numel: int) -> np.ndarray:
    """:func:`_sample_positions` on CPU, as a read-only numpy array (shares its memory)."""
    pos = _sample_positions(numel, torch.device("cpu")).numpy()
    pos.flags.writeable = False
    return pos


def magnitude_topk_indices(x: torch.Tensor, k: int, *, check_finite: bool = True) -> torch.Tensor:
    """Sorted int64 indices of the ``k`` entries of largest ``|x_i|`` (``k`` clipped to ``[0, d]``).

    Selects the same set as ``torch.topk(x.abs(), k)``; where the k-th
    magnitude is tied, CPU breaks ties toward lower indices (deterministic),
    accelerators leave them to ``torch.topk``.

    CPU algorithm (exact, about one read of ``x``; numpy, or multi-threaded
    torch passes for a large ``x`` with free cores, see :func:`_cpu_threads_for`;
    both select the same set): let ``p = k/d``. Take
    ``m`` sample positions (fixed generator) and the ``j``-th largest sampled
    magnitude ``t`` with ``j = ceil(m p + z sqrt(m p) + 1)``, ``z = 4``: a
    threshold ``z`` binomial standard deviations *below* the k-th magnitude,
    so that the candidate set ``C = {i : |x_i| >= t}`` holds at least ``k``
    entries except with probability ~1e-4, whatever the values of ``x`` (the
    argument only uses that the sample positions are uniform), and about
    ``k (1 + z / sqrt(m p))`` entries. The exact top-k of ``C`` is then the
    exact top-k of ``x``. If ``|C| < k`` the threshold is lowered (``j``
    times 4) and the pass repeated; once the sample is exhausted the
    selection runs on all of ``x``. So the result is always exact; only the
    time varies.

    Large tie groups at ``t`` (all-equal, quantised or mostly-zero input),
    seen in the sample as many more than ``j`` sampled keys ``>= t``, would
    make ``C`` huge; then the top-k is assembled as ``{|x_i| > t}`` (if that
    already holds ``k`` entries, its top-k) plus the lowest-index entries
    with ``|x_i| == t``, found by a scan that stops as soon as it has enough.

    Accelerators: ``torch.topk`` on the magnitude keys (radix select, no sync).

    ``check_finite``: raise ``ValueError`` if ``x`` holds NaN or +-Inf. On
    CPU this is free: non-finite keys exceed every finite threshold, so such
    entries are always candidates and are checked there (no extra pass over
    ``x``). On accelerators it costs one scalar device-to-host sync; pass
    ``False`` to avoid it (NaN then ranks above +Inf, as in the keys).
    """
    x = _check_flat_float(x, "magnitude_topk_indices")
    numel = x.numel()
    k = max(0, min(int(k), numel))
    device = x.device
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    xw = _widen(x)
    raw, abs_mask, inf_key = _key_view(xw)

    if device.type != "cpu":
        top = torch.topk(torch.bitwise_and(raw, abs_mask), k, sorted=False)
        if check_finite and bool(top.values.max() >= inf_key):
            _raise_non_finite("TopK")
        return top.indices.sort().values

    threads = _cpu_threads_for(numel)
    if not threads:
        return torch.from_numpy(_np_magnitude_topk(raw.numpy(), abs_mask, inf_key, k, check_finite))
    with torch_threads(threads):
        return _torch_magnitude_topk(xw, raw, abs_mask, inf_key, k, check_finite)


def _torch_magnitude_topk(xw, raw, abs_mask, inf_key, k, check_finite) -> torch.Tensor:
    """The multi-threaded torch CPU path of :func:`magnitude_topk_indices` (see there)."""
    numel = xw.numel()
    device = xw.device
    if numel >= _FAST_MIN_NUMEL and k < numel:
        sample_keys = torch.bitwise_and(raw[_sample_positions(numel, device)], abs_mask)
        m = sample_keys.numel()
        if check_finite and int(sample_keys.max()) >= inf_key:
            _raise_non_finite("TopK")  # the sample itself holds a NaN / Inf
        expected = m * k / numel
        j = math.ceil(expected + _SAMPLE_Z * math.sqrt(expected) + 1)
        while j < m:
            # j-th largest sampled key, kept within the magnitudes (a sample
            # full of NaN would otherwise put it among NaN payload keys);
            # non-finite entries are then always candidates, hence detected
            t_key = min(int(_kth_largest(sample_keys, j)), inf_key)
            n_at_least = int((sample_keys >= t_key).sum())
            if n_at_least > 4 * j + 16 and t_key < inf_key:
                # A large tie group sits at t (all-equal, quantised, mostly
                # zero input): {|x| >= t} would be far bigger than planned.
                # Split it: everything strictly above t, then the lowest-index
                # entries equal to t, which is exactly the tie-break rule.
                n_above = int((sample_keys > t_key).sum())
                above = _torch_positions_at_least(xw, t_key + 1, density_hint=(n_above + 1) / m)
                above_keys = torch.bitwise_and(raw[above], abs_mask)
                if check_finite and above.numel() and int(above_keys.max()) >= inf_key:
                    _raise_non_finite("TopK")
                if above.numel() >= k:
                    return above[_largest_keys_lowest_index(above_keys, k)]
                tied = _first_positions_with_key(raw, abs_mask, t_key, k - above.numel())
                if above.numel() + tied.numel() == k:
                    return torch.cat([above, tied]).sort().values
            elif t_key == 0:
                break  # every entry would be a candidate: select directly
            else:
                candidates = _torch_positions_at_least(xw, t_key, density_hint=j / m)
                cand_keys = torch.bitwise_and(raw[candidates], abs_mask)
                if check_finite and candidates.numel() and int(cand_keys.max()) >= inf_key:
                    _raise_non_finite("TopK")
                if candidates.numel() >= k:
                    return candidates[_largest_keys_lowest_index(cand_keys, k)]
            j *= 4  # estimate too high (rare, or adversarial input): widen and redo the pass

    keys = torch.bitwise_and(raw, abs_mask)
    if check_finite and int(keys.max()) >= inf_key:
        _raise_non_finite("TopK")
    return _largest_keys_lowest_index(keys, k)


def _runnable_elsewhere(loadavg: str = "/proc/loadavg", tasks: str = "/proc/self/task") -> int | None:
    """Runnable threads of *other* processes on the machine, now (Linux ``/proc``), or None.

    ``/proc/loadavg`` counts every runnable thread, this process's own included, and
    right after a multi-threaded torch op our OpenMP pool threads still spin (runnable)
    for a while: counted as load, they would make an idle machine look busy (seen on a
    16-core host: 15 of our own spinning threads). So this process's runnable threads
    (``/proc/self/task/*/stat``, state ``R``) are subtracted. They are read after the
    count, and spinning threads only go to sleep meanwhile, so the result errs high
    (seen: 0-6 on that idle host right after ``torch.topk``), never low: the safe side.
    """
    try:
        with open(loadavg, "rb") as fh:
            running = int(fh.read().split()[3].split(b"/")[0])
        own = 0
        for task in os.scandir(tasks):
            try:
                with open(f"{task.path}/stat", "rb") as fh:
                    stat = fh.read()
            except OSError:  # the thread ended meanwhile
                continue
            state_at = stat.rindex(b")") + 2  # "pid (name) S ...": the name may hold ") "
            own += stat[state_at : state_at + 1] == b"R"
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - max(own, 1))


# ============================================================ budgets (k)
def _is_int(v: Any) -> bool:
    """A true integer (Python or numpy), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _validate_budget(k: Any, ratio: Any, who: str) -> tuple[int | None, float | None]:
    if (k is None) == (ratio is None):
        raise ValueError(f"{who}: give exactly one of k (count) or ratio (fraction), got k={k!r}, ratio={ratio!r}")
    if k is not None:
        if not _is_int(k):
            raise ValueError(f"{who}: k must be an int, got {k!r}")
        if k < 1:
            raise ValueError(f"{who}: k must be >= 1, got {k}")
        return int(k), None
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise ValueError(f"{who}: ratio must be a number, got {ratio!r}")
    ratio = float(ratio)
    if not (0.0 < ratio <= 1.0):  # also rejects NaN
        raise ValueError(f"{who}: ratio must be in (0, 1], got {ratio}")
    return None, ratio


def _k_from_budget(k: int | None, ratio: float | None, numel: int) -> int:
    """``min(k, numel)``, or ``ceil(ratio * numel)`` clipped to ``[1, numel]`` (0 if ``numel == 0``).

    ``ceil(ratio d)`` equals the bidirectional top-K paper's
    ``K = d - floor((1 - 0.001) d)`` (bidirectional-topk-downlink-compression.txt
    line 257, ``ratio = 0.001``) in exact arithmetic; products that are
    integers up to float rounding (``0.07 * 100 = 7.000000000000001``) are
    not rounded up to the next integer.
    """
    if not _is_int(numel) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    if numel == 0:
        return 0
    if k is not None:
        return min(k, numel)
    product = ratio * numel
    nearest = round(product)
    count = nearest if abs(product - nearest) <= 1e-9 * max(1.0, product) else math.ceil(product)
    return max(1, min(numel, count))


# ============================================================ registry
# Config values arrive from Flower ConfigRecords / JSON: numbers may be strings.
def _as_int(name: str, v: Any) -> int:
    """Int from a config value: int, integral float, or numeric string."""
    if isinstance(v, bool):
        raise ValueError(f"parameter {name!r} must be an integer, got bool {v!r}")
    if _is_int(v):
        return int(v)
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            raise ValueError(f"parameter {name!r} must be an integer, got {v!r}") from None
    if isinstance(v, float) and math.isfinite(v) and v == int(v):
        return int(v)
    raise ValueError(f"parameter {name!r} must be an integer, got {v!r}")


def _as_float(name: str, v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(f"parameter {name!r} must be a number, got bool {v!r}")
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            pass
    raise ValueError(f"parameter {name!r} must be a number, got {v!r}")


def _as_optional_int(name: str, v: Any) -> int | None:
    # Flower ConfigRecords cannot hold None; an empty string or "none" means unset
    if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "null")):
        return None
    return _as_int(name, v)



COMPRESSORS: dict[str, type] = {}
"""Registered compressor classes by config name (see :func:`register_compressor`)."""

# alternative spellings accepted by build_compressor (after normalisation)
_ALIASES: dict[str, str] = {}

_C = TypeVar("_C", bound=type)


def _normalise_name(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _defines(cls: type, attr: str) -> bool:
    """``cls`` (or a base other than ``object``) defines ``attr`` as a callable."""
    inherited = any(attr in vars(base) for base in cls.__mro__ if base is not object)
    return inherited and callable(getattr(cls, attr, None))


def register_compressor(name: str, *, replace: bool = False, aliases: tuple[str, ...] = ()) -> Callable[[_C], _C]:
    """Class decorator: make ``build_compressor(name, **params)`` build this class.

    ``name`` is normalised like the names given to :func:`build_compressor`
    (case-insensitive, ``_`` == ``-``); ``aliases`` are extra accepted
    spellings. The class must define ``__call__`` and ``k_for`` (the
    :class:`Compressor` protocol), else ``TypeError``. A name (or alias)
    already taken raises ``ValueError`` unless ``replace=True``.

    Construction from config values: if the class has a classmethod
    ``from_config(**params)`` it is called (it converts/validates config
    values, e.g. numeric strings); otherwise the class itself is called with
    the params (``None`` values dropped), after checking them against its
    signature. Remove a registration with ``del COMPRESSORS[name]``.

    The registry is per process. A strategy sends the compressor's name and parameters
    to its clients, which build it themselves, so the registration must also run where
    the clients run (a simulation's Ray actors, each SuperNode's ClientApp process): put
    the class in a module that the ClientApp's module imports, not in a script's
    ``__main__``.
    """
    if not isinstance(name, str) or not _normalise_name(name):
        raise ValueError(f"register_compressor: name must be a non-empty string, got {name!r}")
    key = _normalise_name(name)
    alias_keys = tuple(_normalise_name(a) for a in aliases)

    def decorator(cls: _C) -> _C:
        if not isinstance(cls, type):
            raise TypeError(f"register_compressor({name!r}) decorates a class, got {cls!r}")
        missing = [m for m in ("__call__", "k_for") if not _defines(cls, m)]
        if missing:
            raise TypeError(
                f"register_compressor({name!r}): {cls.__name__} lacks {missing}; a compressor defines "
                "__call__(x, *, generator=None) -> SparseTensor and k_for(numel) -> int"
            )
        if not replace:
            for taken in (key, *alias_keys):
                if taken in COMPRESSORS or taken in _ALIASES:
                    owner = COMPRESSORS.get(_ALIASES.get(taken, taken))
                    raise ValueError(
                        f"compressor name {taken!r} is already registered"
                        f"{f' (to {owner.__name__})' if owner is not None else ''}; pass replace=True to override"
                    )
        _ALIASES.pop(key, None)
        COMPRESSORS[key] = cls
        for alias in alias_keys:
            COMPRESSORS.pop(alias, None)
            _ALIASES[alias] = key
        return cls

    return decorator


class _FromConfig:
    """Mixin: ``from_config(**params)`` converts config values with ``config_params`` then calls the class."""

    #: accepted config parameter -> converter ``(name, value) -> value`` (``None`` values mean absent)
    config_params: ClassVar[dict[str, Callable[[str, Any], Any]]] = {}

    @classmethod
    def _convert_config(cls, params: dict[str, Any]) -> dict[str, Any]:
        spec = cls.config_params
        unknown = sorted(set(params) - set(spec))
        if unknown:
            raise ValueError(
                f"{cls.__name__} does not take parameter(s) {unknown}; it takes {sorted(spec) or 'none'}"
            )
        args = {p: spec[p](p, v) for p, v in params.items() if v is not None}
        return {p: v for p, v in args.items() if v is not None}

    @classmethod
    def from_config(cls, **params: Any) -> Any:
        return cls(**cls._convert_config(params))


# ============================================================ compressors
@register_compressor("topk", aliases=("top-k",))
class TopK(_FromConfig):
    """Top-k sparsifier: keep the ``k`` entries of largest magnitude.

    ``TopK(k=1000)`` or ``TopK(ratio=0.001)`` (``k = ceil(ratio d)``, at least 1).
    The output is exactly ``x`` restricted to the index set of
    ``torch.topk(x.abs(), k)`` (ties at the k-th magnitude: lowest indices on
    CPU); see :func:`magnitude_topk_indices` for the fast exact algorithm and
    the NaN/Inf check (``check_finite``, default on: raises ``ValueError``).
    Deterministic: ``generator`` is accepted and ignored. Config name ``"topk"``.
    """

    config_params = {"k": _as_int, "ratio": _as_float}

    def __init__(self, k: int | None = None, *, ratio: float | None = None, check_finite: bool = True) -> None:
        self.k, self.ratio = _validate_budget(k, ratio, "TopK")
        self.check_finite = bool(check_finite)

    def k_for(self, numel: int) -> int:
        """Number of entries kept for a vector of length ``numel``."""
        return _k_from_budget(self.k, self.ratio, numel)

    def __call__(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> SparseTensor:
        x = _check_flat_float(x, "TopK")
        idx = magnitude_topk_indices(x, self.k_for(x.numel()), check_finite=self.check_finite)
        return SparseTensor(idx, x[idx], x.numel())

    def __repr__(self) -> str:
        return f"TopK(k={self.k})" if self.k is not None else f"TopK(ratio={self.ratio})"


class _SeededRandomness:
    """Per-device ``torch.Generator`` seeded with ``seed`` (or the global RNG if ``seed is None``).

    A fixed seed gives a reproducible *sequence* of draws per device type
    (CPU and CUDA generators produce different streams).
    """

    def __init__(self, seed: int | None) -> None:
        if seed is not None and not _is_int(seed):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.seed = None if seed is None else int(seed)
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device, override: torch.Generator | None) -> torch.Generator | None:
        if override is not None:
            return override
        if self.seed is None:
            return None
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device).manual_seed(self.seed)
            self._generators[key] = gen
        return gen


# Draws of _uniform_subset's rejection path: 10 % above the expected number,
# plus a constant, so that one round of draws nearly always suffices.
_OVERSAMPLE = 1.1
_EXTRA_DRAWS = 16


def _uniform_subset(n: int, k: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """Sorted int64 positions of a uniformly random ``k``-subset of ``range(n)``.

    CPU with ``k`` small against ``n``: draw positions with replacement until
    at least ``k`` distinct ones are seen, then keep a uniformly random ``k`` of
    the distinct ones. The distinct set's law is invariant under permutations
    of ``range(n)``, hence so is the kept subset: it is uniform. Costs
    ``O(k log k)`` instead of the ``O(n)`` of a full permutation.
    Otherwise (large ``k`` or accelerators, where ``unique`` would sync):
    the first ``k`` of ``randperm(n)``.
    """
    if k >= n:
        return torch.arange(n, device=device)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    if device.type == "cpu" and 4 * k <= n:
        # expected draws to see k distinct of n: n (H_n - H_{n-k}) ~ n ln(n/(n-k))
        draws = math.ceil(_OVERSAMPLE * n * math.log(n / (n - k))) + _EXTRA_DRAWS
        seen = torch.unique(torch.randint(n, (draws,), generator=generator))
        while seen.numel() < k:
            extra = torch.randint(n, (_EXTRA_DRAWS + 2 * (k - seen.numel()),), generator=generator)
            seen = torch.unique(torch.cat([seen, extra]))
        keep = torch.randperm(seen.numel(), generator=generator)[:k]
        return seen[keep].sort().values
    perm = torch.randperm(n, generator=generator, device=device)
    return perm[:k].sort().values


@register_compressor("randomk", aliases=("random-k",))
class RandomK(_FromConfig):
    """Random-k sparsifier: keep ``k`` positions drawn uniformly without replacement.

    ``P(S) = 1 / C(d, k)`` for every ``k``-subset ``S``; values are sent
    unscaled (pair with error feedback, as in the rTop-k paper's Algorithm 1).
    ``seed`` fixes a reproducible sequence of masks; ``generator=`` on a call
    overrides it for that call. Config name ``"randomk"``.
    """

    config_params = {"k": _as_int, "ratio": _as_float, "seed": _as_optional_int}

    def __init__(self, k: int | None = None, *, ratio: float | None = None, seed: int | None = None) -> None:
        self.k, self.ratio = _validate_budget(k, ratio, "RandomK")
        self._randomness = _SeededRandomness(seed)

    @property
    def seed(self) -> int | None:
        return self._randomness.seed

    def k_for(self, numel: int) -> int:
        return _k_from_budget(self.k, self.ratio, numel)

    def __call__(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> SparseTensor:
        x = _check_flat_float(x, "RandomK")
        gen = self._randomness.generator(x.device, generator)
        idx = _uniform_subset(x.numel(), self.k_for(x.numel()), x.device, gen)
        return SparseTensor(idx, x[idx], x.numel())

    def __repr__(self) -> str:
        budget = f"k={self.k}" if self.k is not None else f"ratio={self.ratio}"
        return f"RandomK({budget}, seed={self.seed})"


@register_compressor("rtopk", aliases=("rtop-k", "r-topk"))
class RTopK(_FromConfig):
    """rTop-k (Barnes et al., Definition 3): ``k`` uniform positions among the top-``r`` magnitudes.

    ``rTop_k(w)_i = w_i`` for ``i`` in ``U``, 0 elsewhere, where ``U`` is a
    uniformly random ``k``-subset of the indices of the ``r`` largest ``|w_i|``
    (``1 <= k <= r <= d``).

    ``r`` is given directly, or by ``n_workers`` as the paper's choice
    ``k / r = 1 / n`` (rtopk-statistical-estimation.txt line 241), i.e.
    ``r = n_workers * k``; exactly one of the two is required. ``r`` is capped
    at ``d`` (then rTop-k is random-k). ``k`` comes from ``k`` or ``ratio``
    as in :class:`TopK`. ``seed`` / ``generator=`` as in :class:`RandomK`.
    Config name ``"rtopk"``.
    """

    config_params = {"k": _as_int, "ratio": _as_float, "r": _as_int, "n_workers": _as_int, "seed": _as_optional_int}

    def __init__(
        self,
        k: int | None = None,
        *,
        ratio: float | None = None,
        r: int | None = None,
        n_workers: int | None = None,
        seed: int | None = None,
        check_finite: bool = True,
    ) -> None:
        self.k, self.ratio = _validate_budget(k, ratio, "RTopK")
        if (r is None) == (n_workers is None):
            raise ValueError(
                f"RTopK: give exactly one of r (top-r pool size) or n_workers (r = n_workers * k, "
                f"the paper's k/r = 1/n), got r={r!r}, n_workers={n_workers!r}"
            )
        if r is not None:
            if not _is_int(r) or r < 1:
                raise ValueError(f"RTopK: r must be an int >= 1, got {r!r}")
            if self.k is not None and r < self.k:
                raise ValueError(f"RTopK: need k <= r, got k={self.k}, r={r}")
        if n_workers is not None and (not _is_int(n_workers) or n_workers < 1):
            raise ValueError(f"RTopK: n_workers must be an int >= 1, got {n_workers!r}")
        self.r = None if r is None else int(r)
        self.n_workers = None if n_workers is None else int(n_workers)
        self.check_finite = bool(check_finite)
        self._randomness = _SeededRandomness(seed)

    @property
    def seed(self) -> int | None:
        return self._randomness.seed

    def k_for(self, numel: int) -> int:
        return _k_from_budget(self.k, self.ratio, numel)

    def r_for(self, numel: int) -> int:
        """Size of the top-``r`` pool for length ``numel``: ``min(d, r or n_workers * k)``, at least ``k``."""
        k = self.k_for(numel)
        r = self.r if self.r is not None else self.n_workers * k
        return max(k, min(r, numel))

    def __call__(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> SparseTensor:
        x = _check_flat_float(x, "RTopK")
        numel = x.numel()
        k, r = self.k_for(numel), self.r_for(numel)
        pool = magnitude_topk_indices(x, r, check_finite=self.check_finite)
        gen = self._randomness.generator(x.device, generator)
        # pool and the subset positions are both sorted, so idx is sorted
        idx = pool[_uniform_subset(r, k, x.device, gen)]
        return SparseTensor(idx, x[idx], numel)

    def __repr__(self) -> str:
        budget = f"k={self.k}" if self.k is not None else f"ratio={self.ratio}"
        pool = f"r={self.r}" if self.r is not None else f"n_workers={self.n_workers}"
        return f"RTopK({budget}, {pool}, seed={self.seed})"


@register_compressor("hard-threshold", aliases=("hardthreshold", "threshold"))
class HardThreshold(_FromConfig):
    """Hard-threshold sparsifier ``C_lambda`` (Sahu et al.): keep ``S = {i : |x_i| >= lambda}``.

    A fixed ``lambda >= 0`` gives a variable number of entries per round; the
    paper's rule to pick ``lambda`` for a top-k budget is
    :func:`hard_threshold_for_topk`. The comparison is exact in real
    arithmetic with ``lambda`` as given (no rounding of ``lambda`` to
    ``x.dtype`` can admit an entry below it). ``lambda = 0`` keeps every entry.
    NaN/Inf in ``x`` raise ``ValueError`` (free: they always pass the threshold
    and are checked on the kept set). Deterministic: ``generator`` is ignored.

    Config name ``"hard-threshold"`` with ``lam``, or ``k`` for the paper's
    ``lam = 1 / (2 sqrt(k))`` (:func:`hard_threshold_for_topk`).

    It thresholds what it is given. The paper's worker sends ``gamma *
    C_lambda(p / gamma)``, ``p = e + gamma g``, with ``lambda`` in gradient units:
    on ``p`` itself that is ``C_(gamma lambda)(p)``, which is what
    :class:`~fl_sparse.strategies.HardThresholdSGD` tells its clients.
    """

    config_params = {"lam": _as_float, "k": _as_int}

    @classmethod
    def from_config(cls, **params: Any) -> HardThreshold:
        args = cls._convert_config(params)
        if ("lam" in args) == ("k" in args):
            raise ValueError("hard-threshold: give exactly one of lam (threshold) or k (lam = 1/(2 sqrt k))")
        return cls(args["lam"] if "lam" in args else hard_threshold_for_topk(args["k"]))

    def __init__(self, lam: float, *, check_finite: bool = True) -> None:
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
            raise ValueError(f"HardThreshold: lam must be a number, got {lam!r}")
        lam = float(lam)
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"HardThreshold: lam must be finite and >= 0, got {lam}")
        self.lam = lam
        self.check_finite = bool(check_finite)

    def k_for(self, numel: int) -> int:
        """No fixed budget: up to every entry (``numel``)."""
        return _k_from_budget(None, 1.0, numel)

    def __call__(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> SparseTensor:
        x = _check_flat_float(x, "HardThreshold")
        xw = _widen(x)
        raw, abs_mask, inf_key = _key_view(xw)
        t_key = _key_of_threshold(self.lam, xw.dtype)
        idx = _positions_at_least(xw, t_key)
        if self.check_finite and idx.numel():
            if bool(torch.bitwise_and(raw[idx], abs_mask).max() >= inf_key):
                _raise_non_finite("HardThreshold")
        return SparseTensor(idx, x[idx], x.numel())

    def __repr__(self) -> str:
        return f"HardThreshold(lam={self.lam!r})"


@register_compressor("none", aliases=("identity", "dense"))
class Identity(_FromConfig):
    """No compression: every entry, as a SparseTensor (config name ``"none"``)."""

    def k_for(self, numel: int) -> int:
        """Every entry: ``numel``."""
        return _k_from_budget(None, 1.0, numel)

    def __call__(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> SparseTensor:
        x = _check_flat_float(x, "Identity")
        return SparseTensor(torch.arange(x.numel(), device=x.device), x.clone(), x.numel())

    def __repr__(self) -> str:
        return "Identity()"


# ============================================================ budget rules
def hard_threshold_for_topk(
    k: int,
    *,
    sigma: float = 0.25,
    zeta_sq: float = 0.0,
    d: int | None = None,
    m: float = 0.0,
) -> float:
    """Hard threshold ``lambda`` that the hard-threshold paper pairs with a Top-k budget ``k``.

    hard-threshold-total-error.txt, Appendix D (lines 1033-1058): comparing the
    compression terms of the non-convex bounds for hard-threshold
    (``2 L^2 d lambda^2``, Theorem 6 with ``kappa^2 = d lambda^2``) and Top-k
    (``8 L^2 d / k ((2d/k + M) zeta^2 + sigma^2)``, Theorem 7 with
    ``delta = k/d``) gives, eq. (29),

        lambda <= (2 / sqrt(k)) * sqrt((2 d / k + M) zeta^2 + sigma^2),

    and with homogeneous data (``zeta^2 = 0``) and ``sigma ~ 1/4`` the
    suggested value (line 1056, and §6 line 287)

        lambda = 1 / (2 sqrt(k)).

    ``k`` is an absolute count of entries of the whole model (the paper's
    Table 5: ResNet-18, ``k_min = 0.1 %`` of d = 11.17 M gives 4.73e-3), and
    ``lambda`` is an absolute magnitude in gradient units -- not relative to
    ``||g||``, and compared with ``p / gamma`` (Algorithm 1), not with the
    learning-rate-scaled ``p``. The defaults give ``1 / (2 sqrt(k))``; ``zeta_sq > 0`` (data
    heterogeneity, Assumption 4) needs ``d``; ``m`` is ``M`` of Assumption 3.
    """
    if not _is_int(k) or k < 1:
        raise ValueError(f"hard_threshold_for_topk: k must be an int >= 1, got {k!r}")
    if not (sigma >= 0 and zeta_sq >= 0 and m >= 0):
        raise ValueError("hard_threshold_for_topk: sigma, zeta_sq and m must be >= 0")
    if zeta_sq > 0 and (d is None or not _is_int(d) or d < k):
        raise ValueError("hard_threshold_for_topk: zeta_sq > 0 needs the model size d >= k")
    heterogeneity = (2.0 * d / k + m) * zeta_sq if zeta_sq > 0 else 0.0
    return 2.0 / math.sqrt(k) * math.sqrt(heterogeneity + sigma * sigma)


def adaptive_k_t_hat(
    *,
    d: int,
    k: float,
    eta: float,
    mu: float,
    L: float,
    sigma_sq: float,
    f0: float,
    T: int | None = None,
    error_compensation: bool = True,
) -> int:
    """AdapTop-K turning point ``t_hat``: the round where the coefficient ``A_t B_t`` is smallest.

    adaptive-topk.txt, Lemma 3 (lines 232-237, no error compensation) and
    Lemma 8 (lines 394-398, with error compensation): ``A_t B_t`` with
    ``A_t = alpha / t + beta`` and ``B_t = B^(T-1-t)`` decreases for
    ``t < t_hat`` and increases after, where

        t_hat = floor((-alpha + sqrt(Delta)) / (2 beta)),
        Delta = alpha^2 - 4 alpha beta / ln B.

    Constants (Lemma 2, lines 209-214 / Lemma 7, lines 363-372):

    * without EC: ``alpha = 2 d F(w_0) / (k eta)``, ``beta = d sigma^2 (eta L + 1) / k``,
      ``B = 1 - eta mu k / d``;
    * with EC: ``alpha = 2 d eta F(w_0) / k``, ``beta = d sigma^2 eta^2 (eta L + 1) / k``,
      ``B = 1 - eta mu / 2``.

    (``beta = 0``, i.e. no gradient noise, is the limit ``t_hat = floor(-1 / ln B)``.)
    The paper treats ``t_hat`` as a hyper-parameter of Algorithms 1/2; this is
    its formula. With ``T`` given the result is clipped to ``[0, T]`` (a
    minimum beyond the horizon means the coefficient only decreases).
    """
    if not (d >= 1 and k > 0 and eta > 0 and mu > 0 and L >= 0 and sigma_sq >= 0 and f0 >= 0):
        raise ValueError("adaptive_k_t_hat: need d >= 1, k > 0, eta > 0, mu > 0, L >= 0, sigma_sq >= 0, f0 >= 0")
    if error_compensation:
        alpha = 2.0 * d * eta * f0 / k
        beta = d * sigma_sq * eta * eta * (eta * L + 1.0) / k
        B = 1.0 - eta * mu / 2.0
    else:
        alpha = 2.0 * d * f0 / (k * eta)
        beta = d * sigma_sq * (eta * L + 1.0) / k
        B = 1.0 - eta * mu * k / d
    if not 0.0 < B < 1.0:
        raise ValueError(f"adaptive_k_t_hat: need 0 < B < 1 for the contraction factor, got B = {B}")
    log_b = math.log(B)
    if beta == 0.0:
        t_hat = math.floor(-1.0 / log_b)
    elif alpha == 0.0:
        t_hat = 0  # Delta = 0: (-0 + 0) / (2 beta)
    else:
        # (-alpha + sqrt(Delta)) / (2 beta), times (alpha + sqrt(Delta)) / (alpha + sqrt(Delta)):
        #   = (Delta - alpha^2) / (2 beta (alpha + sqrt(Delta))) = (-2 / ln B) / (1 + sqrt(1 + 4 beta / (alpha (-ln B)))).
        # The same number without the cancellation of -alpha + sqrt(Delta) (alpha^2 >> 4 alpha beta / |ln B|
        # gave 0 instead of about -1/ln B) and without overflow of alpha^2.
        ratio = beta / alpha / -log_b
        t_hat = math.floor((-2.0 / log_b) / (1.0 + math.sqrt(1.0 + 4.0 * ratio)))
    t_hat = max(0, t_hat)
    return min(t_hat, T) if T is not None else t_hat


def _adaptive_k_check(T: int, k: int, gamma: float, t_hat: int) -> None:
    if not _is_int(T) or T < 1:
        raise ValueError(f"AdapTop-K: T must be an int >= 1, got {T!r}")
    if not _is_int(k) or k < 1:
        raise ValueError(f"AdapTop-K: k must be an int >= 1, got {k!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"AdapTop-K: gamma must be in [0, 1] (k_t = (1 - gamma) k >= 0), got {gamma!r}")
    if not _is_int(t_hat) or not 0 <= t_hat <= T:
        raise ValueError(f"AdapTop-K: t_hat must be an int in [0, T={T}], got {t_hat!r}")


def adaptive_k_schedule(t: int, T: int, k: int, gamma: float, t_hat: int) -> int:
    """AdapTop-K sparsity level ``k_t`` for round ``t`` of ``T`` (average budget ``k`` per round).

    adaptive-topk.txt eq. (21) (lines 240-247; identical eq. (36) with error
    compensation, lines 401-408; Algorithm 1 lines 277-281):

        k_t = (1 + gamma) k   for t in [0, t_hat/2)  or  t in [(t_hat + T)/2, T - 1]
        k_t = (1 - gamma) k   for t in [t_hat/2, (t_hat + T)/2)

    i.e. more early and late, less in the middle, with ``t_hat`` the round
    where the gradient-bound coefficient ``A_t B_t`` is smallest (a
    hyper-parameter; its formula is :func:`adaptive_k_t_hat`). The paper's
    budget constraint is ``sum_t k_t <= K = T k`` (eq. (4)/(15): ``sum_t n_t
    <= 0``), met because each phase lasts half of the training.

    Integer rounds make two adjustments, both keeping ``sum_t k_t == T k``
    exactly:

    * ``k_hi = round((1 + gamma) k)`` and ``k_lo = 2k - k_hi`` (so each
      high/low pair sums to ``2k``);
    * the two phases contain ``ceil(t_hat/2) + T - ceil((t_hat+T)/2)`` and
      ``ceil((t_hat+T)/2) - ceil(t_hat/2)`` integer rounds, equal when ``T``
      is even (the paper's experiments: T = 3000, 7000, 24000); for odd ``T``
      they differ by one, and the one unpaired round gets exactly ``k``
      (``n_t = 0``): when the high phases have the extra round, the first
      late round, or the last early one if there is no late phase (t̂ ≥ T − 1);
      when the low phase has it, its last round.
    """
    _adaptive_k_check(T, k, gamma, t_hat)
    _adaptive_k_check_round(t, T)
    k_hi, k_lo, low_start, late_start, neutral = _adaptive_phases(int(T), int(k), gamma, int(t_hat))
    t, k = int(t), int(k)
    if t == neutral:
        return k
    return k_lo if low_start <= t < late_start else k_hi


def _adaptive_k_check_round(t: int, T: int) -> None:
    if not _is_int(t) or not 0 <= t < T:
        raise ValueError(f"AdapTop-K: round t must be an int in [0, T={T}), got {t!r}")


def _adaptive_phases(T: int, k: int, gamma: float, t_hat: int) -> tuple[int, int, int, int, int]:
    """``(k_hi, k_lo, low_start, late_start, neutral)`` of :func:`adaptive_k_schedule` (validated args).

    Rounds ``[0, low_start)`` and ``[late_start, T)`` get ``k_hi``, rounds
    ``[low_start, late_start)`` get ``k_lo``, except round ``neutral`` (``-1``:
    none), which gets ``k``.
    """
    k_hi = math.floor((1.0 + gamma) * k + 0.5)
    k_lo = 2 * k - k_hi
    low_start = -(-t_hat // 2)  # ceil(t_hat / 2): first round of the low phase
    late_start = -(-(t_hat + T) // 2)  # ceil((t_hat + T) / 2): first round of the late high phase
    n_high = low_start + (T - late_start)
    n_low = late_start - low_start
    if n_high == n_low + 1:
        # one high round too many: neutralise the first late one (or, if the
        # late phase is empty, the last early one)
        neutral = late_start if late_start < T else low_start - 1
    elif n_low == n_high + 1:
        neutral = late_start - 1  # last round of the low phase
    else:
        neutral = -1
    return k_hi, k_lo, low_start, late_start, neutral


def _adaptive_k_tail_sum(t: int, T: int, k: int, gamma: float, t_hat: int) -> int:
    """``sum(adaptive_k_schedule(s, T, k, gamma, t_hat) for s in range(t, T))`` in O(1)."""
    k_hi, k_lo, low_start, late_start, neutral = _adaptive_phases(T, k, gamma, t_hat)
    n_low = max(0, late_start - max(t, low_start))
    n_high = (T - t) - n_low
    total = n_high * k_hi + n_low * k_lo
    if neutral >= t:
        total += k - (k_lo if low_start <= neutral < late_start else k_hi)
    return total


def adaptive_k_budgeted(
    t: int, T: int, k: int, gamma: float, t_hat: int, spent: int, *, d: int | None = None
) -> int:
    """AdapTop-K ``k_t`` for round ``t`` (0-based) re-planned from the ``spent`` entries of rounds ``0..t-1``.

    Paper: M. Ruan, G. Yan, Y. Xiao, L. Song, W. Xu, "Adaptive Top-K in SGD
    for Communication-Efficient Distributed Learning in Multi-Robot
    Collaboration" (adaptive-topk.txt): schedule eq. (21) / (36), budget
    constraint ``sum_t k_t <= K = T k`` (eq. (4), (15)).

    :func:`adaptive_k_schedule` assumes ``t_hat`` is fixed for the whole run.
    When ``t_hat`` is only estimated after some rounds (the paper's formula
    needs ``F(w_0)``, known after round 1), the rounds already played used a
    provisional ``t_hat`` and the fixed schedule no longer adds up to ``T k``
    (d = 20,000, ratio 0.01, T = 5: provisional ``t_hat = T`` then 0 gives
    300 + 100 + 200 + 300 + 300 = 1,200). Here the remaining budget
    ``B = T k - spent`` is spread over rounds ``t..T-1`` in proportion to the
    paper's schedule for those rounds under the current ``t_hat`` (its
    ``(1 +- gamma) k`` shape): ``k_t = round(B w_t / sum_{s >= t} w_s)``,
    rounded half up in exact integer arithmetic, then clipped to
    ``[max(1, B - c (R - 1)), min(c, B - (R - 1))]`` with ``R = T - t`` rounds
    left and per-round cap ``c = min(2k, d)`` (``2k >= (1 + gamma) k``, the
    most the paper ever sends; ``d`` if given). Every later call re-plans, so
    rounding is absorbed as it goes and the last round takes exactly what is left.

    Guarantee: if ``spent`` is the sum of this function's earlier results
    (whatever ``t_hat`` each call used -- changed once after round 0, at any
    round, or every round), then ``sum_{t<T} k_t == T k`` exactly and
    ``1 <= k_t <= c`` for every round (so ``k_t <= d`` when ``d`` is given).
    Proof sketch: ``R <= B <= c R`` holds at ``t = 0`` (``1 <= k <= c``), and
    the clip keeps it; at ``R = 1`` the clip range is ``{B}``.

    Normal case: with one ``t_hat`` from the start and ``spent`` following
    the schedule, the result equals :func:`adaptive_k_schedule` exactly (then
    ``B`` equals the schedule's remaining sum, so each share is exact), as
    long as that schedule lies in ``[1, c]``. It does not when
    ``k_lo = 2k - round((1 + gamma) k) == 0`` (``gamma`` near 1, or ``k = 1``
    with ``gamma >= 0.5``) -- then every round still gets at least one entry
    (top-k of 0 entries is not a round a strategy can run) and the high
    rounds give the difference back -- or when ``k_hi > d``.

    Budget too small (only if ``spent`` is *not* what earlier calls returned):
    ``B <= 0`` gives 0 (the budget is exhausted or overspent, the total then
    cannot be ``T k``); ``0 < B < R`` gives 1 (one entry per round until the
    budget runs out); ``B > c R`` gives ``c`` (the total falls short). The
    result is never negative.
    """
    _adaptive_k_check(T, k, gamma, t_hat)
    _adaptive_k_check_round(t, T)
    if not _is_int(spent) or spent < 0:
        raise ValueError(f"AdapTop-K: spent must be an int >= 0, got {spent!r}")
    t, T, k, t_hat, spent = int(t), int(T), int(k), int(t_hat), int(spent)
    cap = 2 * k
    if d is not None:
        if not _is_int(d) or d < k:
            raise ValueError(f"AdapTop-K: d must be an int >= k = {k}, got {d!r}")
        cap = min(cap, int(d))
    rounds_left = T - t
    budget = T * k - spent
    if budget <= 0:
        return 0
    if budget < rounds_left:
        return 1
    weight = adaptive_k_schedule(t, T, k, gamma, t_hat)
    weight_sum = _adaptive_k_tail_sum(t, T, k, gamma, t_hat)
    if weight_sum <= 0:  # every remaining round has weight 0 (k_lo == 0): split evenly
        weight, weight_sum = 1, rounds_left
    share = (2 * budget * weight + weight_sum) // (2 * weight_sum)  # round(B w / S), half up, exact
    low = max(1, budget - cap * (rounds_left - 1))
    high = min(cap, budget - (rounds_left - 1))
    return min(max(share, low), high)


def adaptive_k_rounds(T: int, k: int, gamma: float, t_hat: int) -> list[int]:
    """The whole AdapTop-K schedule ``[k_0, ..., k_{T-1}]``; sums to ``T k`` exactly."""
    _adaptive_k_check(T, k, gamma, t_hat)
    return [adaptive_k_schedule(t, T, k, gamma, t_hat) for t in range(T)]


# ============================================================ factory
def build_compressor(name: str, **params: Any) -> Compressor:
    """Build a registered compressor from plain config values (as they arrive in a Flower ConfigRecord).

    ============================  =============================================
    name                          params
    ============================  =============================================
    ``"topk"``                    ``k`` (int) or ``ratio`` (float in (0, 1])
    ``"randomk"``                 ``k`` or ``ratio``; ``seed`` (optional)
    ``"rtopk"``                   ``k`` or ``ratio``; ``r`` or ``n_workers``; ``seed``
    ``"hard-threshold"``          ``lam`` (>= 0), or ``k``: ``lam = 1/(2 sqrt k)``
    ``"none"``                    (identity: every entry)
    ============================  =============================================

    plus whatever else is in :data:`COMPRESSORS` (:func:`register_compressor`).
    Names are case-insensitive, ``_`` and ``-`` are interchangeable, and
    ``top-k``, ``random-k``, ``rtop-k``, ``identity`` are accepted aliases.
    Numbers may be given as strings (``"0.001"``); integer parameters accept
    integral floats (``100.0``). ``None`` values are treated as absent.
    Anything else -- unknown name, unknown or missing parameter, bad value --
    raises ``ValueError`` naming the problem.
    """
    if not isinstance(name, str):
        raise ValueError(f"compressor name must be a string, got {name!r}")
    key = _normalise_name(name)
    key = _ALIASES.get(key, key)
    cls = COMPRESSORS.get(key)
    if cls is None:
        aliases = f" (aliases: {', '.join(sorted(_ALIASES))})" if _ALIASES else ""
        raise ValueError(
            f"unknown compressor {name!r}; known in this process: {', '.join(COMPRESSORS)}{aliases}. A compressor "
            "registered with register_compressor exists only in the processes that ran the registration: put it in "
            "a module that the ClientApp's module imports too (clients run in other processes: Ray actors, SuperNodes)"
        )
    factory = getattr(cls, "from_config", None)
    try:
        if factory is not None:
            return factory(**params)
        args = {p: v for p, v in params.items() if v is not None}
        _check_signature(cls, args)
        return cls(**args)
    except ValueError as err:
        raise ValueError(f"compressor {key!r}: {err}") from None


def _check_signature(cls: type, args: dict[str, Any]) -> None:
    """``ValueError`` naming the parameter if ``cls(**args)`` would not bind."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):  # no introspectable signature: let the call decide
        return
    try:
        sig.bind(**args)
    except TypeError as err:
        takes = [p.name for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        raise ValueError(f"{err}; {cls.__name__} takes {takes or 'no parameters'}") from None
