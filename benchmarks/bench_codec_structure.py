"""What the row structure of real gradient supports is worth to a position code, in bits per position.

Run ``python benchmarks/bench_codec_structure.py [--threads N]`` (under a
minute: two 300-step training runs, then the code lengths).

Supports: the real-gradient supports of ``bench_codec.py`` (Fashion-MNIST MLP
[784, 256, 128, 64, 10], error-compensated top-k, lr 0.1, batch 32, seeded),
at 0.1 % and 1 % density, with every step's support kept (the history code
needs the client's earlier supports). The table prints, for the step-300
support and the mean over the 12 snapshots (steps 25, 50, ..., 300), bits per
position minus the uniform bound log2 C(d, k) / k. rice+L is priced at its exact
stream length, the others at their ideal (enumerative or arithmetic-coding)
lengths; rows 2-5 count every piece of side information. In rows 2-6 each
layer's count is an order-0 exp-Golomb code and bias vectors are coded as
uniform subsets (log2 C(d_l, k_l)). The rows, for a weight matrix [R x C]
holding n positions, m_r of them in row r:

  1. rice+L (sent today): ``fl_sparse.codec.encode_positions(idx, d, "rice",
     segments=layers)``, measured by ``bench_codec.measure_positions``;
  2. row set + gamma counts: the number q of non-empty rows (log2 min(R, n)),
     which rows (log2 C(R, q)), each row's count (Elias gamma), then each row's
     columns as a uniform subset (log2 C(C, m_r), i.e. enumerative);
  3. the same with the row counts as an ideal composition of n into q
     positive parts (log2 C(n-1, q-1));
  4. the row-count vector by a sequential Dirichlet-multinomial coder
     (pseudo-count 1/4 per row), the columns uniform in each row;
  5. row 4 with pseudo-counts 1/5 + 1/2 * (decayed row hits of the client's
     earlier supports, weight 0.95^(age-1)): the receiver must hold them;
  6. only sum_r log2 C(C, m_r): row counts given free, so NOT a code; a floor
     for any code that takes columns as uniform inside a row.

Below the table: the structure of W1 at step 300 (rows and columns hit, the
fraction of its positions that were also in the step-299 support), and a
shuffle test: each of the 12 snapshot supports with every row's count kept
and its columns redrawn uniformly (seed 1); the change in row 4's cost (zero
by construction: it reads row counts only) and in rice+L's, which does see
columns.
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

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import bench_codec as bc  # noqa: E402

DENSITIES = (1e-3, 1e-2)
SNAPSHOTS = tuple(range(25, 301, 25))
ROW_ALPHA = 0.25                                   # row 4: Dirichlet pseudo-count per row
HIST_DECAY, HIST_ALPHA, HIST_LAMBDA = 0.95, 0.2, 0.5  # row 5: prior alpha + lambda * decayed hits
SHUFFLE_SEED = 1
LN2 = math.log(2)
lb = bc.log2_binomial


def eg0(x: int) -> int:
    """Bits of the order-0 exp-Golomb code of x >= 0."""
    return 2 * ((x + 1).bit_length() - 1) + 1


def gamma(x: int) -> int:
    """Bits of the Elias gamma code of x >= 1."""
    return 2 * (x.bit_length() - 1) + 1


def log2_fact(n: int) -> float:
    return math.lgamma(n + 1) / LN2


def dirichlet_multinomial(counts: np.ndarray, prior: np.ndarray) -> float:
    """-log2 of the sequential Dirichlet(prior) probability of one sequence with these symbol counts."""
    a = float(prior.sum())
    v = math.lgamma(a) - math.lgamma(counts.sum() + a)
    v += sum(math.lgamma(c + p) - math.lgamma(p) for c, p in zip(counts.tolist(), prior.tolist()))
    return -v / LN2


class Layout:
    """Layer offsets and shapes of the flat parameter vector; splits a support into per-layer local indices."""

    def __init__(self, segments: list[int], shapes: list[tuple[int, ...]]):
        assert [math.prod(s) for s in shapes] == segments
        self.d, self.shapes = sum(segments), shapes
        self.offsets = np.concatenate([[0], np.cumsum(segments)])

    def split(self, idx: np.ndarray) -> list[np.ndarray]:
        cuts = np.searchsorted(idx, self.offsets)
        return [idx[cuts[i]:cuts[i + 1]] - self.offsets[i] for i in range(len(self.shapes))]

    def row_counts(self, idx: np.ndarray) -> list[np.ndarray | None]:
        """Per layer: hits per row of a weight matrix, None for a bias vector."""
        return [np.bincount(loc // s[1], minlength=s[0]) if len(s) == 2 else None
                for loc, s in zip(self.split(idx), self.shapes)]


def structured_bits(idx: np.ndarray, layout: Layout, matrix_bits) -> float:
    """Bits per position: exp-Golomb layer counts, uniform biases, ``matrix_bits(layer, m_r, C)`` per matrix."""
    parts = layout.split(idx)
    bits = float(sum(eg0(len(p)) for p in parts))
    for layer, (loc, shape, m) in enumerate(zip(parts, layout.shapes, layout.row_counts(idx))):
        bits += lb(math.prod(shape), len(loc)) if m is None or len(loc) == 0 else matrix_bits(layer, m, shape[1])
    return bits / len(idx)


def row_set(m: np.ndarray, cols: int, counts: str) -> float:
    """Rows 2/3: q, the row set, the row counts (gamma or ideal composition), columns uniform per row."""
    n, nz = int(m.sum()), m[m > 0]
    q = len(nz)
    count_bits = sum(gamma(int(x)) for x in nz) if counts == "gamma" else lb(n - 1, q - 1)
    return math.log2(min(len(m), n)) + lb(len(m), q) + count_bits + sum(lb(cols, int(x)) for x in nz)


def row_dirichlet(m: np.ndarray, cols: int, prior: np.ndarray) -> float:
    """Rows 4/5: the row-count vector by a sequential Dirichlet-multinomial coder, columns uniform per row."""
    n = int(m.sum())
    count_vector = dirichlet_multinomial(m, prior) - log2_fact(n) + sum(log2_fact(int(x)) for x in m)
    return count_vector + sum(lb(cols, int(x)) for x in m if x)


def decayed_row_hits(layout: Layout, supports: dict[int, np.ndarray], step: int) -> list[np.ndarray | None]:
    """Per layer: row hits of the supports before ``step``, the one before it weighted 1, then 0.95, 0.95^2, ..."""
    hits = [None if len(s) == 1 else np.zeros(s[0]) for s in layout.shapes]
    for t in range(1, step):
        w = HIST_DECAY ** (step - 1 - t)
        if w < 1e-4:
            continue
        for h, m in zip(hits, layout.row_counts(supports[t])):
            if h is not None:
                h += w * m
    return hits


def codes(idx: np.ndarray, layout: Layout, segments: list[int], history) -> list[float]:
    """The six rows' bits per position for one support; ``history`` = decayed row hits before it."""
    rice_l = bc.measure_positions(torch.from_numpy(idx), layout.d, segments, timed=False)["rice+L"][0]
    return [
        rice_l,
        structured_bits(idx, layout, lambda _, m, c: row_set(m, c, "gamma")),
        structured_bits(idx, layout, lambda _, m, c: row_set(m, c, "composition")),
        structured_bits(idx, layout, lambda _, m, c: row_dirichlet(m, c, np.full(len(m), ROW_ALPHA))),
        structured_bits(idx, layout, lambda l, m, c: row_dirichlet(m, c, HIST_ALPHA + HIST_LAMBDA * history[l])),
        structured_bits(idx, layout, lambda _, m, c: sum(lb(c, int(x)) for x in m if x)),
    ]


