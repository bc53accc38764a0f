"""Position-code sizes and codec speed: raw vs block vs rice vs layout-aware rice, against the bounds.

Run ``python benchmarks/bench_codec.py``. For each model size d and density
phi (k = round(phi * d) positions) it prints the bits per position of every
position code, the information-theoretic bound log2(C(d, k)) / k for a support
of size k, the rice margin over that bound (target <= 0.7 bits), the block
code against the SSGD-MV paper's estimate log2(1/phi) + 2, "rice+L" (rice
given the layers as ``segments``: the segmented code when it is shorter),
and best-of-7 encode + decode milliseconds of each code (``encode_positions``
+ ``decode_positions``), with the ratio to raw measured in the same run.

Real gradient supports (the second table): a short training run of the
Fashion-MNIST MLP [784, 256, 128, 64, 10] (the package's default lr 0.1 and
batch 32, error-compensated top-k, 300 SGD steps from a seeded
initialisation), one run per density (0.1 % and 1 %). Per support: the
bound, the per-layer ideal (sum over layers of log2 C(d_l, k_l), over k: an
ideal code that knows each layer's count and takes positions inside a layer
as uniform; clustered positions let a code go below it), raw,
block, plain rice, the segmented code alone and what rice+L sends, and a
uniformly random support of the same k beside it. The issue's targets for
rice+L on the step-300 support: >= 2 bits per position below the bound at
0.1 %, >= 0.15 at 1 %; the script also checks that rice+L is never more than
8 bytes above the best other code on any support it measures.

Supports:
  uniform   -- k positions drawn uniformly at random (seeded);
  topk      -- top-k magnitudes of an i.i.d. Gaussian vector (statistically
               also uniform, but produced the way a top-k sparsifier does);
  layered   -- top-k of a Gaussian vector whose ~60 "layers" have log-normally
               spread scales, as in a real network: a clustered support.
               Reported only; the bound is for unstructured supports.

A second table times full sparse payloads (positions + values) at ResNet-18
size with each value code. Exits non-zero if the rice margin exceeds the
target on a uniform or topk support.

Timing runs with ONE torch thread unless ``--threads N`` is given: the codec
works on ~1e5-element arrays, where intra-op parallelism gains nothing, and on
an oversubscribed machine (e.g. a Flower simulation with several clients per
core) every parallel torch op waits for a preempted worker thread -- measured
up to 100x slower (270 ms instead of 5 ms for a q8 encode).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_sparse.codec import (  # noqa: E402
    POSITION_CODES,
    _plan_segmented,  # the segmented code's length even where "rice" sends plain Rice
    decode,
    decode_positions,
    encode,
    encode_positions,
    segments_of,
    wire_size,
)
from fl_sparse.sparse import SparseTensor  # noqa: E402

MODEL_SIZES = {"lenet-ish": 242_762, "mlp/cnn": 1_199_882, "resnet18": 11_173_962}
DENSITIES = (1e-2, 1e-3, 1e-4)
RICE_MARGIN_TARGET = 0.7
LAYOUT_TARGETS = {1e-3: -2.0, 1e-2: -0.15}  # rice+L minus the bound, bits per position (issue 11)
WORSE_BYTES_LIMIT = 8  # rice+L may cost at most this much more than the best other code
REPEATS = 7
SEED = 0


def log2_binomial(d: int, k: int) -> float:
    return (math.lgamma(d + 1) - math.lgamma(k + 1) - math.lgamma(d - k + 1)) / math.log(2)


def uniform_support(d: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    return torch.from_numpy(np.sort(rng.choice(d, size=k, replace=False)).astype(np.int64))


def topk_support(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(x.abs(), k, sorted=False).indices.sort().values


def layered_gaussian(d: int, rng: np.random.Generator, layers: int = 60) -> tuple[torch.Tensor, list[int]]:
    """A Gaussian vector whose layers have log-normally spread scales, and the layer sizes."""
    sizes = np.maximum(1, (rng.dirichlet(np.full(layers, 0.5)) * d).astype(np.int64))
    sizes[-1] += d - sizes.sum()  # exact total
    scales = np.repeat(np.exp(1.5 * rng.standard_normal(layers)), sizes)
    return torch.from_numpy((rng.standard_normal(d) * scales).astype(np.float32)), sizes.tolist()


def per_layer_ideal(idx: torch.Tensor, segments: list[int]) -> float:
    """sum_l log2 C(d_l, k_l) / k: an ideal code given each layer's count k_l, positions uniform inside it."""
    counts = np.diff(np.searchsorted(idx.numpy(), np.cumsum(segments)), prepend=0)
    return sum(log2_binomial(d_l, int(k_l)) for d_l, k_l in zip(segments, counts)) / idx.numel()


