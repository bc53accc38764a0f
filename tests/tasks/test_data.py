"""Dataset loading, IDX parsing, federated partitions and the seeded batch order."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_sparse.tasks import data
from fl_sparse.tasks.data import (
    BatchStream,
    DatasetUnavailableError,
    IdxFormatError,
    batch_indices,
    load_dataset,
    partition_indices,
    read_idx,
)

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def fmnist():
    try:
        return load_dataset("fashion-mnist")
    except DatasetUnavailableError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"Fashion-MNIST not available: {exc}")


def _idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(">u1" if type_code == 0x08 else array.dtype).tobytes()


# ------------------------------------------------------------------ IDX


def test_read_idx_round_trip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    gz = tmp_path / "x-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(_idx_bytes(arr)))
    raw = tmp_path / "x-idx3-ubyte"
    raw.write_bytes(_idx_bytes(arr))
    for path in (gz, raw):
        out = read_idx(path, expected_ndim=3)
        assert out.dtype == np.uint8 and out.flags.writeable
        np.testing.assert_array_equal(out, arr)
    # big-endian int32 payloads come back in native order
    ints = np.array([1, -2, 70000], dtype=">i4")
    p = tmp_path / "i.idx"
    p.write_bytes(bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 3) + ints.tobytes())
    np.testing.assert_array_equal(read_idx(p), [1, -2, 70000])


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"\x00\x00", "too short"),
        (b"\x00\x01\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "magic"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00\x01", "payload"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x00\x01", "payload"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 1), "header"),
    ],
)
def test_read_idx_rejects_malformed(tmp_path, payload, match):
    path = tmp_path / "bad-idx.gz"
    path.write_bytes(gzip.compress(payload))
    with pytest.raises(IdxFormatError, match=match):
        read_idx(path)


def test_read_idx_rejects_corrupt_gzip_and_wrong_ndim(tmp_path):
    good = gzip.compress(_idx_bytes(np.zeros((4, 2, 2), np.uint8)))
    truncated = tmp_path / "trunc.gz"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(IdxFormatError, match="decompress"):
        read_idx(truncated)
    flipped = bytearray(gzip.compress(_idx_bytes(np.random.default_rng(0).integers(0, 255, (50, 28, 28)).astype(np.uint8))))
    for i in range(20, len(flipped) - 20, 7):
        flipped[i] ^= 0xFF
    bad = tmp_path / "flipped.gz"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(IdxFormatError):
        read_idx(bad)
    garbage = tmp_path / "garbage.gz"
    garbage.write_bytes(b"this is not gzip at all")
    with pytest.raises(IdxFormatError):
        read_idx(garbage)
    ok = tmp_path / "ok.gz"
    ok.write_bytes(good)
    with pytest.raises(IdxFormatError, match="dimensions"):
        read_idx(ok, expected_ndim=1)


# ------------------------------------------------------------------ loading


def test_load_fashion_mnist(fmnist):
    train, test = fmnist
    assert train.images.shape == (60_000, 1, 28, 28) and test.images.shape == (10_000, 1, 28, 28)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert abs(train.images.mean().item()) < 0.01 and abs(train.images.std().item() - 1) < 0.01
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert train.num_examples == 60_000
    # cached per process: the very same tensors come back
    again = load_dataset("fashion-mnist")
    assert again[0].images is train.images and again[1].labels is test.labels


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


def test_missing_data_raises_clear_error(isolated):
    empty = isolated / "empty"
    empty.mkdir()
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("fashion-mnist", root=empty)
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert str(empty) in msg and "no internet" in msg and "FL_SPARSE_DATA" in msg
    with pytest.raises(DatasetUnavailableError, match="cifar-10"):
        load_dataset("cifar10", root=empty)


def test_falls_back_to_torchvision_download_into_cache(isolated, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    class FakeFashionMNIST:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            n = 6 if train else 4
            self.data = torch.full((n, 28, 28), 255, dtype=torch.uint8)
            self.targets = torch.arange(n) % 10

    monkeypatch.setattr(tvd, "FashionMNIST", FakeFashionMNIST)
    train, test = load_dataset("fashion-mnist")
    cache = str(isolated / "cache")
    assert calls == [(cache, True, True), (cache, False, True)]
    assert train.images.shape == (6, 1, 28, 28) and test.labels.tolist() == [0, 1, 2, 3]
    assert torch.allclose(train.images, torch.full_like(train.images, (1 - 0.2860) / 0.3530))
    assert train.labels.dtype == torch.int64


def test_broken_cifar_folder_is_reported(isolated):
    (isolated / "c" / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(DatasetUnavailableError, match="corrupted"):
        load_dataset("cifar10", root=isolated / "c")


def test_corrupt_files_found_are_reported(isolated):
    root = isolated / "fm"
    root.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (root / f"{name}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"\x01"))
    with pytest.raises(IdxFormatError):
        load_dataset("fashion-mnist", root=root)
    # right format, wrong size: a 3-image file is not Fashion-MNIST's training set
    (root / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(_idx_bytes(np.zeros((3, 28, 28), np.uint8)))
    )
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros(3, np.uint8))))
    with pytest.raises(IdxFormatError, match="expected"):
        load_dataset("fashion-mnist", root=root)


@pytest.mark.skipif(not SYSTEM_FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_env_var_and_torchvision_layout_are_searched(isolated, fmnist, monkeypatch):
    # $FL_SPARSE_DATA/FashionMNIST/raw/ (torchvision's layout) with the system files linked in
    raw = isolated / "env" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in SYSTEM_FMNIST.glob("*-ubyte.gz"):
        (raw / f.name).symlink_to(f)
    monkeypatch.setenv("FL_SPARSE_DATA", str(isolated / "env"))
    train, test = load_dataset("fashion-mnist")
    assert torch.equal(train.labels, fmnist[0].labels)
    assert torch.equal(test.images[:5], fmnist[1].images[:5])


# --------------------------------------------------------------- partitions


def _all_parts(labels, scheme, k=100, **kw):
    return [partition_indices("fashion-mnist", labels, scheme, k, i, **kw) for i in range(k)]


def _check_disjoint(parts, n, expect_cover=True):
    cat = torch.cat(parts)
    assert cat.dtype == torch.int64
    assert cat.unique().numel() == cat.numel(), "partitions overlap"
    assert int(cat.min()) >= 0 and int(cat.max()) < n
    if expect_cover:
        assert cat.numel() == n, "partitions do not cover the data"
    assert all(p.numel() > 0 for p in parts)


def _label_tv_from_uniform(labels, parts):
    """Mean total-variation distance of each partition's label histogram from the global one."""
    glob = torch.bincount(labels, minlength=10).double()
    glob /= glob.sum()
    tv = []
    for p in parts:
        h = torch.bincount(labels[p], minlength=10).double()
        tv.append(0.5 * (h / h.sum() - glob).abs().sum().item())
    return float(np.mean(tv))


