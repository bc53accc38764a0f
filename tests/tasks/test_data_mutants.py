"""Mutation-testing survivors of fl_sparse/tasks/data.py (see docs/testing.md).

Expected values come from oracles written here (numpy, hashlib, plain loops),
never from the code under test. Synthetic labels only: no dataset files are read.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import struct

import numpy as np
import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from fl_sparse.tasks import data
from fl_sparse.tasks.data import (
    BatchStream,
    DatasetInfo,
    batch_indices,
    batches_per_epoch,
    dataset_info,
    dirichlet_min_partition_size,
    partition_indices,
)


# Hypothesis' explain phase traces every executed line: under mutmut's trampolined copy of data.py
# (40,000 lines) a failing example took minutes to explain, and read as a timeout.
PHASES = tuple(phase for phase in Phase if phase is not Phase.explain)


@pytest.fixture
def fresh_partitions(monkeypatch, tmp_path):
    """An empty disk cache and an empty in-process partition cache."""
    monkeypatch.setenv("FL_SPARSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_PARTITION_CACHE", type(data._PARTITION_CACHE)())
    return tmp_path / "cache"


# ------------------------------------------------------------------ oracles


def _perm_seed(seed: int, pid: int, epoch: int) -> int:
    """The documented seed: blake2b-64 of the big-endian (seed, partition_id, epoch), top bit cleared."""
    digest = hashlib.blake2b(struct.pack(">qqq", seed, pid, epoch), digest_size=8, person=b"fl-sparse-batch").digest()
    return int.from_bytes(digest, "big") % 2**63


def _batch_oracle(n: int, bs: int, seed: int, pid: int, step: int) -> torch.Tensor:
    per_epoch = (n + bs - 1) // bs
    epoch, b = step // per_epoch, step % per_epoch
    gen = torch.Generator().manual_seed(_perm_seed(seed, pid, epoch))
    return torch.randperm(n, generator=gen)[b * bs : min(n, (b + 1) * bs)]


def _iid_oracle(n: int, k: int, seed: int) -> list[np.ndarray]:
    """A seeded permutation cut into contiguous blocks whose sizes differ by at most one."""
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[i * (n // k) + min(i, n % k) : (i + 1) * (n // k) + min(i + 1, n % k)] for i in range(k)]


def _fill_oracle(parts: list[list[int]]) -> list[list[int]]:
    parts = [list(p) for p in parts]
    for target in [i for i, p in enumerate(parts) if not p]:
        donor = max(range(len(parts)), key=lambda i: (len(parts[i]), -i))
        parts[target] = [parts[donor].pop()]
    return parts


# ------------------------------------------------------------------ dataset lookup


def test_dataset_info_returns_the_table_and_names_unknown_datasets():
    assert dataset_info("fashion-mnist") == DatasetInfo(1, 28, 10, 60_000, 10_000, (0.2860,), (0.3530,))
    assert dataset_info("mnist") == DatasetInfo(1, 28, 10, 60_000, 10_000, (0.1307,), (0.3081,))
    assert dataset_info("cifar10").in_channels == 3 and dataset_info("cifar10").num_train == 50_000
    with pytest.raises(ValueError, match=r"^unknown dataset 'svhn'; expected one of \['cifar10', 'fashion-mnist', 'mnist'\]$") as info:
        dataset_info("svhn")
    assert info.value.__cause__ is None and info.value.__suppress_context__


# ------------------------------------------------------------------ batch order


def test_batches_per_epoch_is_the_ceiling():
    for n in range(1, 40):
        for bs in range(1, 12):
            assert batches_per_epoch(n, bs) == -(-n // bs) == int(np.ceil(n / bs))


def test_batch_indices_smallest_valid_arguments():
    assert batch_indices(1, 1, 0, 0, 0).tolist() == [0]
    assert batch_indices(1, 1, 0, 0, 5).tolist() == [0]
    assert sorted(batch_indices(3, 1, 0, 0, 0).tolist() + batch_indices(3, 1, 0, 0, 1).tolist()
                  + batch_indices(3, 1, 0, 0, 2).tolist()) == [0, 1, 2]


@settings(max_examples=40, deadline=None, phases=PHASES)
@given(
    n=st.integers(1, 120),
    bs=st.integers(1, 40),
    step=st.integers(0, 500),
    seed=st.integers(-(2**63), 2**63 - 1),
    pid=st.integers(0, 2**31),
)
def test_batch_indices_equal_the_documented_construction(n, bs, step, seed, pid):
    got = batch_indices(n, bs, seed, pid, step)
    assert got.dtype == torch.int64
    assert torch.equal(got, _batch_oracle(n, bs, seed, pid, step))


@settings(max_examples=30, deadline=None, phases=PHASES)
@given(seed=st.integers(-(2**63), 2**63 - 1), pid=st.integers(0, 2**40), epoch=st.integers(0, 2**20))
def test_permutation_seed_is_the_documented_63_bit_hash(seed, pid, epoch):
    """torch's CPU generator reads only the low 32 bits of a seed, so this pins the construction itself."""
    got = data._permutation_seed(seed, pid, epoch)
    assert got == _perm_seed(seed, pid, epoch) and 0 <= got < 2**63


