"""Review of the built-in experiment layer (data loading, the built-in ClientApp's node config)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from fl_sparse.clients import app as client_app
from fl_sparse.tasks import data
from fl_sparse.tasks.data import IdxFormatError, load_dataset

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _link_fmnist(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for stem in IDX_NAMES:
        (folder / f"{stem}.gz").symlink_to(SYSTEM_FMNIST / f"{stem}.gz")
    return folder


# ------------------------------------------------ MNIST and Fashion-MNIST share file names


@pytest.mark.skipif(not SYSTEM_FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_files_are_not_loaded_as_mnist(isolated, monkeypatch):
    """Both datasets ship as the same four IDX file names, of the same shapes. A data folder that holds
    Fashion-MNIST's files (e.g. $FL_SPARSE_DATA set for it, as the how-to says) was taken for MNIST:
    an "mnist" run silently trained and evaluated on Fashion-MNIST, normalized with MNIST's constants."""
    env = _link_fmnist(isolated / "env")
    monkeypatch.setenv("FL_SPARSE_DATA", str(env))
    with pytest.raises(IdxFormatError, match=r"fashion-mnist") as info:
        load_dataset("mnist")
    assert str(env) in str(info.value)


@pytest.mark.skipif(not SYSTEM_FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_a_base_folder_holding_another_dataset_is_passed_over_for_its_named_subfolder(isolated, monkeypatch):
    """Documented layout: each base is tried as is, then ``<base>/<name>/``. With Fashion-MNIST's files in
    the base and "MNIST" in ``<base>/mnist/``, load_dataset("mnist") took the base's Fashion-MNIST."""
    env = _link_fmnist(isolated / "env")
    # Stand-in for MNIST: Fashion-MNIST's files, dimmed to MNIST's mean pixel (shapes and labels kept).
    import gzip

    sub = env / "mnist"
    sub.mkdir()
    for stem in IDX_NAMES:
        raw = gzip.decompress((SYSTEM_FMNIST / f"{stem}.gz").read_bytes())
        if "images" in stem:
            header = 16
            pixels = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
            scaled = (pixels.float() * (0.1307 / 0.2860)).round().clamp(0, 255).to(torch.uint8)
            raw = raw[:header] + scaled.numpy().tobytes()
        (sub / stem).write_bytes(raw)
    monkeypatch.setenv("FL_SPARSE_DATA", str(env))
    train, test = load_dataset("mnist")
    assert abs(train.images.mean().item()) < 0.05  # normalized with MNIST's own constants
    fmnist_labels = torch.from_numpy(data.read_idx(SYSTEM_FMNIST / "train-labels-idx1-ubyte.gz").astype("int64"))
    assert torch.equal(train.labels, fmnist_labels)  # (the stand-in keeps Fashion-MNIST's labels)
    # the base's own files are still Fashion-MNIST's
    monkeypatch.setattr(data, "_DATASET_CACHE", {})
    fm_train, _ = load_dataset("fashion-mnist")
    assert abs(fm_train.images.mean().item()) < 0.01


# ------------------------------------------------ the built-in ClientApp's node config


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=77, node_config=node_config, state=RecordDict(), run_config={})


def test_a_node_without_partition_id_is_refused_when_the_data_is_split(monkeypatch):
    """docs/deployment.md starts each SuperNode with ``partition-id=k num-partitions=N``. One started
    without partition-id trained on partition 0, as did every other such node: N clients, one shard."""
    monkeypatch.setattr(client_app, "get_task", lambda spec: spec)  # no data needed: the spec is the point
    with pytest.raises(ValueError, match="partition-id"):
        client_app.builtin_task(_context({}), ConfigRecord({"num-partitions": 3}))
    with pytest.raises(ValueError, match="partition-id"):
        client_app.builtin_task(_context({"num-partitions": 3}), ConfigRecord({}))
    # one partition: partition 0 is the only one there is
    assert client_app.builtin_task(_context({}), ConfigRecord({})).partition_id == 0
    spec = client_app.builtin_task(_context({"partition-id": 2, "num-partitions": 3}), ConfigRecord({"num-partitions": 9}))
    assert (spec.partition_id, spec.num_partitions) == (2, 3)


@pytest.mark.parametrize("key", ["partition-id", "num-partitions"])
@pytest.mark.parametrize("value", ["abc", 2.7, True, ""])
def test_bad_node_config_values_are_named_not_truncated(monkeypatch, key, value):
    """``partition-id=2.7`` trained partition 2, ``True`` partition 1, and ``'abc'`` failed with
    int()'s "invalid literal" that names neither the key nor the node config."""
    monkeypatch.setattr(client_app, "get_task", lambda spec: spec)
    node = {"partition-id": 1, "num-partitions": 4, key: value}
    with pytest.raises(ValueError, match=key):
        client_app.builtin_task(_context(node), ConfigRecord({"num-partitions": 4}))


def test_integral_node_config_values_in_other_types_are_accepted(monkeypatch):
    monkeypatch.setattr(client_app, "get_task", lambda spec: spec)
    spec = client_app.builtin_task(_context({"partition-id": "3", "num-partitions": 5.0}), ConfigRecord({}))
    assert (spec.partition_id, spec.num_partitions) == (3, 5)
