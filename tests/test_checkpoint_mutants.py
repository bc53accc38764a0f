"""Tests written to kill mutmut survivors of fl_sparse/checkpoint.py (save/load, the running marker,
ArrayRecords as plain state).

They pin what the module's docstring promises and the resume tests took for granted: the file's
name and format fields (a checkpoint written by an earlier fl-sparse of the same format version
must still load), every refusal naming the file and the problem, loading never running code from
the file, the write being atomic and durable (flushed and fsynced before the rename, the folder
fsynced after it, the temporary file gone and the old checkpoint intact on any failure, Ctrl-C
included), ``mmap=True`` mapping the file, and ArrayRecords surviving a save/load round trip
with their dtype, shape, stype, bytes and order.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

import fl_sparse
from fl_sparse import checkpoint
from fl_sparse.checkpoint import CheckpointError

PAYLOAD = {"round": 3, "config": {"strategy": "topk"}, "rows": [{"round": 1}], "strategy": {"w": torch.arange(4.0)}}


def _escaped(path) -> str:
    return re.escape(str(path))


# ------------------------------------------------------------------ file names and format
def test_the_file_names_are_the_documented_ones(tmp_path):
    """Users and the docs name these files: DIR/checkpoint.pt and DIR/run.in-progress."""
    assert checkpoint.save(tmp_path, PAYLOAD) == tmp_path / "checkpoint.pt"
    checkpoint.mark_running(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "run.in-progress"]


def test_save_writes_format_version_and_package_version(tmp_path):
    checkpoint.save(tmp_path, PAYLOAD)
    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert raw["format"] == "fl-sparse-checkpoint" and raw["version"] == 1
    assert raw["fl_sparse"] == fl_sparse.__version__
    assert raw["round"] == 3 and raw["rows"] == [{"round": 1}] and torch.equal(raw["strategy"]["w"], torch.arange(4.0))


def test_a_version_1_checkpoint_written_by_hand_loads(tmp_path):
    """The on-disk format, not this module's constants: an older fl-sparse's file stays readable."""
    torch.save({"format": "fl-sparse-checkpoint", "version": 1, "fl_sparse": "0.0.1", **PAYLOAD},
               tmp_path / "checkpoint.pt")
    data = checkpoint.load(tmp_path)
    assert data["round"] == 3 and data["fl_sparse"] == "0.0.1"


def test_load_takes_the_file_itself_as_well_as_its_folder(tmp_path):
    path = checkpoint.save(tmp_path, PAYLOAD)
    assert checkpoint.load(path)["round"] == 3
    assert checkpoint.load(str(tmp_path))["round"] == 3


def test_save_creates_missing_parent_folders_and_overwrites(tmp_path):
    nested = tmp_path / "a" / "b"
    checkpoint.save(nested, PAYLOAD)
    checkpoint.save(nested, PAYLOAD | {"round": 4})
    assert checkpoint.load(nested)["round"] == 4
    assert sorted(p.name for p in nested.iterdir()) == ["checkpoint.pt"]  # no temporary file left


# ------------------------------------------------------------------ refusals
def test_no_checkpoint_names_the_path_and_the_flag(tmp_path):
    expected = f"^no checkpoint at {_escaped(tmp_path / 'checkpoint.pt')} \\(a run with --out DIR writes DIR/checkpoint\\.pt\\)$"
    with pytest.raises(CheckpointError, match=expected):
        checkpoint.load(tmp_path)
    with pytest.raises(CheckpointError, match=f"^no checkpoint at {_escaped(tmp_path / 'gone.pt')} "):
        checkpoint.load(tmp_path / "gone.pt")


def test_an_unreadable_file_names_the_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"^cannot read checkpoint {_escaped(tmp_path / 'checkpoint.pt')}: "
                                              r"UnpicklingError: .+") as info:
        checkpoint.load(tmp_path)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # raised `from None`


class _Payload:
    """Would create ``marker`` when unpickled by a loader that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_loading_never_runs_code_from_the_file(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"format": "fl-sparse-checkpoint", "version": 1, **PAYLOAD, "config": _Payload(marker)},
               tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="^cannot read checkpoint .*: UnpicklingError: "):
        checkpoint.load(tmp_path)
    assert not marker.exists()


def test_a_checkpoint_written_on_a_gpu_loads_on_the_cpu(tmp_path, monkeypatch):
    """Tensors saved from CUDA carry a 'cuda:0' location tag: load maps them to the CPU, whatever this machine has."""
    import torch.serialization

    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")  # as a GPU run writes them
        checkpoint.save(tmp_path, PAYLOAD)
    if not torch.cuda.is_available():  # the file really names a CUDA device
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    w = checkpoint.load(tmp_path)["strategy"]["w"]
    assert w.device == torch.device("cpu") and torch.equal(w, torch.arange(4.0))


@pytest.mark.parametrize("content", [[1, 2], {"format": "something-else", "version": 1}, {"version": 1}])
def test_not_an_fl_sparse_checkpoint(tmp_path, content):
    torch.save(content, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=f"^{_escaped(tmp_path / 'checkpoint.pt')} is not an fl-sparse checkpoint$"):
        checkpoint.load(tmp_path)