def test_batch_indices_walk_epochs_in_order():
    n, bs = 10, 4  # 3 batches per epoch: 4, 4, 2
    for step in range(9):
        assert torch.equal(batch_indices(n, bs, 3, 1, step), _batch_oracle(n, bs, 3, 1, step))
    epoch1 = torch.cat([batch_indices(n, bs, 3, 1, s) for s in (3, 4, 5)])
    assert torch.equal(epoch1, torch.randperm(n, generator=torch.Generator().manual_seed(_perm_seed(3, 1, 1))))


def test_batch_indices_return_copies():
    first = batch_indices(12, 5, 0, 0, 1)
    expected = first.clone()
    first.fill_(-1)
    assert torch.equal(batch_indices(12, 5, 0, 0, 1), expected)


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 5, 0, 0, 0), r"^num_examples must be a positive integer, got 0$"),
        ((True, 5, 0, 0, 0), r"^num_examples must be a positive integer, got True$"),
        ((7.0, 5, 0, 0, 0), r"^num_examples must be a positive integer, got 7\.0$"),
        ((7, 0, 0, 0, 0), r"^batch_size must be a positive integer, got 0$"),
        ((7, True, 0, 0, 0), r"^batch_size must be a positive integer, got True$"),
        ((7, 2.0, 0, 0, 0), r"^batch_size must be a positive integer, got 2\.0$"),
        ((7, 5, 0, 0, -1), r"^step must be a non-negative integer, got -1$"),
        ((7, 5, 0, 0, True), r"^step must be a non-negative integer, got True$"),
        ((7, 5, 0, 0, 1.0), r"^step must be a non-negative integer, got 1\.0$"),
    ],
)
def test_batch_indices_validation_messages(args, message):
    with pytest.raises(ValueError, match=message):
        batch_indices(*args)


# ------------------------------------------------------------------ BatchStream


def test_batch_stream_defaults_to_partition_zero_and_has_a_repr():
    stream = BatchStream(9, 4, seed=5)
    assert stream.partition_id == 0 and stream.indices is None and stream.num_examples == 9
    for step in range(6):
        assert torch.equal(stream(step), _batch_oracle(9, 4, 5, 0, step))
        assert torch.equal(stream.positions(step), _batch_oracle(9, 4, 5, 0, step))
    assert repr(stream) == "BatchStream(num_examples=9, batch_size=4, seed=5, partition_id=0)"
    assert stream.batches_per_epoch == 3


def test_batch_stream_maps_positions_through_its_indices():
    part = torch.tensor([40, 3, 17, 8, 99], dtype=torch.int32)
    stream = BatchStream(part, 2, seed=-4, partition_id=7)
    assert stream.indices.dtype == torch.int64 and stream.num_examples == 5
    assert (stream.seed, stream.partition_id, stream.batch_size) == (-4, 7, 2)
    for step in range(7):
        assert torch.equal(stream(step), part.long()[_batch_oracle(5, 2, -4, 7, step)])
    assert torch.equal(BatchStream([6], 1, seed=0)(3), torch.tensor([6]))  # a one-example list


def test_batch_stream_window_starts_at_its_offset():
    stream = BatchStream(11, 3, seed=2, partition_id=1)
    for start in (0, 1, 6):
        win = stream.window(start)
        for h in range(5):
            assert torch.equal(win(h), _batch_oracle(11, 3, 2, 1, start + h))


@pytest.mark.parametrize(
    "indices, batch_size, message",
    [
        (0, 2, r"^need at least one example, got 0$"),
        (-3, 2, r"^need at least one example, got -3$"),
        (True, 2, r"^indices must be a non-empty 1-D tensor$"),
        (torch.tensor([], dtype=torch.int64), 2, r"^indices must be a non-empty 1-D tensor$"),
        (torch.zeros(2, 2, dtype=torch.int64), 2, r"^indices must be a non-empty 1-D tensor$"),
        (5, 0, r"^batch_size must be a positive integer, got 0$"),
        (5, True, r"^batch_size must be a positive integer, got True$"),
        (5, 2.0, r"^batch_size must be a positive integer, got 2\.0$"),
    ],
)
def test_batch_stream_validation_messages(indices, batch_size, message):
    with pytest.raises(ValueError, match=message):
        BatchStream(indices, batch_size, seed=0)


def test_batch_stream_smallest_valid_arguments():
    stream = BatchStream(1, 1, seed=0)
    assert stream(0).tolist() == [0] and stream.window(0)(0).tolist() == [0]


@pytest.mark.parametrize("start, shown", [(-1, "-1"), (True, "True"), (2.0, "2.0")])
def test_batch_stream_window_validation_messages(start, shown):
    with pytest.raises(ValueError, match=rf"^start must be a non-negative integer, got {shown}$"):
        BatchStream(4, 2, seed=0).window(start)


# ------------------------------------------------------------------ partitions: arguments


