"""Server-side plumbing of a simulation: where client state goes, how the Grid polls, Ray settings."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from fl_sparse.server_app import RunConfig, simulation_state_dir
from fl_sparse.simulations.runner import INLINE_OBJECT_BYTES, backend_config


def test_state_dir_goes_to_ram_only_when_all_states_fit_in_a_quarter(tmp_path, monkeypatch):
    shm = tmp_path / "shm"
    shm.mkdir()
    free = 10 * 2**30
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(free, 0, free))
    fits = simulation_state_dir(numel=50_890, clients=100, shm=str(shm))
    assert Path(fits).parent == shm
    # ResNet-18 x 100 clients: ~9 GB of state, more than a quarter of 10 GiB.
    too_big = simulation_state_dir(numel=11_173_962, clients=100, shm=str(shm))
    assert Path(too_big).parent == Path(tempfile.gettempdir())
    os.rmdir(too_big)
    missing = simulation_state_dir(numel=10, clients=1, shm=str(tmp_path / "no-such-dir"))
    assert Path(missing).parent == Path(tempfile.gettempdir())
    os.rmdir(missing)


def test_backend_config_raises_rays_inline_limit_and_keeps_resources(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = RunConfig(clients=10, num_cpus=0.5, num_gpus=0.25)
    backend = backend_config(cfg)
    assert backend["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.25}
    assert backend["init_args"]["_system_config"]["max_direct_call_object_size"] == INLINE_OBJECT_BYTES
    # a dense MLP sync (~200 kB) fits; a ResNet-18 one (~45 MB) does not
    assert 4 * 242_762 < INLINE_OBJECT_BYTES < 4 * 11_173_962


def test_backend_config_sends_no_system_settings_to_an_existing_cluster(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    init_args = backend_config(RunConfig())["init_args"]
    assert "_system_config" not in init_args and init_args["include_dashboard"] is False
