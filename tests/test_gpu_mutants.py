"""CUDA checks of the accelerator-only lines of fl_sparse.compressors / fl_sparse.quantize.

Written for the survivors of the GPU mutation run of 2026-11-27 (.gpumut/): each check is a
helper taking ``device``, run on CPU everywhere and on CUDA where there is one (the CI machine
has none: its CUDA cases skip there).
Inputs are fixed and tie-free where a selection is compared, so the expected sets are exact.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from fl_sparse.compressors import HardThreshold, RandomK, RTopK, TopK, _uniform_subset, magnitude_topk_indices
from fl_sparse.quantize import FractionalQuantizer, ScaledSign

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

TOPK_NON_FINITE = r"^TopK: input contains NaN or Inf$"
QUANT_NON_FINITE = "^" + re.escape("values contain NaN or Inf (after casting to float32)") + "$"


def _distinct_randn(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    assert torch.unique(x.abs()).numel() == n  # no magnitude ties: the top-k set is unique
    return x


def _reference_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted positions of the k largest |x| (float64 magnitudes on CPU, stable: ties to the lower index)."""
    mags = x.detach().cpu().double().abs().numpy()
    order = np.argsort(-mags, kind="stable")[:k]
    return torch.from_numpy(np.sort(order)).to(torch.int64)


def _same_device(t: torch.Tensor, device: str) -> bool:
    return t.device.type == torch.device(device).type


# ------------------------------------------------------------- magnitude_topk_indices
def check_topk_k0_stays_on_device(device: str) -> None:
    x = _distinct_randn(7, 0).to(device)
    for k in (0, -3):
        idx = magnitude_topk_indices(x, k)
        assert idx.dtype == torch.int64 and idx.shape == (0,) and _same_device(idx, device)
    empty = magnitude_topk_indices(torch.empty(0, device=device), 5)  # k clipped to d = 0
    assert empty.dtype == torch.int64 and empty.shape == (0,) and _same_device(empty, device)


def check_topk_rejects_inf_not_only_nan(device: str) -> None:
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        base = _distinct_randn(1000, 1, torch.float64).to(dtype)
        for pos, bad in ((17, float("inf")), (400, float("-inf")), (999, float("nan"))):
            x = base.clone()
            x[pos] = bad
            x = x.to(device)
            with pytest.raises(ValueError, match=TOPK_NON_FINITE):
                magnitude_topk_indices(x, 5)
            with pytest.raises(ValueError, match=TOPK_NON_FINITE):
                TopK(5)(x)
            with pytest.raises(ValueError, match=TOPK_NON_FINITE):
                RTopK(k=2, r=6, seed=0)(x)
            if bad != bad:  # NaN: its rank without the check is not specified here
                continue
            got = magnitude_topk_indices(x, 5, check_finite=False)
            assert _same_device(got, device) and got.dtype == torch.int64
            assert pos in got.cpu().tolist()  # +-Inf is the largest magnitude
    # both infinities at once and a NaN-free vector otherwise: still an error
    x = _distinct_randn(300, 2).to(device)
    x[3], x[250] = float("inf"), float("-inf")
    with pytest.raises(ValueError, match=TOPK_NON_FINITE):
        magnitude_topk_indices(x, 300)