def test_dirichlet_min_partition_size_formula():
    for n in (1, 11, 12, 119, 120, 121, 600, 6000, 60_000):
        for k in (1, 2, 5, 10, 100, 1000):
            assert dirichlet_min_partition_size(n, k) == max(1, min(10, n // (12 * k))), (n, k)
    assert dirichlet_min_partition_size(60_000, 100) == 10
    assert dirichlet_min_partition_size(60_000, 1000) == 5
    assert dirichlet_min_partition_size(60_000, 10_000) == 1


def _call(**overrides):
    args = dict(dataset_name="fashion-mnist", labels=torch.arange(40) % 4, scheme="dirichlet",
                num_partitions=4, partition_id=0, alpha=0.5, seed=0)
    args.update(overrides)
    return partition_indices(args.pop("dataset_name"), args.pop("labels"), args.pop("scheme"),
                             args.pop("num_partitions"), args.pop("partition_id"), **args)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dataset_name="svhn"), r"^unknown dataset 'svhn'; expected one of \['cifar10', 'fashion-mnist', 'mnist'\]$"),
        (dict(scheme="IID"), r"^unknown partition scheme 'IID'; expected one of \('iid', 'dirichlet', 'shards'\)$"),
        (dict(num_partitions=0), r"^num_partitions must be a positive integer, got 0$"),
        (dict(num_partitions=True), r"^num_partitions must be a positive integer, got True$"),
        (dict(num_partitions=4.0), r"^num_partitions must be a positive integer, got 4\.0$"),
        (dict(partition_id=4), r"^partition_id must be an integer in \[0, 4\), got 4$"),
        (dict(partition_id=-1), r"^partition_id must be an integer in \[0, 4\), got -1$"),
        (dict(partition_id=True), r"^partition_id must be an integer in \[0, 4\), got True$"),
        (dict(partition_id=1.0), r"^partition_id must be an integer in \[0, 4\), got 1\.0$"),
        (dict(alpha=0.0), r"^alpha must be a finite number > 0, got 0\.0$"),
        (dict(alpha=float("inf")), r"^alpha must be a finite number > 0, got inf$"),
        (dict(alpha=float("nan")), r"^alpha must be a finite number > 0, got nan$"),
        (dict(labels=torch.zeros(4, 10, dtype=torch.int64)), r"^labels must be 1-D, got shape \(4, 10\)$"),
        (dict(labels=torch.arange(3)), r"^cannot split 3 examples into 4 partitions$"),
        (dict(scheme="shards", labels=torch.arange(7)), r"^cannot cut 7 examples into 2 shards for each of 4 partitions$"),
        (dict(min_partition_size=-1), r"^min_partition_size must be an integer >= 0 or None, got -1$"),
        (dict(min_partition_size=True), r"^min_partition_size must be an integer >= 0 or None, got True$"),
        (dict(min_partition_size=2.0), r"^min_partition_size must be an integer >= 0 or None, got 2\.0$"),
    ],
)
def test_partition_validation_messages(overrides, message, fresh_partitions):
    with pytest.raises(ValueError, match=message):
        _call(**overrides)


def test_partition_boundaries_are_accepted(fresh_partitions):
    labels = torch.arange(8) % 2
    # as many partitions as examples; the last partition id
    parts = [_call(scheme="iid", labels=labels, num_partitions=8, partition_id=i) for i in range(8)]
    assert sorted(int(p) for part in parts for p in part) == list(range(8))
    # exactly two examples per partition for shards
    shards = [_call(scheme="shards", labels=labels, num_partitions=4, partition_id=i) for i in range(4)]
    assert sorted(int(p) for part in shards for p in part) == list(range(8))
    # alpha is not looked at outside "dirichlet"; a minimum of 0 is allowed
    assert torch.equal(_call(scheme="iid", alpha=0.0), _call(scheme="iid", alpha=float("nan")))
    zero_min = [_call(min_partition_size=0, partition_id=i) for i in range(4)]
    assert sorted(int(p) for part in zero_min for p in part) == list(range(40))


def test_partition_defaults_are_alpha_one_half_and_seed_zero(fresh_partitions, monkeypatch):
    monkeypatch.setattr(data, "_partition_file", lambda key: None)
    labels = torch.arange(300) % 5

    def fresh(**kw):
        data._PARTITION_CACHE.clear()
        return [partition_indices("mnist", labels, "dirichlet", 3, i, min_partition_size=0, **kw) for i in range(3)]

    default, explicit = fresh(), fresh(alpha=0.5, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(default, explicit))
    assert any(not torch.equal(a, b) for a, b in zip(default, fresh(alpha=1.5, seed=0)))
    assert any(not torch.equal(a, b) for a, b in zip(default, fresh(alpha=0.5, seed=1)))


def test_one_partition_holds_everything(fresh_partitions):
    labels = torch.arange(12) % 3
    for scheme in ("iid", "dirichlet"):
        assert sorted(partition_indices("mnist", labels, scheme, 1, 0).tolist()) == list(range(12))


# ------------------------------------------------------------------ partitions: results


