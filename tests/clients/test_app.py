"""The built-in ClientApp's device choice (``fl_sparse.clients.app``): the node config's ``device``, else the
train config's, else "auto"."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

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


def _node(**node_config) -> Context:
    return Context(run_id=1, node_id=2, node_config=node_config, state=RecordDict(), run_config={})


def test_the_node_configs_device_wins_over_the_train_configs():
    """A node knows its hardware: "device='cpu'" keeps it on the CPU whatever the server asks."""
    assert _device(ConfigRecord({"device": "cuda:7"}), _node(device="cpu")) == torch.device("cpu")
    assert _device(ConfigRecord({"device": "cpu"}), _node(**{"partition-id": 0})) == torch.device("cpu")


def test_auto_from_the_node_config_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _device(ConfigRecord({"device": "cuda"}), _node(device="auto")) == torch.device("cpu")


@pytest.mark.parametrize(
    "config,node,message",
    [
        ({}, {"device": 5}, "node config device=5 is not a device name"),
        ({}, {"device": "gpu"}, "node config device='gpu' is not a device name"),
        ({"device": "gpu"}, {}, "train config device='gpu' is not a device name"),
        ({"device": 1.0}, {}, "train config device=1.0 is not a device name"),
        ({}, {"device": "cuda:64"}, r"node config device='cuda:64', but this node has \d+ CUDA device\(s\)"),
    ],
)
def test_a_device_that_is_not_one_is_named_with_where_it_came_from(config, node, message):
    with pytest.raises(ValueError, match=message):
        _device(ConfigRecord(config), _node(**node))


def test_cuda_on_a_node_without_cuda_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^train config device='cuda', but this node has 0 CUDA device\(s\)$"):
        _device(ConfigRecord({"device": "cuda"}))


def test_a_nodes_device_reaches_the_train_function_of_a_real_run(tmp_path):
    """Through Flower Messages and the server's loop: a node config naming a device this node lacks fails
    that node's training with the name, and the run says so (a node-config 'cpu' is what the reference-loop
    tests use on a GPU machine)."""
    from fl_sparse.clients.app import app as client_app
    from fl_sparse.server_app import RunConfig, RunFailed, run_server
    from inprocess import InProcessGrid

    cfg = RunConfig(model="mlp-784-64-10", clients=2, rounds=2, local_steps=1, batch_size=10, ratio=0.01, seed=0,
                    quiet=True, max_failed_rounds=1, out=str(tmp_path), state_dir=str(tmp_path / "state"))
    grid = InProcessGrid(client_app, 2, node_config=lambda i: {"device": "cuda:64"})
    with pytest.raises(RunFailed, match=r"node config device='cuda:64', but this node has \d+ CUDA device\(s\)"):
        run_server(grid, cfg)