def best_ms(fn, repeats: int = REPEATS) -> float:
    """Best of ``repeats`` runs after a warm-up, in ms.

    The minimum, not the median (as ``timeit`` advises): on a shared machine
    the other runs measure the scheduler, not the code.
    """
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def measure_positions(idx: torch.Tensor, d: int, segments: list[int], timed: bool = True) -> dict[str, tuple]:
    """code -> (bits per position, best encode+decode ms, position bytes); "rice+L" is rice given ``segments``."""
    out = {}
    for code, segs in [(c, None) for c in POSITION_CODES] + [("rice", segments)]:
        name = code if segs is None else "rice+L"
        record = encode_positions(idx, d, code, segments=segs)
        assert torch.equal(decode_positions(record, d, segments=segs), idx)
        size = wire_size(record)
        ms = best_ms(lambda: decode_positions(encode_positions(idx, d, code, segments=segs), d, segments=segs)) \
            if timed else float("nan")
        out[name] = (size.position_bits / idx.numel(), ms, size.position_bytes)
    return out


def worse_than_best_other(m: dict[str, tuple]) -> int:
    """Bytes rice+L spends above the cheapest of raw, block and plain rice."""
    return m["rice+L"][2] - min(m[c][2] for c in POSITION_CODES)


def position_table() -> bool:
    """Print the position-code table; return True if every check (rice margin, rice+L bytes) passes."""
    rng = np.random.default_rng(SEED)
    gen = torch.Generator().manual_seed(SEED)
    header = (f"{'support':<8} {'d':>10} {'phi':>6} {'k':>7} | {'bound':>6} {'raw':>5} {'block':>6} "
              f"{'paper':>6} {'rice':>6} {'rice-bnd':>8} {'rice+L':>6} | {'raw ms':>7} {'block ms':>9} "
              f"{'rice ms':>8} {'rice+L ms':>9} {'block/raw':>9} {'rice/raw':>8}")
    print("Bits per position (exact stream bits, header excluded) and encode+decode time; rice+L is rice")
    print("given the ~60 synthetic layers of the 'layered' vector as segments (for every support of that d)")
    print(header)
    print("-" * len(header))
    ok = True
    for name, d in MODEL_SIZES.items():
        gaussian = torch.randn(d, generator=gen)
        layered, segments = layered_gaussian(d, rng)
        for phi in DENSITIES:
            k = max(1, round(phi * d))
            bound = log2_binomial(d, k) / k
            supports = {
                "uniform": uniform_support(d, k, rng),
                "topk": topk_support(gaussian, k),
                "layered": topk_support(layered, k),
            }
            for support, idx in supports.items():
                m = measure_positions(idx, d, segments)
                margin = m["rice"][0] - bound
                checked = support != "layered"
                miss = checked and margin > RICE_MARGIN_TARGET
                worse = worse_than_best_other(m) > WORSE_BYTES_LIMIT
                ok &= not miss and not worse
                flag = " MISS" if miss else ("" if checked else "  (info)")
                flag += " RICE+L WORSE" if worse else ""
                print(f"{support:<8} {d:>10} {phi:>6.0e} {k:>7} | {bound:>6.2f} {m['raw'][0]:>5.1f} "
                      f"{m['block'][0]:>6.2f} {math.log2(1 / phi) + 2:>6.2f} {m['rice'][0]:>6.2f} "
                      f"{margin:>+8.3f} {m['rice+L'][0]:>6.2f} | {m['raw'][1]:>7.2f} {m['block'][1]:>9.2f} "
                      f"{m['rice'][1]:>8.2f} {m['rice+L'][1]:>9.2f} {m['block'][1] / m['raw'][1]:>8.1f}x "
                      f"{m['rice'][1] / m['raw'][1]:>7.1f}x{flag}")
    return ok