def check_topk_exact_set(device: str) -> None:
    for n, dtype in ((1000, torch.float32), (4097, torch.float64), (70_000, torch.float64)):
        x = _distinct_randn(n, 3, dtype)
        for k in (1, 5, n // 7, n - 1, n):
            got = magnitude_topk_indices(x.to(device), k)
            assert _same_device(got, device) and got.dtype == torch.int64
            assert torch.equal(got.cpu(), _reference_topk(x, k))
            s = TopK(k)(x.to(device))
            assert torch.equal(s.indices.cpu(), _reference_topk(x, k))
            assert torch.equal(s.values.cpu(), x[_reference_topk(x, k)])


# ------------------------------------------------------------- HardThreshold (_positions_at_least)
def check_hard_threshold_keeps_entries_equal_to_lambda(device: str) -> None:
    below = float(np.nextafter(np.float32(0.5), np.float32(0)))
    above = float(np.nextafter(np.float32(0.5), np.float32(1)))
    for dtype in (torch.float32, torch.float64, torch.float16):
        x = torch.tensor([0.5, -0.5, 0.25, 1.0, 0.0, below, -above, 3.0, -0.0], dtype=dtype)
        # in float16 both float32 neighbours of 0.5 round to 0.5 itself
        want = [0, 1, 3, 5, 6, 7] if dtype == torch.float16 else [0, 1, 3, 6, 7]
        s = HardThreshold(0.5)(x.to(device))
        assert _same_device(s.indices, device) and s.indices.dtype == torch.int64
        assert s.indices.cpu().tolist() == want
        assert torch.equal(s.values.cpu(), x[want])
        everything = HardThreshold(0.0)(x.to(device))  # lambda = 0 keeps every entry, zeros included
        assert everything.indices.cpu().tolist() == list(range(x.numel()))
    # a threshold equal to one entry's magnitude, in a longer vector
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(4))
    lam = float(x[123].abs())
    s = HardThreshold(lam)(x.to(device))
    want = torch.nonzero(x.double().abs() >= lam).flatten()
    assert 123 in want.tolist()
    assert torch.equal(s.indices.cpu(), want)
    x[77] = float("inf")
    with pytest.raises(ValueError, match=r"^HardThreshold: input contains NaN or Inf$"):
        HardThreshold(lam)(x.to(device))


# ------------------------------------------------------------- RandomK / RTopK (_uniform_subset, generators)
def check_randomk_full_budget_on_device(device: str) -> None:
    x = _distinct_randn(6, 5).to(device)
    for rk in (RandomK(k=10, seed=0), RandomK(k=6), RandomK(ratio=1.0, seed=3)):
        s = rk(x)
        assert _same_device(s.indices, device) and _same_device(s.values, device)
        assert s.indices.cpu().tolist() == list(range(6))
        assert torch.equal(s.values, x)
    s = RTopK(k=6, r=6, seed=0)(x)
    assert s.indices.cpu().tolist() == list(range(6)) and _same_device(s.indices, device)
    dev = torch.device(device)
    for n, k in ((5, 9), (5, 5), (10, 0), (10, -1), (0, 0)):
        idx = _uniform_subset(n, k, dev, None)
        assert idx.dtype == torch.int64 and _same_device(idx, device)
        assert idx.cpu().tolist() == list(range(min(max(k, 0), n)))


def _draws(make, xs, order):
    """Indices of successive calls of one instance ``make()`` on the devices in ``order``."""
    c = make()
    return [(d, c(xs[d]).indices.cpu()) for d in order]


def check_seeded_streams_are_per_device(devices: list[str]) -> None:
    """One seeded instance used on several devices draws, per device, what a fresh one would."""
    n, k = 1000, 5  # 4 k <= n: the CPU rejection path; randperm on accelerators
    base = _distinct_randn(n, 6)
    xs = {d: base.to(d) for d in devices}
    for make in (lambda: RandomK(k=k, seed=11), lambda: RTopK(k=k, r=40, seed=11)):
        alone = {d: [t for _, t in _draws(make, xs, [d] * 3)] for d in devices}
        for order in (devices * 3, devices[::-1] * 3):
            seen = {d: [] for d in devices}
            for d, t in _draws(make, xs, order):
                seen[d].append(t)
            for d in devices:
                assert all(torch.equal(a, b) for a, b in zip(seen[d], alone[d], strict=True)), (d, order)


def check_generator_override(device: str) -> None:
    x = _distinct_randn(1000, 7).to(device)
    for cls in (lambda s: RandomK(k=20, seed=s), lambda s: RTopK(k=20, r=100, seed=s)):
        a = cls(1)(x, generator=torch.Generator(device=device).manual_seed(5)).indices
        b = cls(2)(x, generator=torch.Generator(device=device).manual_seed(5)).indices
        c = cls(1)(x, generator=torch.Generator(device=device).manual_seed(6)).indices
        assert torch.equal(a, b)  # the override decides, not the instance's seed
        assert not torch.equal(a, c)
        assert torch.equal(cls(1)(x).indices, cls(1)(x).indices)  # seeded: reproducible
        assert _same_device(a, device) and a.numel() == 20 and bool((a[1:] > a[:-1]).all())