@pytest.mark.parametrize("n, k, seed", [(10, 3, 0), (23, 5, 7), (100, 7, 123)])
def test_iid_partitions_are_blocks_of_a_seeded_permutation(n, k, seed, fresh_partitions):
    labels = torch.arange(n) % 3
    expected = _iid_oracle(n, k, seed)
    for i in range(k):
        got = partition_indices("mnist", labels, "iid", k, i, seed=seed)
        assert got.dtype == torch.int64
        np.testing.assert_array_equal(got.numpy(), expected[i])


def test_iid_ignores_the_dirichlet_options_and_shares_one_cache_entry(fresh_partitions, monkeypatch):
    calls = []
    real = data._compute_partitions
    monkeypatch.setattr(data, "_compute_partitions", lambda *a: calls.append(a[1:]) or real(*a))
    labels = torch.arange(30) % 3
    a = partition_indices("mnist", labels, "iid", 3, 0, alpha=0.1, seed=2)
    b = partition_indices("mnist", labels, "iid", 3, 1, alpha=5.0, min_partition_size=4, self_balancing=True, seed=2)
    assert len(calls) == 1 and calls[0][0] == "iid" and calls[0][1] == 3 and calls[0][3] == 2
    np.testing.assert_array_equal(a.numpy(), _iid_oracle(30, 3, 2)[0])
    np.testing.assert_array_equal(b.numpy(), _iid_oracle(30, 3, 2)[1])


def test_dirichlet_options_reach_the_partitioner(fresh_partitions, monkeypatch):
    """Spy on flwr-datasets' DirichletPartitioner: the split is the one asked for."""
    import flwr_datasets.partitioner as fp

    seen = []
    real = fp.DirichletPartitioner

    class Spy(real):
        def __init__(self, **kwargs):
            seen.append(kwargs)
            super().__init__(**kwargs)

    monkeypatch.setattr(fp, "DirichletPartitioner", Spy)
    labels = torch.arange(400) % 4
    partition_indices("fashion-mnist", labels, "dirichlet", 5, 2, alpha=2, seed=9, min_partition_size=3, self_balancing=1)
    assert seen == [dict(num_partitions=5, partition_by="label", alpha=2.0, min_partition_size=3,
                         self_balancing=True, shuffle=True, seed=9)]
    assert type(seen[0]["alpha"]) is float and type(seen[0]["self_balancing"]) is bool
    seen.clear()
    # automatic minimum at exactly 20 examples per partition: tried first
    partition_indices("fashion-mnist", torch.arange(100) % 4, "dirichlet", 5, 0, alpha=3.0, seed=1)
    assert [s["min_partition_size"] for s in seen] == [dirichlet_min_partition_size(100, 5)] == [1]
    assert seen[0]["self_balancing"] is False
    seen.clear()
    # below 20 per partition: one draw without a minimum
    partition_indices("fashion-mnist", torch.arange(99) % 4, "dirichlet", 5, 0, alpha=3.0, seed=1)
    assert [s["min_partition_size"] for s in seen] == [0]


def test_self_balancing_changes_the_split(fresh_partitions):
    labels = torch.arange(600) % 6
    off = [partition_indices("mnist", labels, "dirichlet", 6, i, alpha=0.2, seed=4, min_partition_size=0) for i in range(6)]
    on = [partition_indices("mnist", labels, "dirichlet", 6, i, alpha=0.2, seed=4, min_partition_size=0,
                            self_balancing=True) for i in range(6)]
    assert any(not torch.equal(a, b) for a, b in zip(off, on))
    for parts in (off, on):
        assert sorted(torch.cat(parts).tolist()) == list(range(600))


def test_shards_are_shuffled_by_the_seed_and_reproducible(fresh_partitions, monkeypatch):
    monkeypatch.setattr(data, "_partition_file", lambda key: None)  # every cache miss recomputes
    labels = torch.arange(200) % 10

    def split(seed):
        data._PARTITION_CACHE.clear()
        return [partition_indices("mnist", labels, "shards", 10, i, seed=seed) for i in range(10)]

    a, b, c = split(5), split(5), split(6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))
    for parts in (a, c):  # two label-sorted shards of 10 each
        assert [len(p) for p in parts] == [20] * 10
        assert sorted(torch.cat(parts).tolist()) == list(range(200))
        assert all(len(set(labels[p].tolist())) <= 2 for p in parts)
    # shuffled within a partition too: the two shards' labels interleave (unshuffled: at most one change)
    changes = [int((labels[p][1:] != labels[p][:-1]).sum()) for p in a]
    assert max(changes) > 1


def test_dirichlet_partitions_are_shuffled_not_label_sorted(fresh_partitions):
    labels = torch.arange(300) % 3
    part = max((partition_indices("mnist", labels, "dirichlet", 3, i, alpha=5.0, seed=0) for i in range(3)),
               key=len)
    ls = labels[part]
    assert not torch.equal(ls, ls.sort().values)
    assert not torch.equal(part, part.sort().values)


