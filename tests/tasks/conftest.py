"""Fixtures shared by the tests of fl_sparse.tasks."""

from __future__ import annotations

import pytest

from fl_sparse.tasks import data


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No system dir, no env dir, an empty cache, a fresh dataset cache, no downloads."""
    import torchvision.datasets as tvd

    def refuse(*args, **kwargs):
        raise RuntimeError("simulated: no internet")

    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", {})
    monkeypatch.delenv("FL_SPARSE_DATA", raising=False)
    monkeypatch.setenv("FL_SPARSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_DATASET_CACHE", {})
    for name in ("FashionMNIST", "MNIST", "CIFAR10"):
        monkeypatch.setattr(tvd, name, refuse)
    return tmp_path
