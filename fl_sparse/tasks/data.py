"""Datasets, federated partitions and a stateless, seeded minibatch order.

Three pieces, each a pure function of its arguments so that a Flower run and
a plain reference loop see exactly the same data:

* :func:`load_dataset` returns normalized float32 image tensors and int64
  labels for ``"fashion-mnist"``, ``"mnist"`` and ``"cifar10"``, cached per
  process (one Ray actor serves many clients and must not reload per message).
* :func:`partition_indices` splits a training set among clients with the
  flwr-datasets partitioners (IID, Dirichlet label skew, label shards),
  computing all partitions of one partitioner once per process.
* :func:`batch_indices` / :class:`BatchStream` give the ``step``-th minibatch
  of a client as a pure function of ``(seed, partition_id, step)``: epoch
  ``e = step // batches_per_epoch`` walks a permutation drawn from a
  ``torch.Generator`` seeded with a hash of ``(seed, partition_id, e)``.

Where the data comes from
-------------------------
Fashion-MNIST / MNIST (IDX files ``train-images-idx3-ubyte.gz`` ...) are
searched, in this order, in ``root`` (when given), ``$FL_SPARSE_DATA``, the
Debian system directory (``/usr/share/datasets/fashion-mnist``, package
``dataset-fashion-mnist``) and the cache directory; each base directory is
tried as is, under ``<base>/<name>/`` and under torchvision's
``<base>/FashionMNIST/raw/`` layout. A folder holding the other dataset's files
(MNIST and Fashion-MNIST share file names and shapes; their mean pixels tell
them apart) is passed over, and named by an :class:`IdxFormatError` when no
folder holds the right files. Only then torchvision downloads into the
cache directory (``$FL_SPARSE_CACHE``, else ``$XDG_CACHE_HOME/fl-sparse``, else
``~/.cache/fl-sparse``). CIFAR-10 is looked up the same way as torchvision's
``cifar-10-batches-py`` folder and otherwise downloaded. When nothing works a
:class:`DatasetUnavailableError` says how to get the data. A ``root`` or
``$FL_SPARSE_DATA`` that names no folder is one too, at once: a mistyped path
is named, not searched past (on to other data, or a download).

No data augmentation is applied: the tensors are fixed, so a minibatch is
fully determined by its indices.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import math
import os
import struct
import threading
import warnings
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import xxhash

__all__ = [
    "BatchStream",
    "DATASETS",
    "DatasetInfo",
    "DatasetUnavailableError",
    "IdxFormatError",
    "PARTITION_SCHEMES",
    "TensorPair",
    "batch_indices",
    "batches_per_epoch",
    "clear_caches",
    "dataset_info",
    "default_cache_dir",
    "dirichlet_min_partition_size",
    "partition_sizes_summary",
    "load_dataset",
    "partition_indices",
    "read_idx",
]


# --------------------------------------------------------------------- types


class TensorPair(NamedTuple):
    """``images`` (float32, N x C x H x W, normalized) and ``labels`` (int64, N)."""

    images: torch.Tensor
    labels: torch.Tensor

    @property
    def num_examples(self) -> int:
        return int(self.labels.shape[0])


class DatasetInfo(NamedTuple):
    """Static facts about a supported dataset."""

    in_channels: int
    image_size: int
    num_classes: int
    num_train: int
    num_test: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class DatasetUnavailableError(RuntimeError):
    """The dataset is neither on disk nor downloadable."""


class IdxFormatError(ValueError):
    """An IDX (MNIST-style) file is corrupt, truncated or of the wrong kind."""


# Normalization: per-channel mean/std of the training set.
DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(1, 28, 10, 60_000, 10_000, (0.2860,), (0.3530,)),
    "mnist": DatasetInfo(1, 28, 10, 60_000, 10_000, (0.1307,), (0.3081,)),
    "cifar10": DatasetInfo(
        3, 32, 10, 50_000, 10_000, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
}

PARTITION_SCHEMES = ("iid", "dirichlet", "shards")

# How far the mean pixel of IDX files may be from the dataset's (both splits are within 0.002).
MEAN_PIXEL_TOLERANCE = 0.03

# Debian's dataset-fashion-mnist installs here. Tests monkeypatch this.
SYSTEM_DATA_DIRS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist",),
    "mnist": ("/usr/share/datasets/mnist",),
    "cifar10": ("/usr/share/datasets/cifar10", "/usr/share/datasets/cifar-10"),
}

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_TORCHVISION_FOLDER = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}

_HOW_TO_GET = {
    "fashion-mnist": (
        "Install the Debian package (`sudo apt-get install dataset-fashion-mnist`, "
        "files land in /usr/share/datasets/fashion-mnist/), or put the four IDX "
        "files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in a directory named by "
        "$FL_SPARSE_DATA or the `root` argument, or run once with internet access so "
        "torchvision can download them into the cache directory."
    ),
    "mnist": (
        "Put the four MNIST IDX files (train-images-idx3-ubyte.gz, ...) in a directory "
        "named by $FL_SPARSE_DATA or the `root` argument (or /usr/share/datasets/mnist), "
        "or run once with internet access so torchvision can download them into the "
        "cache directory."
    ),
    "cifar10": (
        "Put torchvision's extracted `cifar-10-batches-py` folder (from "
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) under a directory "
        "named by $FL_SPARSE_DATA or the `root` argument, or run once with internet "
        "access so torchvision can download it into the cache directory."
    ),
}


def dataset_info(name: str) -> DatasetInfo:
    """Shape, class count and normalization of a supported dataset."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}"
        ) from None