def test_iid_partitions(fmnist):
    labels = fmnist[0].labels
    parts = _all_parts(labels, "iid", seed=0)
    _check_disjoint(parts, 60_000)
    assert {p.numel() for p in parts} == {600}
    assert _label_tv_from_uniform(labels, parts) < 0.12
    # seeded: a random split, not contiguous blocks
    assert not torch.equal(parts[0].sort().values, torch.arange(600))


def test_dirichlet_partitions_are_skewed_disjoint_and_cover(fmnist):
    labels = fmnist[0].labels
    parts = _all_parts(labels, "dirichlet", alpha=0.3, seed=0)
    _check_disjoint(parts, 60_000)
    sizes = [p.numel() for p in parts]
    assert min(sizes) >= data.dirichlet_min_partition_size(60_000, 100)
    assert len(set(sizes)) > 10  # unequal sizes
    iid_tv = _label_tv_from_uniform(labels, _all_parts(labels, "iid", seed=0))
    dir_tv = _label_tv_from_uniform(labels, parts)
    assert dir_tv > 0.4 > iid_tv
    # more concentrated alpha -> less skew
    assert _label_tv_from_uniform(labels, _all_parts(labels, "dirichlet", alpha=100.0, seed=0)) < 0.15


def test_shard_partitions(fmnist):
    labels = fmnist[0].labels
    parts = _all_parts(labels, "shards", seed=0)
    _check_disjoint(parts, 60_000)
    # two label-sorted shards of 300 (each within one class) per partition
    assert {p.numel() for p in parts} == {600}
    assert max(labels[p].unique().numel() for p in parts) <= 2


