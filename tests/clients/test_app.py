"""The built-in ClientApp's device choice (``fl_sparse.clients.app``)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord

from fl_sparse.clients.app import _device


def test_an_explicit_cpu_device_is_kept():
    assert _device(ConfigRecord({"device": "cpu"})) == torch.device("cpu")


def test_auto_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _device(ConfigRecord({})) == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_names_the_cuda_index_the_parameters_report():
    """A model moved to 'cuda' reports 'cuda:0': the device must compare equal, or training moves it every message."""
    device = _device(ConfigRecord({"device": "auto"}))
    model = torch.nn.Linear(2, 2).to(device)
    assert all(p.device == device for p in model.parameters())
    assert _device(ConfigRecord({"device": "cuda"})) == device