def test_an_unreachable_automatic_minimum_falls_back_to_filling(fresh_partitions, monkeypatch):
    """flwr-datasets gives up on the automatic minimum: one draw without one, the empty clients filled."""
    import flwr_datasets.partitioner as fp

    seen = []
    real = fp.DirichletPartitioner

    class Spy(real):
        def __init__(self, **kwargs):
            seen.append(kwargs["min_partition_size"])
            super().__init__(**kwargs)

    monkeypatch.setattr(fp, "DirichletPartitioner", Spy)
    labels = torch.arange(200) % 10
    parts = [partition_indices("mnist", labels, "dirichlet", 10, i, alpha=0.01, seed=0) for i in range(10)]
    assert seen == [1, 0]
    assert min(len(p) for p in parts) >= 1
    assert sorted(torch.cat(parts).tolist()) == list(range(200))


def test_partitioner_errors_name_the_split(fresh_partitions):
    with pytest.raises(ValueError, match=(
        r"^cannot split 40 examples into 4 'dirichlet' partitions \(alpha=0\.001, seed=3\): .+ "
        r"\(every Dirichlet partition must get at least 10 examples: use a smaller min-partition-size "
        r"\(unset: chosen automatically\), a larger alpha or fewer partitions\)$"
    )):
        _call(labels=torch.arange(40) % 2, alpha=0.001, seed=3, min_partition_size=10)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("minimum", [None, 3])
def test_partitioner_errors_outside_dirichlet_have_no_minimum_hint(fresh_partitions, monkeypatch, minimum):
    import flwr_datasets.partitioner as fp

    class Refuses(fp.ShardPartitioner):
        def load_partition(self, partition_id):
            raise ValueError("simulated")

    monkeypatch.setattr(fp, "ShardPartitioner", Refuses)
    with pytest.raises(ValueError, match=r"^cannot split 40 examples into 4 'shards' partitions \(alpha=0\.5, seed=0\): simulated$"):
        _call(scheme="shards", min_partition_size=minimum)


def test_fill_empty_partitions_examples():
    out = [p.tolist() for p in data._fill_empty_partitions([np.array(x, dtype=np.int64) for x in ([], [1, 2], [3, 4])])]
    assert out == [[2], [1], [3, 4]]  # ties go to the lowest id, the donor's last example moves
    # exactly as many spare examples as empty partitions is enough
    out = [p.tolist() for p in data._fill_empty_partitions([np.array(x, dtype=np.int64) for x in ([], [], [7, 8, 9])])]
    assert out == [[9], [8], [7]]
    with pytest.raises(ValueError, match=r"^2 empty partitions and too few examples to give each one$"):
        data._fill_empty_partitions([np.array(x, dtype=np.int64) for x in ([], [], [7, 8])])
    original = [np.array([], np.int64), np.array([1, 2], np.int64)]
    data._fill_empty_partitions(original)
    assert original[1].tolist() == [1, 2]  # inputs are not modified


@settings(max_examples=60, deadline=None, phases=PHASES)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=8))
def test_fill_empty_partitions_matches_a_plain_loop(sizes):
    start, parts = 0, []
    for s in sizes:
        parts.append(list(range(start, start + s)))
        start += s
    empty = sum(1 for s in sizes if s == 0)
    spare = sum(s - 1 for s in sizes if s > 0)
    arrays = [np.array(p, dtype=np.int64) for p in parts]
    if empty > spare:
        with pytest.raises(ValueError, match=rf"^{empty} empty partitions and too few examples to give each one$"):
            data._fill_empty_partitions(arrays)
        return
    assert [p.tolist() for p in data._fill_empty_partitions(arrays)] == _fill_oracle(parts)


# ------------------------------------------------------------------ partitions: the process cache


