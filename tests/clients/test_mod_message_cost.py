"""SparseMod's cheaper per-message path (issue 11): thread guard and finiteness check.

Drives the mod as Flower does, with the server and user helpers of ``test_mod.py``.
"""

from __future__ import annotations

import math
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_mod import Client, QuickstartTrain, Server, _bad_train, initial_arrays

from fl_sparse import codec, protocol
from fl_sparse.clients import mod as mod_module
from fl_sparse.clients.mod import SyncError
from fl_sparse.flat import FlatLayout


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


class ThreadSpy:
    """Records torch's thread count in the user's train function and in the mod's encoder."""

    def __init__(self, monkeypatch):
        self.user, self.encode = [], []
        real_encode = codec.encode

        def encode(*args, **kwargs):
            self.encode.append(torch.get_num_threads())
            return real_encode(*args, **kwargs)

        monkeypatch.setattr(mod_module.codec, "encode", encode)
        base = QuickstartTrain()

        def train(msg, context):
            self.user.append(torch.get_num_threads())
            return base(msg, context)

        self.train = train


def test_small_models_get_one_thread_in_the_mod_and_the_users_count_in_train(two_threads, monkeypatch, tmp_path):
    spy = ThreadSpy(monkeypatch)
    server, client = Server(initial_arrays()), Client(tmp_path, spy.train)
    reply = client.send(server.message(1, sync_mode="dense"))
    assert not reply.has_error()
    assert spy.user == [2]  # the user's train function runs with the user's setting
    assert spy.encode == [1]  # the mod's own work on a small vector: one thread
    assert torch.get_num_threads() == 2  # and the setting is back afterwards


def test_large_models_keep_every_thread(two_threads, monkeypatch, tmp_path):
    monkeypatch.setattr(mod_module, "_ONE_THREAD_MAX_NUMEL", 10)  # the test model (107 floats) counts as large
    spy = ThreadSpy(monkeypatch)
    server, client = Server(initial_arrays()), Client(tmp_path, spy.train)
    assert not client.send(server.message(1, sync_mode="dense")).has_error()
    assert spy.user == [2] and spy.encode == [2] and torch.get_num_threads() == 2


def test_the_thread_count_is_restored_when_the_mod_raises(two_threads, tmp_path):
    server, client = Server(initial_arrays()), Client(tmp_path)
    bad = server.message(1, sync_mode="dense")
    server.w = server.w + 1.0  # the instruction's hash now names another model than the one synced
    bad.content[protocol.RECORD] = server.instruction(1, sync_mode="dense").to_record()
    with pytest.raises(SyncError, match="hash"):
        client.send(bad)
    assert torch.get_num_threads() == 2
    bad_train = Client(tmp_path, _bad_train(lambda a: a["fc1.bias"].__setitem__(0, np.nan)))
    with pytest.raises(ValueError, match="non-finite"):
        bad_train.send(server.message(1, sync_mode="dense"))
    assert torch.get_num_threads() == 2


_LAYOUT = FlatLayout.from_arrayrecord(initial_arrays())
_OFFSETS = np.cumsum([0] + [math.prod(s) for s in _LAYOUT.shapes])


@given(
    position=st.integers(0, int(_OFFSETS[-1]) - 1),
    bad=st.sampled_from([math.nan, math.inf, -math.inf]),
)
@settings(max_examples=40, deadline=None)
def test_a_non_finite_entry_anywhere_is_refused_naming_its_array(position, bad):
    array = int(np.searchsorted(_OFFSETS, position, side="right")) - 1
    name, within = _LAYOUT.names[array], position - int(_OFFSETS[array])

    def mutate(arrays):
        arrays[name].reshape(-1)[within] = bad

    with tempfile.TemporaryDirectory() as folder:
        client = Client(folder, _bad_train(mutate))
        with pytest.raises(ValueError, match=f"non-finite values in array '{name}'"):
            client.send(Server(initial_arrays()).message(1, sync_mode="dense"))
        assert not client.state_file().exists()