def training_supports(phi: float, steps: int = 300, lr: float = 0.1, batch: int = 32,
                      every: int = 25) -> tuple[list[int], dict[int, torch.Tensor]]:
    """Error-compensated top-k supports of the Fashion-MNIST MLP at steps every, 2 every, ..., steps.

    Plain SGD on the seeded MLP: a = e + lr g;  s = Top_k(a);  e = a - s;  w -= s
    (the client side of every fl-sparse top-k strategy, one client, H = 1).
    """
    from fl_sparse.flat import FlatLayout
    from fl_sparse.compressors import magnitude_topk_indices
    from fl_sparse.tasks.data import load_dataset
    from fl_sparse.tasks.models import build_model

    train, _ = load_dataset("fashion-mnist")
    model = build_model("mlp-784-256-128-64-10", seed=SEED)
    layout = FlatLayout.from_state_dict(model.state_dict())
    params = [p for _, p in model.named_parameters()]
    assert [n for n, _ in model.named_parameters()] == list(layout.names), "flat order = parameter order"
    d = layout.numel
    k = max(1, round(phi * d))
    error = torch.zeros(d)
    gen = torch.Generator().manual_seed(SEED)
    supports = {}
    for step in range(1, steps + 1):
        batch_idx = torch.randint(0, train.num_examples, (batch,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(train.images[batch_idx]), train.labels[batch_idx])
        grads = torch.autograd.grad(loss, params)
        a = error + lr * torch.cat([g.reshape(-1) for g in grads])
        top = magnitude_topk_indices(a, k)
        sent = torch.zeros(d)
        sent[top] = a[top]
        error = a - sent
        with torch.no_grad():
            offset = 0
            for p in params:
                p -= sent[offset: offset + p.numel()].view_as(p)
                offset += p.numel()
        if step % every == 0:
            supports[step] = top
    return list(segments_of(layout)), supports


def real_support_table() -> bool:
    """Print the real-gradient table; return False if rice+L is ever more than a few bytes above the best."""
    try:
        runs = {phi: training_supports(phi) for phi in LAYOUT_TARGETS}
    except Exception as exc:  # noqa: BLE001 -- e.g. Fashion-MNIST neither on disk nor downloadable
        print(f"\nReal gradient supports skipped: {type(exc).__name__}: {exc}")
        return True
    print("\nReal gradient supports: Fashion-MNIST MLP [784,256,128,64,10] (8 layers, d = 242,762), "
          "error-compensated top-k, lr 0.1, batch 32")
    header = (f"{'phi':>6} {'step':>5} {'support':<8} {'k':>5} | {'bound':>6} {'ideal':>6} | {'raw':>5} "
              f"{'block':>6} {'rice':>6} {'seg':>6} {'rice+L':>6} | {'L-bound':>7} {'L-ideal':>7} {'vs best B':>9}")
    print("bits per position; ideal = per-layer ideal; seg = the segmented code alone; rice+L = what is sent")
    print(header)
    print("-" * len(header))
    ok, rng = True, np.random.default_rng(SEED + 2)
    for phi, (segments, supports) in runs.items():
        d = sum(segments)
        seg_lengths = np.asarray(segments, dtype=np.int64)
        rows = []
        for step, idx in supports.items():
            k = idx.numel()
            for support, sample in (("gradient", idx), ("uniform", uniform_support(d, k, rng))):
                m = measure_positions(sample, d, segments, timed=False)
                seg = _plan_segmented(sample.numpy(), seg_lengths).nbits / k
                bound = log2_binomial(d, k) / k
                worse = worse_than_best_other(m)
                ok &= worse <= WORSE_BYTES_LIMIT
                row = (bound, per_layer_ideal(sample, segments), m["raw"][0], m["block"][0], m["rice"][0], seg,
                       m["rice+L"][0])
                if support == "gradient":
                    rows.append(row)
                if step == max(supports) or support == "gradient":
                    print(f"{phi:>6.0e} {step:>5} {support:<8} {k:>5} | {row[0]:>6.2f} {row[1]:>6.2f} | "
                          f"{row[2]:>5.1f} {row[3]:>6.2f} {row[4]:>6.2f} {row[5]:>6.2f} {row[6]:>6.2f} | "
                          f"{row[6] - row[0]:>+7.2f} {row[6] - row[1]:>+7.2f} {worse:>+9d}")
        mean = np.mean(rows, axis=0)
        print(f"{phi:>6.0e} {'mean':>5} {'gradient':<8} {k:>5} | {mean[0]:>6.2f} {mean[1]:>6.2f} | "
              f"{mean[2]:>5.1f} {mean[3]:>6.2f} {mean[4]:>6.2f} {mean[5]:>6.2f} {mean[6]:>6.2f} | "
              f"{mean[6] - mean[0]:>+7.2f} {mean[6] - mean[1]:>+7.2f}")
        final = rows[-1]
        target = LAYOUT_TARGETS[phi]
        print(f"  step {max(supports)}: rice+L - bound = {final[6] - final[0]:+.2f} bits per position "
              f"(target <= {target:+.2f}: {'met' if final[6] - final[0] <= target else 'MISSED'}); "
              f"rice+L - per-layer ideal = {final[6] - final[1]:+.2f}")
        print("-" * len(header))
    return ok


def value_table() -> None:
    d, phi = MODEL_SIZES["resnet18"], 1e-2
    k = round(phi * d)
    x = torch.randn(d, generator=torch.Generator().manual_seed(SEED + 1))
    idx = topk_support(x, k)
    sparse = SparseTensor(idx, x[idx], d)
    print(f"\nFull sparse payload at ResNet-18 size (d={d}, k={k}): encode / decode ms (best of 7)")
    header = f"{'values':<6} {'positions':<9} | {'bytes':>9} {'bits/param':>10} | {'encode':>8} {'decode':>8} {'total':>8} {'vs raw+fp32':>11}"
    print(header)
    print("-" * len(header))
    baseline = None
    for values in ("fp32", "fp16", "q8", "q4", "q2", "sign"):
        for positions in ("raw", "rice"):
            record = encode(sparse, values, positions)
            ws = wire_size(record)
            enc = best_ms(lambda: encode(sparse, values, positions))
            dec = best_ms(lambda: decode(record, d))
            baseline = baseline or enc + dec
            print(f"{values:<6} {positions:<9} | {ws.total_bytes:>9} {8 * ws.total_bytes / d:>10.4f} | "
                  f"{enc:>8.2f} {dec:>8.2f} {enc + dec:>8.2f} {(enc + dec) / baseline:>10.1f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    torch.set_num_threads(parser.parse_args().threads)
    start = time.perf_counter()
    torch.manual_seed(SEED)
    print(f"torch threads: {torch.get_num_threads()}, CPUs: {os.cpu_count()}, "
          f"load average: {os.getloadavg()[0]:.1f}\n")
    ok = position_table()
    ok &= real_support_table()
    value_table()
    print(f"\nrice margin <= {RICE_MARGIN_TARGET} bits on uniform/topk supports and rice+L <= best other code "
          f"+ {WORSE_BYTES_LIMIT} bytes everywhere: {'met' if ok else 'MISSED'}  ({time.perf_counter() - start:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