def test_shards_leave_out_only_the_remainder():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (1003,), generator=g)
    parts = [partition_indices("fashion-mnist", labels, "shards", 10, i) for i in range(10)]
    _check_disjoint(parts, 1003, expect_cover=False)
    assert torch.cat(parts).numel() == 1003 - 1003 % 20


def test_partitions_deterministic_and_seed_dependent(fmnist):
    labels = fmnist[0].labels
    for scheme in ("iid", "dirichlet", "shards"):
        a = partition_indices("fashion-mnist", labels, scheme, 20, 7, alpha=0.5, seed=3)
        data.clear_caches(datasets=False)  # recomputed from scratch, not served from the cache
        b = partition_indices("fashion-mnist", labels, scheme, 20, 7, alpha=0.5, seed=3)
        c = partition_indices("fashion-mnist", labels, scheme, 20, 7, alpha=0.5, seed=4)
        assert torch.equal(a, b), scheme
        assert not torch.equal(a, c), scheme


def test_partitions_computed_once_per_partitioner(monkeypatch, tmp_path):
    monkeypatch.setenv("FL_SPARSE_CACHE", str(tmp_path))  # an empty disk cache
    data.clear_caches(partitions=True, datasets=False, permutations=False)
    calls = []
    real = data._compute_partitions

    def counting(*args):
        calls.append(args[1:])
        return real(*args)

    monkeypatch.setattr(data, "_compute_partitions", counting)
    labels = torch.arange(500) % 10
    for i in range(25):
        partition_indices("fashion-mnist", labels, "dirichlet", 25, i, alpha=0.7, seed=11)
    assert len(calls) == 1
    partition_indices("fashion-mnist", labels, "dirichlet", 25, 0, alpha=0.8, seed=11)
    partition_indices("fashion-mnist", labels[:-10], "dirichlet", 25, 0, alpha=0.7, seed=11)
    assert len(calls) == 3  # new alpha, new labels -> new partitioner
    changed = labels.clone()
    changed.numpy()[123] = 4  # one label, changed where no version counter sees it: still new labels
    partition_indices("fashion-mnist", changed, "dirichlet", 25, 0, alpha=0.7, seed=11)
    assert len(calls) == 4
    # the same labels as another dtype or a strided view are the same labels: the split is reused
    partition_indices("fashion-mnist", labels.to(torch.int32), "dirichlet", 25, 3, alpha=0.7, seed=11)
    partition_indices("fashion-mnist", torch.stack([labels, labels], 1)[:, 1], "dirichlet", 25, 3, alpha=0.7, seed=11)
    assert len(calls) == 4