@pytest.mark.parametrize(("version", "shown"), [(2, "2"), (0, "0"), (None, "None"), ("1", "'1'")])
def test_another_version_names_both_versions_and_the_writer(tmp_path, version, shown):
    torch.save({"format": "fl-sparse-checkpoint", "version": version, "fl_sparse": "9.9", **PAYLOAD},
               tmp_path / "checkpoint.pt")
    expected = (f"^{_escaped(tmp_path / 'checkpoint.pt')} is a version {re.escape(shown)} checkpoint "
                r"\(written by fl-sparse 9\.9\); this fl-sparse reads version 1$")
    with pytest.raises(CheckpointError, match=expected):
        checkpoint.load(tmp_path)


@pytest.mark.parametrize("key", ["round", "config", "rows", "strategy"])
def test_a_missing_top_level_key_is_named(tmp_path, key):
    checkpoint.save(tmp_path, {k: v for k, v in PAYLOAD.items() if k != key})
    with pytest.raises(CheckpointError, match=f"^{_escaped(tmp_path / 'checkpoint.pt')} lacks '{key}'$"):
        checkpoint.load(tmp_path)


# ------------------------------------------------------------------ mmap
def _mapped(path: Path) -> bool:
    with open("/proc/self/maps") as fh:
        return any(line.rstrip().endswith(str(path)) for line in fh)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_mmap_maps_the_file_and_the_default_reads_it(tmp_path):
    path = checkpoint.save(tmp_path, PAYLOAD | {"strategy": {"w": torch.arange(1 << 16, dtype=torch.float32)}})
    read = checkpoint.load(tmp_path)
    assert not _mapped(path)
    mapped = checkpoint.load(tmp_path, mmap=True)
    assert _mapped(path)
    assert torch.equal(mapped["strategy"]["w"], read["strategy"]["w"]) and mapped["round"] == 3
    del mapped