def test_a_split_on_disk_is_read_back_not_recomputed(fresh_partitions, monkeypatch):
    labels = torch.arange(50) % 5
    first = [partition_indices("mnist", labels, "iid", 4, i, seed=3) for i in range(4)]

    def refuse(*args):
        raise AssertionError("recomputed although the disk cache holds the split")

    monkeypatch.setattr(data, "_compute_partitions", refuse)
    data._PARTITION_CACHE.clear()  # as in a new process
    again = [partition_indices("mnist", labels, "iid", 4, i, seed=3) for i in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_partition_cache_keeps_the_sixteen_most_recently_used(fresh_partitions, monkeypatch):
    calls = []
    real = data._compute_partitions
    monkeypatch.setattr(data, "_compute_partitions", lambda *a: calls.append(a[4]) or real(*a))
    monkeypatch.setattr(data, "_partition_file", lambda key: None)  # no disk cache: every miss recomputes
    labels = torch.arange(20) % 2

    def get(seed):
        return partition_indices("mnist", labels, "iid", 2, 0, seed=seed)

    for seed in range(16):
        get(seed)
    assert calls == list(range(16))
    get(0)  # a hit, and now the most recent
    assert calls == list(range(16)) and len(data._PARTITION_CACHE) == 16
    get(16)  # evicts seed 1, the least recently used
    assert len(data._PARTITION_CACHE) == 16
    get(0)
    get(2)
    assert calls == list(range(17))
    get(1)
    assert calls == list(range(17)) + [1]


# ------------------------------------------------------------------ IDX files


@pytest.mark.parametrize(
    "code, dtype",
    [(0x08, np.uint8), (0x09, np.int8), (0x0B, ">i2"), (0x0C, ">i4"), (0x0D, ">f4"), (0x0E, ">f8")],
)
def test_read_idx_decodes_every_type_code_into_native_order(tmp_path, code, dtype):
    values = np.array([[1, -2, 3], [4, 5, -6]]) if np.dtype(dtype).kind != "u" else np.array([[1, 2, 3], [4, 5, 250]])
    big = values.astype(dtype)
    path = tmp_path / "x.idx"
    path.write_bytes(bytes([0, 0, code, 2]) + struct.pack(">II", 2, 3) + big.tobytes())
    out = data.read_idx(path, expected_ndim=2)
    assert out.dtype == np.dtype(dtype).newbyteorder("=") and out.shape == (2, 3)
    np.testing.assert_array_equal(out, values)
    assert out.flags.writeable


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "file too short for an IDX header (0 bytes)"),
        (b"\x00\x00\x08", "file too short for an IDX header (3 bytes)"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad IDX magic number 0x01000801"),
        (b"\x00\x01\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad IDX magic number 0x00010801"),
        (b"\x00\x00\x0a\x01" + struct.pack(">I", 1) + b"\x00", "bad IDX magic number 0x00000a01"),
        (b"\x00\x00\x08\x00", "bad IDX magic number 0x00000800"),
        (b"\x00\x00\x08\x02" + struct.pack(">I", 1), "truncated IDX header"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"\x00", "payload is 1 bytes, the header (2,) announces 2"),
        (b"\x00\x00\x0c\x02" + struct.pack(">II", 1, 2) + b"\x00" * 7, "payload is 7 bytes, the header (1, 2) announces 8"),
    ],
)
def test_read_idx_messages(tmp_path, payload, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(payload)
    with pytest.raises(data.IdxFormatError, match=rf"^{re.escape(f'{path}: {message}')}$"):
        data.read_idx(path)


def test_read_idx_minimal_valid_file_and_expected_dimensions(tmp_path):
    path = tmp_path / "one"
    path.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x07")
    assert data.read_idx(path).tolist() == [7]
    assert data.read_idx(path, expected_ndim=1).tolist() == [7]
    with pytest.raises(data.IdxFormatError, match=rf"^{re.escape(str(path))}: IDX file has 1 dimensions, expected 3$"):
        data.read_idx(path, expected_ndim=3)
    gz = tmp_path / "one.gz"
    gz.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x07")  # named .gz, not gzip
    with pytest.raises(data.IdxFormatError, match=rf"^{re.escape(str(gz))}: cannot read/decompress \(.+\)$") as info:
        data.read_idx(gz)
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(data.IdxFormatError, match=r"cannot read/decompress"):
        data.read_idx(tmp_path / "missing")


# ------------------------------------------------------------------ loading (small stand-in datasets)

TRAIN_N, TEST_N, SIZE = 6, 4, 4
FM_PIXEL, MNIST_PIXEL = 73, 33  # mean pixels 0.2863 and 0.1294: Fashion-MNIST's and MNIST's (within 0.03)


@pytest.fixture
def small(isolated, monkeypatch):
    """Both MNIST-like datasets shrunk to 6 + 4 images of 4 x 4 pixels (normalization constants kept)."""
    for name in ("fashion-mnist", "mnist"):
        monkeypatch.setitem(data.DATASETS, name, data.DATASETS[name]._replace(image_size=SIZE, num_train=TRAIN_N, num_test=TEST_N))
    return isolated


def _write_split(folder, pixel=FM_PIXEL, gz=True, **override):
    """The four IDX files; ``override`` maps a stem to the array written instead."""
    from test_data import _idx_bytes

    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": np.full((TRAIN_N, SIZE, SIZE), pixel, np.uint8),
        "train-labels-idx1-ubyte": np.arange(TRAIN_N, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": np.full((TEST_N, SIZE, SIZE), pixel, np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(TEST_N, dtype=np.uint8) + 5) % 10,
    }
    arrays.update(override)
    for stem, arr in arrays.items():
        raw = _idx_bytes(arr, {np.dtype(np.uint8): 0x08, np.dtype(">i2"): 0x0B}[arr.dtype])
        (folder / (f"{stem}.gz" if gz else stem)).write_bytes(gzip.compress(raw) if gz else raw)
    return folder


def _normalized(pixel, mean, std):
    return np.float32((np.float32(pixel) / np.float32(255.0) - np.float32(mean)) / np.float32(std))


def test_small_dataset_loads_normalized_with_int64_labels(small, monkeypatch):
    root = _write_split(small / "root")
    train, test = data.load_dataset("fashion-mnist", root=root)
    assert train.images.shape == (TRAIN_N, 1, SIZE, SIZE) and test.images.shape == (TEST_N, 1, SIZE, SIZE)
    assert train.images.dtype == torch.float32 and train.images.is_contiguous()
    np.testing.assert_allclose(train.images.numpy(), _normalized(FM_PIXEL, 0.2860, 0.3530), rtol=1e-6)
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert test.labels.tolist() == [5, 6, 7, 8] and test.num_examples == TEST_N
    # uncompressed files, in the torchvision layout under $FL_SPARSE_DATA, as MNIST
    env = small / "env"
    _write_split(env / "MNIST" / "raw", pixel=MNIST_PIXEL, gz=False)
    monkeypatch.setenv("FL_SPARSE_DATA", str(env))
    train, _ = data.load_dataset("mnist")
    np.testing.assert_allclose(train.images.numpy(), _normalized(MNIST_PIXEL, 0.1307, 0.3081), rtol=1e-6)


def test_search_order_root_env_system_cache(small, monkeypatch):
    folders = {}
    for name, pixel in (("root", 66), ("env", 70), ("system", 75), ("cache", 80)):  # all within the tolerance
        folders[name] = _write_split(small / name / "fashion-mnist", pixel=pixel).parent
    monkeypatch.setenv("FL_SPARSE_DATA", str(folders["env"]))
    monkeypatch.setenv("FL_SPARSE_CACHE", str(folders["cache"]))
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", {"fashion-mnist": (str(small / "nowhere"), str(folders["system"]))})

    def first_pixel():
        data.clear_caches(partitions=False, permutations=False)
        train, _ = data.load_dataset("fashion-mnist", root=folders["root"] if use_root else None)
        return round(float(train.images[0, 0, 0, 0]) * 0.3530 * 255 + 0.2860 * 255)

    use_root = True
    assert first_pixel() == 66
    use_root = False
    assert first_pixel() == 70
    monkeypatch.delenv("FL_SPARSE_DATA")
    assert first_pixel() == 75
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", {})
    assert first_pixel() == 80


def test_bad_data_folders_are_named(small, monkeypatch):
    missing = small / "missing"
    with pytest.raises(data.DatasetUnavailableError, match=(
        rf"^the data folder {re.escape(str(missing))} \(the root argument\) does not exist: give the folder that "
        r"holds the data, or leave the root argument unset to search the system folders and the cache directory$"
    )):
        data.load_dataset("fashion-mnist", root=missing)
    a_file = small / "file"
    a_file.write_text("x")
    monkeypatch.setenv("FL_SPARSE_DATA", str(a_file))
    with pytest.raises(data.DatasetUnavailableError, match=(
        rf"^the data folder {re.escape(str(a_file))} \(\$FL_SPARSE_DATA\) is a file, not a folder: give the folder "
        r"that holds the data, or leave \$FL_SPARSE_DATA unset to search the system folders and the cache directory$"
    )):
        data.load_dataset("fashion-mnist")
    monkeypatch.setenv("FL_SPARSE_DATA", "")  # empty: unset
    with pytest.raises(data.DatasetUnavailableError, match=r"^Dataset 'fashion-mnist' not found \(searched: "):
        data.load_dataset("fashion-mnist")


def test_the_unavailable_message_lists_every_base_and_the_download_failure(small, monkeypatch):
    root = small / "r"
    root.mkdir()
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", {"mnist": ("/nonexistent/a",)})
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.load_dataset("mnist", root=root)
    cache = small / "cache"
    assert str(info.value) == (
        f"Dataset 'mnist' not found (searched: {root}, /nonexistent/a, {cache}). "
        f"The torchvision download failed: RuntimeError: simulated: no internet. "
        f"How to get it: {data._HOW_TO_GET['mnist']}"
    )
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(**{"train-images-idx3-ubyte": np.zeros((TRAIN_N, SIZE, SIZE), ">i2")}),
         "{folder}: fashion-mnist IDX files must hold unsigned bytes"),
        (dict(**{"train-labels-idx1-ubyte": np.zeros(TRAIN_N, ">i2")}),
         "{folder}: fashion-mnist IDX files must hold unsigned bytes"),
        (dict(**{"t10k-images-idx3-ubyte": np.full((TEST_N, SIZE, SIZE + 1), FM_PIXEL, np.uint8)}),
         "{folder}/t10k-images-idx3-ubyte: shape (4, 4, 5), expected (4, 4, 4)"),
        (dict(**{"train-images-idx3-ubyte": np.full((TRAIN_N + 1, SIZE, SIZE), FM_PIXEL, np.uint8)}),
         "{folder}/train-images-idx3-ubyte: shape (7, 4, 4), expected (6, 4, 4)"),
        (dict(**{"train-labels-idx1-ubyte": np.zeros(TRAIN_N - 1, np.uint8)}),
         "{folder}/train-labels-idx1-ubyte: 5 labels, expected 6"),
        (dict(**{"t10k-labels-idx1-ubyte": np.array([0, 9, 10, 3], np.uint8)}),
         "{folder}/t10k-labels-idx1-ubyte: label 10 out of range"),
    ],
)
def test_malformed_splits_are_named(small, override, message):
    root = _write_split(small / "root", **override)
    with pytest.raises(data.IdxFormatError, match=rf"^{re.escape(message.format(folder=root))}$"):
        data.load_dataset("fashion-mnist", root=root)