# ------------------------------------------------------------- quantize
def _quantizers():
    return [*(FractionalQuantizer(bits) for bits in (2, 4, 9, 16)), ScaledSign()]


def check_quantizers_reject_non_finite(device: str) -> None:
    good = _distinct_randn(300, 8)
    for q in _quantizers():
        for dtype, pos, bad in ((torch.float32, 0, float("nan")), (torch.float32, 150, float("inf")),
                                (torch.float32, 299, float("-inf")), (torch.float64, 7, 1e300),
                                (torch.float64, 8, -1e300)):
            x = good.to(dtype).clone()
            x[pos] = bad  # 1e300 is finite in float64, Inf after the cast to float32
            with pytest.raises(ValueError, match=QUANT_NON_FINITE):
                q.encode(x.to(device))
            with pytest.raises(ValueError, match=QUANT_NON_FINITE):
                q(x.to(device))
        codes, side = q.encode(good.to(device))  # finite input still passes
        assert _same_device(codes, device) and _same_device(side, device)
        one = torch.tensor([float("nan")], device=device)
        with pytest.raises(ValueError, match=QUANT_NON_FINITE):
            q.encode(one)


def check_empty_encode_dtypes_under_float64_default(device: str) -> None:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for q in _quantizers():
            for empty in (torch.empty(0, device=device), torch.empty(0, dtype=torch.float16, device=device)):
                first, second = q.encode(empty)
                if isinstance(q, FractionalQuantizer):
                    assert first.dtype == q.code_dtype and first.shape == (0,)
                    assert second.dtype == torch.float32 and second.shape == (q.levels,)
                else:
                    assert first.dtype == torch.bool and first.shape == (0,)
                    assert second.dtype == torch.float32 and second.shape == ()
                assert _same_device(first, device) and _same_device(second, device)
                assert not bool(second.any())
                out = q(empty)
                assert out.dtype == torch.float32 and out.shape == (0,) and _same_device(out, device)
        x = _distinct_randn(500, 9).to(device)
        x[::50] = 0.0
        wide = [q.encode(x) for q in _quantizers()]
    finally:
        torch.set_default_dtype(previous)
    for q, (first, second) in zip(_quantizers(), wide, strict=True):
        ref_first, ref_second = q.encode(x)  # the same under the float32 default
        assert first.dtype == ref_first.dtype and second.dtype == ref_second.dtype == torch.float32
        assert torch.equal(first, ref_first) and torch.equal(second, ref_second)


def check_scaled_sign_decode_is_float32_on_the_signs_device(device: str) -> None:
    """``decode`` gives float32 on the signs' device, whatever dtype or device the scale comes in."""
    negative = torch.tensor([True, False, True, False]).to(device)
    for scale in (torch.tensor(0.5, dtype=torch.float64), torch.tensor([0.5], dtype=torch.float16),
                  torch.tensor(0.5).to(device)):
        out = ScaledSign().decode(negative, scale)
        assert out.dtype == torch.float32 and _same_device(out, device)
        assert out.cpu().tolist() == [-0.5, 0.5, -0.5, 0.5]


# ------------------------------------------------------------- the tests: on CPU here, on CUDA where there is one
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


@pytest.mark.parametrize("check", [
    check_topk_k0_stays_on_device,
    check_topk_rejects_inf_not_only_nan,
    check_topk_exact_set,
    check_hard_threshold_keeps_entries_equal_to_lambda,
    check_randomk_full_budget_on_device,
    check_generator_override,
    check_quantizers_reject_non_finite,
    check_empty_encode_dtypes_under_float64_default,
    check_scaled_sign_decode_is_float32_on_the_signs_device,
], ids=lambda check: check.__name__.removeprefix("check_"))
@pytest.mark.parametrize("device", DEVICES)
def test_on_each_device(check, device):
    check(device)


@needs_cuda
def test_cuda_seeded_streams_are_per_device():
    check_seeded_streams_are_per_device(["cpu", "cuda"])