def test_a_new_process_reads_the_split_from_disk_and_recomputes_a_bad_file(monkeypatch, tmp_path):
    """Under ``flwr run`` every message is a new process: the split must not be recomputed each time."""
    monkeypatch.setenv("FL_SPARSE_CACHE", str(tmp_path))
    labels = torch.arange(600) % 10
    data.clear_caches(partitions=True, datasets=False, permutations=False)
    first = [partition_indices("fashion-mnist", labels, "dirichlet", 6, i, alpha=0.4, seed=3) for i in range(6)]
    (cached,) = (tmp_path / "partitions").glob("*.npz")
    assert not list((tmp_path / "partitions").glob("*.tmp*"))

    def must_not_run(*args):
        raise AssertionError("recomputed although the disk cache holds the split")

    real = data._compute_partitions
    monkeypatch.setattr(data, "_compute_partitions", must_not_run)
    data.clear_caches(partitions=True, datasets=False, permutations=False)  # as in a fresh process
    again = [partition_indices("fashion-mnist", labels, "dirichlet", 6, i, alpha=0.4, seed=3) for i in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # another seed is another file, not the cached one
    with pytest.raises(AssertionError, match="recomputed"):
        partition_indices("fashion-mnist", labels, "dirichlet", 6, 0, alpha=0.4, seed=4)

    calls = []
    monkeypatch.setattr(data, "_compute_partitions", lambda *a: calls.append(1) or real(*a))
    for bad in (b"not a zip", cached.read_bytes()[:100]):
        cached.write_bytes(bad)
        data.clear_caches(partitions=True, datasets=False, permutations=False)
        assert torch.equal(partition_indices("fashion-mnist", labels, "dirichlet", 6, 2, alpha=0.4, seed=3), first[2])
    assert len(calls) == 2
    # a well-formed file whose indices are out of range is not trusted either
    np.savez(cached, indices=np.full(600, 10**6, dtype=np.int64), offsets=np.arange(0, 700, 100, dtype=np.int64))
    data.clear_caches(partitions=True, datasets=False, permutations=False)
    assert torch.equal(partition_indices("fashion-mnist", labels, "dirichlet", 6, 5, alpha=0.4, seed=3), first[5])
    assert len(calls) == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scheme="random"), "unknown partition scheme"),
        (dict(partition_id=10), "partition_id"),
        (dict(partition_id=-1), "partition_id"),
        (dict(num_partitions=0, partition_id=0), "num_partitions"),
        (dict(num_partitions=101, partition_id=0), "cannot split"),
        (dict(scheme="shards", num_partitions=51, partition_id=0), "cannot cut 100 examples into 2 shards for each of 51"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=-1.0), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(dataset_name="svhn"), "unknown dataset"),
        (dict(alpha=0.001, num_partitions=50, min_partition_size=10), "larger alpha"),
        (dict(min_partition_size=-1), "min_partition_size"),
        (dict(min_partition_size=2.5), "min_partition_size"),
    ],
)
@pytest.mark.filterwarnings("ignore:The specified min_partition_size")
def test_partition_validation(kwargs, match):
    args = dict(dataset_name="fashion-mnist", labels=torch.arange(100) % 10, scheme="dirichlet",
                num_partitions=10, partition_id=0, alpha=0.5, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        partition_indices(args.pop("dataset_name"), args.pop("labels"), args.pop("scheme"),
                          args.pop("num_partitions"), args.pop("partition_id"), **args)


# --------------------------------------------------------------- batch order


def test_each_epoch_is_a_permutation():
    n, bs = 103, 10
    per_epoch = data.batches_per_epoch(n, bs)
    assert per_epoch == 11
    epochs = []
    for e in range(3):
        batches = [batch_indices(n, bs, 5, 2, e * per_epoch + b) for b in range(per_epoch)]
        assert [len(b) for b in batches] == [10] * 10 + [3]
        cat = torch.cat(batches)
        assert torch.equal(cat.sort().values, torch.arange(n))
        epochs.append(cat)
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])


def test_batch_order_is_a_pure_function():
    first = [batch_indices(600, 10, 0, 3, s) for s in range(200)]
    data.clear_caches(datasets=False, partitions=False)
    backwards = [batch_indices(600, 10, 0, 3, s) for s in reversed(range(200))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, backwards))
    # returned tensors are copies: mutating one does not change later answers
    first[0].zero_()
    assert torch.equal(batch_indices(600, 10, 0, 3, 0), backwards[0])
    # depends on seed and partition id
    assert not torch.equal(batch_indices(600, 10, 1, 3, 0), backwards[0])
    assert not torch.equal(batch_indices(600, 10, 0, 4, 0), backwards[0])