def test_the_largest_valid_label_and_the_mean_pixel_tolerance(small):
    ok = _write_split(small / "ok", pixel=FM_PIXEL, **{"train-labels-idx1-ubyte": np.full(TRAIN_N, 9, np.uint8)})
    assert data.load_dataset("fashion-mnist", root=ok)[0].labels.tolist() == [9] * TRAIN_N
    # 0.2860 - 0.03 = 0.2560 (pixel 65.28): 66 (0.2588) is Fashion-MNIST, 65 (0.2549) is nobody's
    edge = _write_split(small / "edge", pixel=66)
    data.load_dataset("fashion-mnist", root=edge)
    far = _write_split(small / "far", pixel=65)
    with pytest.raises(data.IdxFormatError, match=(
        rf"^{re.escape(str(far))}/train-images-idx3-ubyte: mean pixel 0\.2549, fashion-mnist's is 0\.286: "
        r"these are not fashion-mnist's files$"
    )):
        data.load_dataset("fashion-mnist", root=far)
    mnist = _write_split(small / "mnist", pixel=MNIST_PIXEL)
    with pytest.raises(data.IdxFormatError, match=(
        rf"^{re.escape(str(mnist))}/train-images-idx3-ubyte: mean pixel 0\.1294, fashion-mnist's is 0\.286: "
        r"these are mnist's files, not fashion-mnist's$"
    )):
        data.load_dataset("fashion-mnist", root=mnist)