def default_cache_dir() -> Path:
    """``$FL_SPARSE_CACHE``, else ``$XDG_CACHE_HOME/fl-sparse``, else ``~/.cache/fl-sparse``."""
    explicit = os.environ.get("FL_SPARSE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fl-sparse"


# ------------------------------------------------------------------ IDX files

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike, *, expected_ndim: int | None = None) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed) into a numpy array.

    Validates the magic number (two zero bytes, a known type code, the number
    of dimensions) and that the payload holds exactly the announced number of
    elements. Raises :class:`IdxFormatError` on any mismatch, including a
    corrupt gzip stream.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise IdxFormatError(f"{path}: cannot read/decompress ({exc})") from exc
    if len(raw) < 4:
        raise IdxFormatError(f"{path}: file too short for an IDX header ({len(raw)} bytes)")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise IdxFormatError(
            f"{path}: bad IDX magic number 0x{int.from_bytes(raw[:4], 'big'):08x}"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise IdxFormatError(f"{path}: IDX file has {ndim} dimensions, expected {expected_ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[type_code]
    expected_bytes = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected_bytes:
        raise IdxFormatError(
            f"{path}: payload is {len(raw) - header} bytes, the header {dims} "
            f"announces {expected_bytes}"
        )
    # Native byte order, writable copy (``raw`` is immutable bytes).
    return np.frombuffer(raw, dtype=dtype, offset=header).astype(dtype.newbyteorder("=")).reshape(dims)


def _idx_dirs(name: str, bases: list[Path]):
    """The directories among ``bases`` (and their usual subfolders) holding all IDX files, in search order."""
    needed = [f for pair in _IDX_FILES.values() for f in pair]
    for base in bases:
        for cand in (base, base / name, base / _TORCHVISION_FOLDER[name] / "raw"):
            if all(_idx_file(cand, f) is not None for f in needed):
                yield cand


class _OtherDatasetError(IdxFormatError):
    """Well-formed IDX files of another dataset (MNIST and Fashion-MNIST share file names and shapes)."""


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_split(name: str, folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    info = DATASETS[name]
    img_stem, lbl_stem = _IDX_FILES[split]
    images = read_idx(_idx_file(folder, img_stem), expected_ndim=3)  # type: ignore[arg-type]
    labels = read_idx(_idx_file(folder, lbl_stem), expected_ndim=1)  # type: ignore[arg-type]
    expected_n = info.num_train if split == "train" else info.num_test
    size = info.image_size
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise IdxFormatError(f"{folder}: {name} IDX files must hold unsigned bytes")
    if images.shape != (expected_n, size, size):
        raise IdxFormatError(
            f"{folder}/{img_stem}: shape {images.shape}, expected {(expected_n, size, size)}"
        )
    if labels.shape != (expected_n,):
        raise IdxFormatError(f"{folder}/{lbl_stem}: {labels.shape[0]} labels, expected {expected_n}")
    if int(labels.max()) >= info.num_classes:
        raise IdxFormatError(f"{folder}/{lbl_stem}: label {int(labels.max())} out of range")
    # MNIST and Fashion-MNIST have the same file names and shapes; their mean pixels differ (0.13, 0.29).
    mean = float(np.add.reduce(images.ravel(), dtype=np.uint64)) / images.size / 255.0
    if abs(mean - info.mean[0]) > MEAN_PIXEL_TOLERANCE:
        other = [k for k, v in DATASETS.items() if len(v.mean) == 1 and abs(mean - v.mean[0]) <= MEAN_PIXEL_TOLERANCE]
        raise _OtherDatasetError(
            f"{folder}/{img_stem}: mean pixel {mean:.4f}, {name}'s is {info.mean[0]}: "
            + (f"these are {other[0]}'s files, not {name}'s" if other else f"these are not {name}'s files")
        )
    return images, labels


def _normalize(images_u8: np.ndarray | torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 N x C x H x W -> float32 normalized (per channel)."""
    x = torch.as_tensor(images_u8).to(torch.float32).div_(255.0)
    mean = torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std).contiguous()


def _pair(name: str, images_u8: np.ndarray | torch.Tensor, labels) -> TensorPair:
    info = DATASETS[name]
    images = torch.as_tensor(np.asarray(images_u8))
    if images.dim() == 3:  # N x H x W grayscale
        images = images.unsqueeze(1)
    elif images.dim() == 4 and images.shape[-1] == info.in_channels:  # N x H x W x C
        images = images.permute(0, 3, 1, 2)
    labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return TensorPair(_normalize(images, info), labels_t)


# ------------------------------------------------------------------ loading

_DATASET_CACHE: dict[tuple[str, str | None], tuple[TensorPair, TensorPair]] = {}
_LOAD_LOCK = threading.Lock()


def _named_folder(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a folder to search, or :class:`DatasetUnavailableError` when there is no folder there."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        state = "is a file, not a folder" if folder.exists() else "does not exist"
        raise DatasetUnavailableError(
            f"the data folder {folder} ({what}) {state}: give the folder that holds the data, or leave "
            f"{what} unset to search the system folders and the cache directory"
        )
    return folder


def _search_bases(name: str, root: str | os.PathLike | None) -> list[Path]:
    bases: list[Path] = []
    if root is not None:
        bases.append(_named_folder(root, "the root argument"))
    env = os.environ.get("FL_SPARSE_DATA")
    if env:
        bases.append(_named_folder(env, "$FL_SPARSE_DATA"))
    bases.extend(Path(p) for p in SYSTEM_DATA_DIRS.get(name, ()))
    bases.append(default_cache_dir())
    return bases


def _unavailable(name: str, bases: list[Path], exc: BaseException | None) -> DatasetUnavailableError:
    searched = ", ".join(str(b) for b in bases)
    cause = f" The torchvision download failed: {type(exc).__name__}: {exc}." if exc else ""
    return DatasetUnavailableError(
        f"Dataset {name!r} not found (searched: {searched}).{cause} "
        f"How to get it: {_HOW_TO_GET[name]}"
    )


def _load_mnist_like(name: str, root) -> tuple[TensorPair, TensorPair]:
    bases = _search_bases(name, root)
    other: _OtherDatasetError | None = None
    for folder in _idx_dirs(name, bases):
        try:
            train = _load_idx_split(name, folder, "train")
            test = _load_idx_split(name, folder, "test")
        except _OtherDatasetError as exc:  # e.g. Fashion-MNIST's files in a base, MNIST's in <base>/mnist/
            other = other or exc
            continue
        return _pair(name, *train), _pair(name, *test)
    if other is not None:
        raise other
    # Fall back to torchvision's downloader (needs internet).
    cache = default_cache_dir()
    try:
        from torchvision import datasets as tvd

        cls = tvd.FashionMNIST if name == "fashion-mnist" else tvd.MNIST
        cache.mkdir(parents=True, exist_ok=True)
        tr = cls(root=str(cache), train=True, download=True)
        te = cls(root=str(cache), train=False, download=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "unavailable"
        raise _unavailable(name, bases, exc) from exc
    return _pair(name, tr.data, tr.targets), _pair(name, te.data, te.targets)


def _load_cifar10(root) -> tuple[TensorPair, TensorPair]:
    from torchvision import datasets as tvd

    bases = _search_bases("cifar10", root)
    for base in bases:
        for cand in (base, base / "cifar10"):
            if (cand / "cifar-10-batches-py").is_dir():
                try:
                    tr = tvd.CIFAR10(root=str(cand), train=True, download=False)
                    te = tvd.CIFAR10(root=str(cand), train=False, download=False)
                except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
                    raise DatasetUnavailableError(
                        f"{cand / 'cifar-10-batches-py'} exists but is incomplete or "
                        f"corrupted ({exc}). {_HOW_TO_GET['cifar10']}"
                    ) from exc
                return _pair("cifar10", tr.data, tr.targets), _pair("cifar10", te.data, te.targets)
    cache = default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tr = tvd.CIFAR10(root=str(cache), train=True, download=True)
        te = tvd.CIFAR10(root=str(cache), train=False, download=True)
    except Exception as exc:  # noqa: BLE001
        raise _unavailable("cifar10", bases, exc) from exc
    return _pair("cifar10", tr.data, tr.targets), _pair("cifar10", te.data, te.targets)


def load_dataset(
    name: str, root: str | os.PathLike | None = None
) -> tuple[TensorPair, TensorPair]:
    """``(train, test)`` of a dataset as normalized float32 images and int64 labels.

    Cached per process by ``(name, root)``: later calls return the same tensors
    (treat them as read-only). Raises :class:`DatasetUnavailableError` with
    instructions when the data is neither on disk nor downloadable, and
    :class:`IdxFormatError` when IDX files are found but corrupt.
    """
    dataset_info(name)  # validates the name
    key = (name, None if root is None else str(Path(root).expanduser().resolve()))
    with _LOAD_LOCK:
        cached = _DATASET_CACHE.get(key)
        if cached is None:
            if name == "cifar10":
                cached = _load_cifar10(root)
            else:
                cached = _load_mnist_like(name, root)
            _DATASET_CACHE[key] = cached
    return cached


# --------------------------------------------------------------- partitions

_PARTITION_CACHE: "OrderedDict[tuple, tuple[torch.Tensor, ...]]" = OrderedDict()
_PARTITION_CACHE_MAX = 16
_PARTITION_LOCK = threading.Lock()


def dirichlet_min_partition_size(num_examples: int, num_partitions: int) -> int:
    """The automatic ``min_partition_size`` handed to :class:`DirichletPartitioner`.

    10 (one minibatch of the papers' batch size) when the data allows it, never
    more than a twelfth of the mean partition size, and at least 1.
    flwr-datasets redraws the Dirichlet proportions until every partition
    reaches it and gives up after 10 redraws, so it must be small relative to
    the mean: for 60,000 examples and alpha = 0.3, 100 partitions (mean 600)
    get 10 and a draw fails with probability ~0.2 % (simulated); 1,000
    partitions (mean 60) get 5, and the smallest of a draw holds about 6.
    Below :data:`DIRICHLET_FILL_BELOW` examples per partition no draw reaches
    even 1 (10,000 clients: ~150 empty per draw), so the split is drawn once
    without a minimum and the empty clients are filled
    (:func:`_fill_empty_partitions`). Self-balancing is off by default: it
    stops filling partitions above the mean, which flattens the label skew of
    later classes.
    """
    return max(1, min(10, num_examples // (12 * num_partitions)))


# Mean examples per partition under which the automatic Dirichlet split does not
# try flwr-datasets' minimum at all (every one of its 10 redraws would fail).
DIRICHLET_FILL_BELOW = 20


def _labels_fingerprint(labels: torch.Tensor) -> str:
    """XXH3-128 of the labels as int64: part of the partition cache's key, computed on every
    :func:`partition_indices` call (once per client message, and per client in the run's
    preflight). BLAKE2b took about 1 ms for Fashion-MNIST's 60,000 labels, 10 s of a
    10,000-client preflight; XXH3 takes about 20 us, and hashes the array's buffer without a copy.
    Not cryptographic, and it need not be: it tells datasets apart, it guards against nobody."""
    return xxhash.xxh3_128_hexdigest(labels.detach().to("cpu", torch.int64).contiguous().numpy())


def _column(ds, name: str) -> np.ndarray:
    """One int64 column of a (possibly index-mapped) HF dataset as a numpy array."""
    col = ds[:][name] if len(ds) else []
    if hasattr(col, "to_numpy"):  # pyarrow (Chunked)Array
        col = col.to_numpy()
    return np.array(col, dtype=np.int64)


def _compute_partitions(
    labels: np.ndarray,
    scheme: str,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_partition_size: int | None = None,
    self_balancing: bool = False,
) -> tuple[torch.Tensor, ...]:
    import datasets as hf
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        ShardPartitioner,
    )

    n = int(labels.shape[0])
    ids = np.arange(n, dtype=np.int64)
    if scheme == "iid":
        # IidPartitioner cuts contiguous blocks; a seeded permutation of the
        # example ids makes the blocks a seeded uniform random split.
        ids = np.random.default_rng(seed).permutation(n).astype(np.int64)
        labels = labels[ids]
    # Arrow format: a column comes back as one pyarrow array instead of a lazy
    # row-by-row Python iterator (the partitioners' label scan and our index
    # reads get ~100x faster; the partitions are the same).
    ds = hf.Dataset.from_dict({"label": labels, "idx": ids}).with_format("arrow")

    def read(partitioner) -> list[np.ndarray]:
        partitioner.dataset = ds
        return [_column(partitioner.load_partition(i), "idx") for i in range(num_partitions)]

    def dirichlet(minimum: int) -> DirichletPartitioner:
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=int(minimum),
            self_balancing=bool(self_balancing),
            shuffle=True,
            seed=seed,
        )

    try:
        with warnings.catch_warnings():
            # pyarrow >= 25 deprecates an option the shard sorter passes; flwr-datasets
            # warns on every redraw of the Dirichlet proportions.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            if scheme == "iid":
                parts = read(IidPartitioner(num_partitions=num_partitions))
            elif scheme == "shards":  # McMahan et al.'s pathological non-IID split, 2 label-sorted shards each
                parts = read(ShardPartitioner(
                    num_partitions=num_partitions, partition_by="label", num_shards_per_partition=2,
                    shuffle=True, seed=seed,
                ))
            elif min_partition_size is not None:
                parts = read(dirichlet(min_partition_size))
            else:
                # Automatic minimum. With too few examples per client no draw gives every
                # client one (10,000 clients on 60,000 examples at alpha = 0.3), and when
                # flwr-datasets gives up on the automatic minimum: draw once without a
                # minimum, then hand each empty client one example from the largest clients.
                parts = None
                if n >= DIRICHLET_FILL_BELOW * num_partitions:
                    try:
                        parts = read(dirichlet(dirichlet_min_partition_size(n, num_partitions)))
                    except ValueError:
                        pass
                if parts is None:
                    parts = _fill_empty_partitions(read(dirichlet(0)))
    except ValueError as exc:
        raise ValueError(
            f"cannot split {n} examples into {num_partitions} {scheme!r} partitions "
            f"(alpha={alpha}, seed={seed}): {exc}"
            + (
                f" (every Dirichlet partition must get at least {min_partition_size} examples: "
                f"use a smaller min-partition-size (unset: chosen automatically), a larger alpha "
                f"or fewer partitions)"
                if scheme == "dirichlet" and min_partition_size is not None
                else ""
            )
        ) from exc
    return tuple(torch.from_numpy(np.ascontiguousarray(p, dtype=np.int64)) for p in parts)


def _partition_file(key: tuple) -> Path | None:
    """Where the partitions of ``key`` are kept on disk (the partitioner's version is part of the name).

    Why on disk: under ``flwr run`` each message is a new ClientApp process, and
    computing the split imports ``datasets``/``flwr_datasets`` (seconds) and
    runs the partitioner, every round, in every client. The file is a pure
    function of the key (labels' fingerprint included), so any process may
    write it and any may read it.
    """
    try:
        partitioner = importlib.metadata.version("flwr-datasets")
    except importlib.metadata.PackageNotFoundError:
        return None
    name = hashlib.blake2b(repr((key, partitioner)).encode(), digest_size=16).hexdigest()
    return default_cache_dir() / "partitions" / f"{name}.npz"


def _read_partitions(path: Path | None, num_partitions: int, n: int) -> tuple[torch.Tensor, ...] | None:
    """The cached split, or None when there is none or it does not check out (then it is recomputed)."""
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            flat, offsets = f["indices"], f["offsets"]
        ok = (
            flat.dtype == np.int64 and offsets.dtype == np.int64 and flat.ndim == 1
            and offsets.shape == (num_partitions + 1,) and offsets[0] == 0 and offsets[-1] == flat.size
            and bool(np.all(np.diff(offsets) >= 0)) and (flat.size == 0 or (flat.min() >= 0 and flat.max() < n))
        )
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        ok = False
    if not ok:
        return None
    whole = torch.from_numpy(flat)
    return tuple(whole[offsets[i] : offsets[i + 1]] for i in range(num_partitions))


def _write_partitions(path: Path | None, parts: tuple[torch.Tensor, ...]) -> None:
    """Best effort, atomic (a read-only or full cache only costs the next process a recomputation)."""
    if path is None:
        return
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([int(p.numel()) for p in parts])
    flat = torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.int64)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, indices=flat.astype(np.int64, copy=False), offsets=offsets)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def _fill_empty_partitions(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Give every empty partition one example, taken from the largest partition at the time.

    Deterministic (ties: the lowest partition id; the example moved is the
    last of the donor's list), and it moves at most one example per empty
    partition, so the label skew of the draw is kept.
    """
    sizes = np.array([p.size for p in parts], dtype=np.int64)
    empty = np.flatnonzero(sizes == 0)
    if empty.size > int(sizes.sum()) - int((sizes > 0).sum()):
        raise ValueError(f"{empty.size} empty partitions and too few examples to give each one")
    parts = [p.copy() for p in parts]
    for target in empty:
        donor = int(np.argmax(sizes))
        parts[target], parts[donor] = parts[donor][-1:], parts[donor][:-1]
        sizes[target], sizes[donor] = 1, sizes[donor] - 1
    return parts


def partition_sizes_summary(sizes, batch_size: int | None = None) -> str:
    """One line of partition-size statistics (printed at the start of a run)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    line = (
        f"{sizes.size} partitions of {int(sizes.sum())} examples: min {int(sizes.min())}, "
        f"median {float(np.median(sizes)):g}, mean {float(sizes.mean()):.1f}, max {int(sizes.max())}"
    )
    if batch_size:
        line += f"; {int((sizes < batch_size).sum())} smaller than a batch of {batch_size} (they train on one smaller batch)"
    return line


def partition_indices(
    dataset_name: str,
    labels: torch.Tensor,
    scheme: str,
    num_partitions: int,
    partition_id: int,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    min_partition_size: int | None = None,
    self_balancing: bool = False,
) -> torch.Tensor:
    """Indices (int64, into ``labels``) of one client's share of a training set.

    ``scheme``:

    * ``"iid"``: uniform random split into equal-size parts (sizes differ by
      at most one);
    * ``"dirichlet"``: per-class proportions drawn from ``Dir(alpha)``
      (flwr-datasets ``DirichletPartitioner``). ``min_partition_size`` and
      ``self_balancing`` are its options; unset, the minimum is
      :func:`dirichlet_min_partition_size`, and when no draw reaches it (e.g.
      10,000 clients on Fashion-MNIST) one draw is made without a minimum and
      each empty client gets one example from the largest ones
      (:func:`_fill_empty_partitions`), so every client has at least one.
      ``alpha``, ``min_partition_size`` and ``self_balancing`` are used only here;
    * ``"shards"``: label-sorted data cut into ``2 * num_partitions`` equal
      shards, two per client (``ShardPartitioner``); the last
      ``N mod (2 * num_partitions)`` examples are left out.

    All partitions of one ``(dataset, labels, scheme, num_partitions, seed)`` (Dirichlet: and
    ``alpha``, ``min_partition_size``, ``self_balancing``)
    are computed together on first use and cached for the process and on disk
    (``<cache dir>/partitions``, keyed by the labels' fingerprint, the
    arguments and the flwr-datasets version; a file that does not check out is
    recomputed). The result is deterministic for a seed; treat it as read-only.
    """
    dataset_info(dataset_name)
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; expected one of {PARTITION_SCHEMES}")
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1:
        raise ValueError(f"num_partitions must be a positive integer, got {num_partitions!r}")
    if (
        isinstance(partition_id, bool)
        or not isinstance(partition_id, int)
        or not 0 <= partition_id < num_partitions
    ):
        raise ValueError(
            f"partition_id must be an integer in [0, {num_partitions}), got {partition_id!r}"
        )
    if scheme == "dirichlet" and not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    n = int(labels.shape[0])
    if num_partitions > n:
        raise ValueError(f"cannot split {n} examples into {num_partitions} partitions")
    if scheme == "shards" and 2 * num_partitions > n:  # flwr-datasets would divide by a shard size of 0
        raise ValueError(f"cannot cut {n} examples into 2 shards for each of {num_partitions} partitions")
    if min_partition_size is not None and (
        isinstance(min_partition_size, bool) or not isinstance(min_partition_size, int) or min_partition_size < 0
    ):
        raise ValueError(f"min_partition_size must be an integer >= 0 or None, got {min_partition_size!r}")
    dirichlet = scheme == "dirichlet"
    options = (float(alpha), min_partition_size, bool(self_balancing)) if dirichlet else None
    key = (dataset_name, _labels_fingerprint(labels), scheme, num_partitions, options, int(seed))
    with _PARTITION_LOCK:
        parts = _PARTITION_CACHE.get(key)
        if parts is None:
            disk = _partition_file(key)
            parts = _read_partitions(disk, num_partitions, n)
            if parts is None:
                labels_np = labels.detach().to("cpu", torch.int64).numpy()
                parts = _compute_partitions(
                    labels_np, scheme, num_partitions, float(alpha), int(seed), min_partition_size, bool(self_balancing)
                )
                _write_partitions(disk, parts)
            _PARTITION_CACHE[key] = parts
            while len(_PARTITION_CACHE) > _PARTITION_CACHE_MAX:
                _PARTITION_CACHE.popitem(last=False)
        else:
            _PARTITION_CACHE.move_to_end(key)
    return parts[partition_id]


def clear_caches(*, datasets: bool = True, partitions: bool = True, permutations: bool = True) -> None:
    """Forget cached datasets, partitions and/or batch permutations (frees memory; tests)."""
    if datasets:
        with _LOAD_LOCK:
            _DATASET_CACHE.clear()
    if partitions:
        with _PARTITION_LOCK:
            _PARTITION_CACHE.clear()
    if permutations:
        _epoch_permutation.cache_clear()


# ------------------------------------------------------------ batch order


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    """``ceil(num_examples / batch_size)``: the last batch of an epoch may be smaller."""
    return -(-num_examples // batch_size)


def _permutation_seed(seed: int, partition_id: int, epoch: int) -> int:
    data = struct.pack(">qqq", int(seed), int(partition_id), int(epoch))
    digest = hashlib.blake2b(data, digest_size=8, person=b"fl-sparse-batch").digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


@functools.lru_cache(maxsize=256)
def _epoch_permutation(num_examples: int, seed: int, partition_id: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_permutation_seed(seed, partition_id, epoch))
    return torch.randperm(num_examples, generator=gen, dtype=torch.int64)


def batch_indices(
    num_examples: int, batch_size: int, seed: int, partition_id: int, step: int
) -> torch.Tensor:
    """Positions (int64, in ``[0, num_examples)``) of minibatch number ``step``.

    Stateless: epoch ``e = step // B`` with ``B = ceil(num_examples /
    batch_size)`` walks ``torch.randperm(num_examples)`` drawn from a CPU
    ``torch.Generator`` seeded with ``blake2b(seed, partition_id, e)``; batch
    ``step % B`` is the slice ``[b * batch_size, (b + 1) * batch_size)`` of it
    (the last one of an epoch is shorter when ``batch_size`` does not divide
    ``num_examples``). Every example appears exactly once per epoch.

    A reference loop reproduces a client's data order by calling this with the
    client's cumulative local step count.
    """
    for name, value in (("num_examples", num_examples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    per_epoch = batches_per_epoch(num_examples, batch_size)
    epoch, b = divmod(step, per_epoch)
    perm = _epoch_permutation(num_examples, int(seed), int(partition_id), epoch)
    return perm[b * batch_size : (b + 1) * batch_size].clone()


class BatchStream:
    """A client's minibatch order as a pure function of the step number.

    Parameters
    ----------
    indices : Tensor or int
        The client's examples as indices into the full arrays (e.g. from
        :func:`partition_indices`), or a count ``n`` meaning ``arange(n)``.
    batch_size, seed, partition_id :
        As in :func:`batch_indices`.

    ``stream(step)`` returns the indices (into the full arrays) of minibatch
    ``step``; ``stream.window(start)`` is the callable ``h -> stream(start + h)``
    that :func:`fl_sparse.tasks.training.local_sgd` takes, so a round
    that starts after ``start`` earlier local steps continues the same order.
    """

    def __init__(
        self,
        indices: torch.Tensor | int,
        batch_size: int,
        *,
        seed: int,
        partition_id: int = 0,
    ) -> None:
        if isinstance(indices, int) and not isinstance(indices, bool):
            if indices < 1:
                raise ValueError(f"need at least one example, got {indices}")
            self.indices: torch.Tensor | None = None
            self.num_examples = indices
        else:
            idx = torch.as_tensor(indices, dtype=torch.int64)
            if idx.dim() != 1 or idx.numel() == 0:
                raise ValueError("indices must be a non-empty 1-D tensor")
            self.indices = idx
            self.num_examples = int(idx.numel())
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.seed = int(seed)
        self.partition_id = int(partition_id)

    @property
    def batches_per_epoch(self) -> int:
        return batches_per_epoch(self.num_examples, self.batch_size)

    def positions(self, step: int) -> torch.Tensor:
        """Positions within this client's examples (``0 .. n-1``) of batch ``step``."""
        return batch_indices(self.num_examples, self.batch_size, self.seed, self.partition_id, step)

    def __call__(self, step: int) -> torch.Tensor:
        pos = self.positions(step)
        return pos if self.indices is None else self.indices[pos]

    def window(self, start: int):
        """``h -> self(start + h)``: the order of a round that begins at local step ``start``."""
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be a non-negative integer, got {start!r}")
        return lambda h: self(start + h)

    def __repr__(self) -> str:
        return (
            f"BatchStream(num_examples={self.num_examples}, batch_size={self.batch_size}, "
            f"seed={self.seed}, partition_id={self.partition_id})"
        )