# ------------------------------------------------------------------ atomic, durable writes
class _Fsyncs:
    """Records each fsync: the file or folder it was for and the size on disk at that moment."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[str, int]] = []
        real = os.fsync

        def fsync(fd):
            st = os.fstat(fd)
            self.calls.append((os.readlink(f"/proc/self/fd/{fd}"), st.st_size))
            return real(fd)

        monkeypatch.setattr(checkpoint.os, "fsync", fsync)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_save_flushes_and_fsyncs_the_whole_file_then_the_folder(tmp_path, monkeypatch):
    fsyncs = _Fsyncs(monkeypatch)
    big = PAYLOAD | {"strategy": {"w": torch.arange(100_000, dtype=torch.float64)}}  # more than one buffer
    final = checkpoint.save(tmp_path, big)
    size = final.stat().st_size
    assert fsyncs.calls == [(str(tmp_path / "checkpoint.pt.tmp"), size), (str(tmp_path), fsyncs.calls[1][1])]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_mark_running_writes_the_pid_durably(tmp_path, monkeypatch):
    fsyncs = _Fsyncs(monkeypatch)
    checkpoint.mark_running(tmp_path / "new" / "run")  # missing parents are created
    marker = tmp_path / "new" / "run" / "run.in-progress"
    assert marker.read_text() == f"{os.getpid()}\n"
    assert [path for path, _ in fsyncs.calls] == [str(marker), str(tmp_path / "new" / "run")]
    assert fsyncs.calls[0][1] == len(f"{os.getpid()}\n")  # flushed before the fsync


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_clear_running_removes_the_marker_durably_and_tolerates_none(tmp_path, monkeypatch):
    checkpoint.mark_running(tmp_path)
    assert checkpoint.was_running(tmp_path) and checkpoint.was_running(str(tmp_path))
    fsyncs = _Fsyncs(monkeypatch)
    checkpoint.clear_running(tmp_path)
    assert not checkpoint.was_running(tmp_path) and not (tmp_path / "run.in-progress").exists()
    assert [path for path, _ in fsyncs.calls] == [str(tmp_path)]
    checkpoint.clear_running(tmp_path)  # nothing to remove: no error, and nothing to fsync
    checkpoint.clear_running(tmp_path / "never-created")
    assert [path for path, _ in fsyncs.calls] == [str(tmp_path)]


def test_was_running_is_false_for_an_empty_or_missing_folder(tmp_path):
    assert checkpoint.was_running(tmp_path) is False
    assert checkpoint.was_running(tmp_path / "missing") is False


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_fsyncing_the_folder_closes_what_it_opened(tmp_path):
    before = _open_fds()
    for _ in range(5):
        checkpoint.save(tmp_path, PAYLOAD)
        checkpoint.mark_running(tmp_path)
        checkpoint.clear_running(tmp_path)
    assert _open_fds() == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_a_folder_that_cannot_be_fsynced_is_not_an_error(tmp_path, monkeypatch):
    real = os.fsync

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}") or os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(22, "Invalid argument")  # what some filesystems say for a folder
        return real(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    before = _open_fds()
    assert checkpoint.save(tmp_path, PAYLOAD) == tmp_path / "checkpoint.pt"
    checkpoint.mark_running(tmp_path)
    checkpoint.clear_running(tmp_path)
    assert checkpoint.load(tmp_path)["round"] == 3
    assert _open_fds() == before  # the folder's descriptor is closed after a failed fsync too


def test_a_folder_that_cannot_be_opened_is_not_an_error(tmp_path, monkeypatch):
    real = os.open

    def open_(path, flags, *args, **kwargs):
        if Path(path) == tmp_path:
            raise PermissionError(13, "Permission denied")
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(checkpoint.os, "open", open_)
    assert checkpoint.save(tmp_path, PAYLOAD) == tmp_path / "checkpoint.pt"
    assert checkpoint.load(tmp_path)["round"] == 3


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_an_interrupted_write_keeps_the_old_checkpoint_and_removes_the_temporary(tmp_path, monkeypatch, failure):
    """Ctrl-C (not an Exception) or a full disk in the middle of torch.save: old file intact, no .tmp left."""
    checkpoint.save(tmp_path, PAYLOAD)
    real_save = torch.save

    def interrupted(obj, fh, *args, **kwargs):
        fh.write(b"half a checkpoint")
        raise failure("stop")

    monkeypatch.setattr(checkpoint.torch, "save", interrupted)
    with pytest.raises(failure, match="^stop$"):
        checkpoint.save(tmp_path, PAYLOAD | {"round": 4})
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert checkpoint.load(tmp_path)["round"] == 3


def test_a_failure_whose_temporary_is_already_gone_raises_the_original_error(tmp_path, monkeypatch):
    real_replace = os.replace

    def replace_losing_the_file(src, dst):
        os.unlink(src)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(checkpoint.os, "replace", replace_losing_the_file)
    with pytest.raises(OSError, match="Input/output error"):
        checkpoint.save(tmp_path, PAYLOAD)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ ArrayRecords as plain state
def _record() -> ArrayRecord:
    record = ArrayRecord()
    record["z.weight"] = Array(np.arange(6, dtype=np.float16).reshape(2, 3))
    record["a.bias"] = Array(np.array([1, -2], dtype=np.int64))
    record["scalar"] = Array(np.array(2.5, dtype=np.float64))
    record["raw"] = Array(dtype="uint8", shape=(3,), stype="custom", data=b"\x01\x02\x03")
    return record


def test_record_to_state_is_plain_values_in_the_records_order():
    state = checkpoint.record_to_state(_record())
    assert [e["name"] for e in state] == ["z.weight", "a.bias", "scalar", "raw"]
    assert state[0] == {"name": "z.weight", "dtype": "float16", "shape": [2, 3], "stype": "numpy.ndarray",
                        "data": _record()["z.weight"].data}
    assert state[2]["shape"] == [] and state[3] == {"name": "raw", "dtype": "uint8", "shape": [3], "stype": "custom",
                                                    "data": b"\x01\x02\x03"}
    assert all(type(e["data"]) is bytes and type(e["shape"]) is list for e in state)


def test_none_is_none_both_ways():
    assert checkpoint.record_to_state(None) is None
    assert checkpoint.record_from_state(None) is None
    assert checkpoint.record_to_state(ArrayRecord()) == []
    empty = checkpoint.record_from_state([])
    assert isinstance(empty, ArrayRecord) and len(empty) == 0


def test_a_record_survives_a_checkpoint_round_trip(tmp_path):
    original = _record()
    checkpoint.save(tmp_path, PAYLOAD | {"strategy": {"record": checkpoint.record_to_state(original)}})
    back = checkpoint.record_from_state(checkpoint.load(tmp_path)["strategy"]["record"])
    assert list(back.keys()) == list(original.keys())
    for name, array in original.items():
        got = back[name]
        assert (got.dtype, got.shape, got.stype, got.data) == (array.dtype, array.shape, array.stype, array.data)
        assert type(got.shape) is tuple and all(type(n) is int for n in got.shape)
    np.testing.assert_array_equal(back["z.weight"].numpy(), np.arange(6, dtype=np.float16).reshape(2, 3))
    assert back["z.weight"].numpy().dtype == np.float16 and back["scalar"].numpy().shape == ()


def test_record_from_state_takes_the_numbers_torch_load_may_give():
    """Entries built by hand or by another writer: numpy/torch integers and strings are normalised."""
    state = [{"name": "w", "dtype": "float32", "shape": [np.int64(2), torch.tensor(1)], "stype": "numpy.ndarray",
              "data": bytearray(Array(np.ones((2, 1), dtype=np.float32)).data)}]
    record = checkpoint.record_from_state(state)
    assert record["w"].shape == (2, 1) and type(record["w"].shape[0]) is int and type(record["w"].data) is bytes
    np.testing.assert_array_equal(record["w"].numpy(), np.ones((2, 1), dtype=np.float32))