def test_batch_stream_maps_through_partition_indices():
    part = torch.tensor([50, 7, 9, 1000, 3, 42, 11])
    stream = BatchStream(part, 3, seed=9, partition_id=4)
    assert stream.batches_per_epoch == 3
    for step in range(10):
        pos = batch_indices(7, 3, 9, 4, step)
        assert torch.equal(stream.positions(step), pos)
        assert torch.equal(stream(step), part[pos])
    win = stream.window(5)
    assert all(torch.equal(win(h), stream(5 + h)) for h in range(6))
    counted = BatchStream(7, 3, seed=9, partition_id=4)
    assert torch.equal(counted(4), stream.positions(4))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    bs=st.integers(1, 64),
    step=st.integers(0, 10_000),
    seed=st.integers(-(2**31), 2**31),
    pid=st.integers(0, 1000),
)
def test_batch_indices_properties(n, bs, step, seed, pid):
    idx = batch_indices(n, bs, seed, pid, step)
    per_epoch = -(-n // bs)
    b = step % per_epoch
    expected_len = min(bs, n - b * bs)
    assert idx.dtype == torch.int64 and idx.numel() == expected_len
    assert idx.unique().numel() == expected_len
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    assert torch.equal(idx, batch_indices(n, bs, seed, pid, step))


@pytest.mark.parametrize(
    "args", [(0, 10, 0, 0, 0), (10, 0, 0, 0, 0), (10, 10, 0, 0, -1), (10, 2.5, 0, 0, 0)]
)
def test_batch_indices_validation(args):
    with pytest.raises(ValueError):
        batch_indices(*args)
    with pytest.raises(ValueError):
        BatchStream(torch.tensor([], dtype=torch.int64), 2, seed=0)


@pytest.mark.parametrize("num_partitions", [1000, 10_000])
def test_dirichlet_at_thousands_of_clients_gives_every_client_data(fmnist, num_partitions, monkeypatch, tmp_path):
    """Fashion-MNIST, alpha = 0.3: 1,000 clients meet the automatic minimum; at 10,000 no draw
    does, and the empty clients each get one example from the largest ones (skew kept)."""
    monkeypatch.setenv("FL_SPARSE_CACHE", str(tmp_path))
    labels = fmnist[0].labels
    data.clear_caches(partitions=True, datasets=False, permutations=False)
    parts = [partition_indices("fashion-mnist", labels, "dirichlet", num_partitions, i, alpha=0.3, seed=0)
             for i in range(num_partitions)]
    sizes = np.array([p.numel() for p in parts])
    everything = torch.cat(parts)
    assert sizes.min() >= 1 and everything.numel() == labels.numel()
    assert torch.unique(everything).numel() == labels.numel()  # disjoint, covering
    assert (sizes.min() >= 5) if num_partitions == 1000 else (sizes.min() == 1)
    # still non-IID: label distributions far from the global one (an IID client of 60 examples: ~0.2)
    share = np.stack([np.bincount(labels[p].numpy(), minlength=10) / p.numel() for p in parts[:500]])
    total_variation = 0.5 * np.abs(share - 0.1).sum(axis=1)
    assert np.median(total_variation) > 0.4
    summary = data.partition_sizes_summary(sizes, batch_size=32)
    assert summary.startswith(f"{num_partitions} partitions of 60000 examples: min {sizes.min()},")
    assert f"{int((sizes < 32).sum())} smaller than a batch of 32" in summary


def test_an_explicit_minimum_is_honoured_or_refused_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("FL_SPARSE_CACHE", str(tmp_path))
    labels = torch.arange(2000) % 10
    sizes = [partition_indices("fashion-mnist", labels, "dirichlet", 20, i, alpha=0.5, seed=1, min_partition_size=40).numel()
             for i in range(20)]
    assert min(sizes) >= 40
    with pytest.raises(ValueError, match="at least 150 examples"):
        partition_indices("fashion-mnist", labels, "dirichlet", 20, 0, alpha=0.5, seed=1, min_partition_size=150)


def test_fill_empty_partitions_moves_one_example_per_empty_client_from_the_largest():
    parts = [np.array([], np.int64), np.array([1, 2, 3], np.int64), np.array([4, 5, 6, 7], np.int64), np.array([], np.int64)]
    filled = [p.tolist() for p in data._fill_empty_partitions(parts)]
    assert filled == [[7], [1, 2], [4, 5, 6], [3]]  # from the largest at the time, ties to the lower id
    with pytest.raises(ValueError, match="too few examples"):
        data._fill_empty_partitions([np.array([], np.int64), np.array([1], np.int64)])