def shuffle_columns(idx: np.ndarray, layout: Layout, rng: np.random.Generator) -> np.ndarray:
    """Keep every matrix row's count, redraw its columns uniformly without replacement."""
    out = []
    for loc, shape, off in zip(layout.split(idx), layout.shapes, layout.offsets):
        if len(shape) == 2:
            rows, cols = shape
            m = np.bincount(loc // cols, minlength=rows)
            loc = np.array([r * cols + j for r in np.nonzero(m)[0] for j in rng.choice(cols, m[r], replace=False)],
                           dtype=np.int64)
        out.append(loc + off)
    return np.sort(np.concatenate(out))


ROWS = ["1 rice+L (sent today)", "2 row set + gamma counts, cols enumerative",
        "3 row set + ideal composition counts",
        "4 rows Dirichlet a=1/4, cols uniform", "5 row 4 + history row prior (d=0.95)",
        "6 rows and counts given free (not a code)"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(bc.SEED)
    start = time.perf_counter()
    print(f"torch threads: {torch.get_num_threads()}, CPUs: {os.cpu_count()}, "
          f"load average: {os.getloadavg()[0]:.1f}\n")
    from fl_sparse.tasks.models import build_model
    shapes = [tuple(p.shape) for p in build_model("mlp-784-256-128-64-10", seed=bc.SEED).parameters()]

    diff, shuffled, notes = {}, {}, []
    for phi in DENSITIES:
        segments, supports = bc.training_supports(phi, every=1)
        layout = Layout(segments, shapes)
        supports = {t: idx.numpy() for t, idx in supports.items()}
        rng = np.random.default_rng(SHUFFLE_SEED)
        rows, shuffle_rows = [], []
        for step in SNAPSHOTS:
            idx = supports[step]
            bound = lb(layout.d, len(idx)) / len(idx)
            history = decayed_row_hits(layout, supports, step)
            real = codes(idx, layout, segments, history)
            rows.append([v - bound for v in real])
            fake = codes(shuffle_columns(idx, layout, rng), layout, segments, history)
            shuffle_rows.append([fake[3] - real[3], fake[0] - real[0]])
        diff[phi] = (rows[-1], np.mean(rows, axis=0))
        shuffled[phi] = (shuffle_rows[-1], np.mean(shuffle_rows, axis=0))
        w1, w1_prev = layout.split(supports[300])[0], layout.split(supports[299])[0]
        rows_w1 = len(np.unique(w1 // shapes[0][1]))
        cols_w1 = len(np.unique(w1 % shapes[0][1]))
        notes.append(f"{phi:.1%}: W1 at step 300 holds {len(w1)} of k = {len(supports[300])} positions; "
                     f"rows hit {rows_w1}/{shapes[0][0]}, columns hit {cols_w1}/{shapes[0][1]}; "
                     f"also in the step-299 support: {np.isin(w1, w1_prev).mean():.2f} of W1's positions "
                     f"({np.isin(supports[300], supports[299]).mean():.2f} of all)")

    print("Real gradient supports, Fashion-MNIST MLP [784,256,128,64,10] (d = 242,762), error-compensated "
          "top-k:\nbits per position minus the uniform bound log2 C(d,k)/k (negative = below the bound)")
    header = f"{'code':<42} | {'0.1% s300':>9} {'mean12':>7} | {'1% s300':>8} {'mean12':>7}"
    print(header)
    print("-" * len(header))
    for i, name in enumerate(ROWS):
        cells = " | ".join(f"{diff[phi][0][i]:>+{w}.2f} {diff[phi][1][i]:>+7.2f}" for phi, w in zip(DENSITIES, (9, 8)))
        print(f"{name:<42} | {cells}")
    print("-" * len(header))
    for name, j in (("shuffle: change in row 4", 0), ("shuffle: change in rice+L", 1)):
        cells = " | ".join(f"{shuffled[phi][0][j]:>+{w}.2f} {shuffled[phi][1][j]:>+7.2f}"
                           for phi, w in zip(DENSITIES, (9, 8)))
        print(f"{name:<42} | {cells}")
    print(f"(shuffle: each matrix row's count kept, its columns redrawn uniformly, seed {SHUFFLE_SEED}; "
          "row 4 reads row counts only)\n")
    print("Structure:")
    for line in notes:
        print("  " + line)
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