def test_a_folder_of_the_other_dataset_is_passed_over(small):
    root = small / "root"
    _write_split(root, pixel=MNIST_PIXEL)  # MNIST's files in the base ...
    _write_split(root / "fashion-mnist", pixel=FM_PIXEL)  # ... Fashion-MNIST's in <base>/fashion-mnist
    train, _ = data.load_dataset("fashion-mnist", root=root)
    np.testing.assert_allclose(train.images.numpy(), _normalized(FM_PIXEL, 0.2860, 0.3530), rtol=1e-6)
    # the first mismatch is the one reported when no folder fits
    only_other = small / "other"
    _write_split(only_other, pixel=MNIST_PIXEL)
    _write_split(only_other / "FashionMNIST" / "raw", pixel=200)
    with pytest.raises(data.IdxFormatError, match=rf"^{re.escape(str(only_other))}/train-images-idx3-ubyte: "):
        data.load_dataset("fashion-mnist", root=only_other)


def test_a_folder_missing_one_file_is_not_a_candidate(small):
    root = _write_split(small / "root")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DatasetUnavailableError, match=r"^Dataset 'fashion-mnist' not found"):
        data.load_dataset("fashion-mnist", root=root)


def test_load_dataset_caches_by_name_and_resolved_root(small, monkeypatch):
    root = _write_split(small / "root")
    first = data.load_dataset("fashion-mnist", root=root)
    monkeypatch.chdir(small)
    again = data.load_dataset("fashion-mnist", root="root")  # the same folder, named relatively
    assert again[0].images is first[0].images and again[1].labels is first[1].labels
    assert set(data._DATASET_CACHE) == {("fashion-mnist", str(root.resolve()))}
    with pytest.raises(ValueError, match=r"^unknown dataset 'emnist'"):
        data.load_dataset("emnist", root=root)


def test_clear_caches_forgets_only_what_it_is_told(small, fresh_partitions):
    root = _write_split(small / "root")
    data.load_dataset("fashion-mnist", root=root)
    partition_indices("mnist", torch.arange(10) % 2, "iid", 2, 0)
    batch_indices(5, 2, 0, 0, 0)
    assert data._DATASET_CACHE and data._PARTITION_CACHE and data._epoch_permutation.cache_info().currsize
    data.clear_caches(datasets=False, partitions=False)
    assert data._DATASET_CACHE and data._PARTITION_CACHE and not data._epoch_permutation.cache_info().currsize
    data.clear_caches(partitions=False, permutations=False)
    assert not data._DATASET_CACHE and data._PARTITION_CACHE
    data.clear_caches(datasets=False, permutations=False)
    assert not data._PARTITION_CACHE


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FL_SPARSE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert data.default_cache_dir() == tmp_path / "home" / ".cache" / "fl-sparse"
    monkeypatch.setenv("XDG_CACHE_HOME", "~/xdg")
    assert data.default_cache_dir() == tmp_path / "home" / "xdg" / "fl-sparse"
    monkeypatch.setenv("FL_SPARSE_CACHE", "~/mine")
    assert data.default_cache_dir() == tmp_path / "home" / "mine"
    monkeypatch.setenv("FL_SPARSE_CACHE", "")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert data.default_cache_dir() == tmp_path / "home" / ".cache" / "fl-sparse"


def test_partition_sizes_summary():
    assert data.partition_sizes_summary([3, 1, 10, 6]) == (
        "4 partitions of 20 examples: min 1, median 4.5, mean 5.0, max 10"
    )
    assert data.partition_sizes_summary(np.array([3, 1, 10, 6]), batch_size=4) == (
        "4 partitions of 20 examples: min 1, median 4.5, mean 5.0, max 10; "
        "2 smaller than a batch of 4 (they train on one smaller batch)"
    )
    assert data.partition_sizes_summary([7, 8, 9], batch_size=0).endswith("max 9")
