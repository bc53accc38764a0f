"""Checkpoints: everything a run needs to continue, written atomically.

``fl-sparse simulate --out DIR`` (and ``run_server`` with ``out`` set) writes
``DIR/checkpoint.pt`` every ``checkpoint-every`` rounds, at the last round and
when the run stops early (Ctrl-C, ``max-failed-rounds``). ``fl-sparse simulate
--resume DIR [--rounds T]`` continues from it (see
:func:`fl_sparse.server_app.resume_config`).

Format: one ``torch.save`` file of plain Python values and tensors (dicts,
lists, str, int, float, bool, None, ``torch.Tensor``, ``bytes``), read back
with ``torch.load(weights_only=True)``: loading a checkpoint never runs code
from the file. Top-level keys:

``format``, ``version``
    ``"fl-sparse-checkpoint"`` and :data:`FORMAT_VERSION`; another version is
    refused with a :class:`CheckpointError`.
``fl_sparse``
    The package version that wrote it (informational).
``round``
    The last round completed: a resumed run starts at ``round + 1``.
``config``
    The run's :class:`~fl_sparse.server_app.RunConfig` as a dict.
``rows``
    The per-round metrics rows so far (what ``metrics.json`` holds).
``strategy``
    The strategy's :meth:`~fl_sparse.strategies.SparseFedAvg.state_dict`:
    global model, server error memory, exact arrays, version and generation,
    each client's model version and last accepted round, the sync history and
    last update record, node keys, cumulative error, the round metrics, plus
    what a subclass keeps (SSGD-MV's vote sums, stored votes, last mask and
    values record; AdapTop-K's t̂ and planned k_t).
``client_state_dir``
    ``"out/client-state"`` when the clients' files are beside the checkpoint
    (the server's choice), None when the user named a state dir. Clients key their files by the strategy's generation
    (``<state-dir>/gen-<generation>``), which the strategy state keeps, so a
    resumed run's clients find their error memory under a new Flower run id;
    when the folder changed, or the run went on past its last checkpoint,
    every client is re-synced densely instead.

Atomic write: the file is written to ``checkpoint.pt.tmp``, fsynced, renamed
over ``checkpoint.pt`` (``os.replace``) and the folder fsynced. A crash at any
point leaves the previous checkpoint (or none), never a torn one.

``DIR/run.in-progress`` exists while a run is going on in ``DIR``; a clean
end (last round, Ctrl-C stop, failed-rounds stop) writes the checkpoint of its
last round and removes the marker. A resume that finds the marker knows the
process died after its last checkpoint, so clients may hold a newer model
than the checkpoint: their first message of the resumed run carries the
dense model, and the rounds after the checkpoint are run again. A client
that had trained the round the process died in recognises it when it comes
again (its update of that round is still pending): it puts the update back
into its error memory and compensates a zero step, so it sends what it sent
the first time instead of taking the round's step twice
(``fl_sparse.clients.mod.restore_unaccepted``). With a checkpoint every
round (the default) the resumed run thus ends exactly where the
uninterrupted one would on CPU (``tests/test_run_review.py``). A process
that died more than one round after its checkpoint (``checkpoint_every`` >
1) leaves the clients' error memories holding what they did in the rounds
since: nothing is lost, but the run differs. A stopped run (Ctrl-C, the
last round, ``max-failed-rounds``) continues exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord

__all__ = [
    "CHECKPOINT",
    "RUNNING",
    "FORMAT_VERSION",
    "CheckpointError",
    "save",
    "load",
    "mark_running",
    "clear_running",
    "was_running",
    "record_to_state",
    "record_from_state",
]

CHECKPOINT = "checkpoint.pt"
RUNNING = "run.in-progress"
FORMAT = "fl-sparse-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here (missing, unreadable, another format, strategy or model)."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not fsync folders
        pass
    finally:
        os.close(fd)


def save(directory: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus format and version) as ``directory/checkpoint.pt``, atomically."""
    from fl_sparse import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / CHECKPOINT
    tmp = directory / (CHECKPOINT + ".tmp")
    data = {"format": FORMAT, "version": FORMAT_VERSION, "fl_sparse": __version__, **payload}
    try:
        with open(tmp, "wb") as fh:
            torch.save(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(directory)
    return final


def load(directory: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint in ``directory`` (or the file itself); raises :class:`CheckpointError`.

    ``mmap=True`` maps the tensors instead of reading them (cheap, read-only
    use: to look at the config and round).
    """
    path = Path(directory)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path} (a run with --out DIR writes DIR/{CHECKPOINT})")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an fl-sparse checkpoint")
    if data.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is a version {data.get('version')!r} checkpoint (written by fl-sparse {data.get('fl_sparse')}); "
            f"this fl-sparse reads version {FORMAT_VERSION}"
        )
    for key in ("round", "config", "rows", "strategy"):
        if key not in data:
            raise CheckpointError(f"{path} lacks {key!r}")
    return data


def mark_running(directory: str | os.PathLike) -> None:
    """Create ``directory/run.in-progress`` (durably) before a run's first round."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / RUNNING, "w") as fh:
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(directory)


def clear_running(directory: str | os.PathLike) -> None:
    """Remove the marker: the last checkpoint is the state the run ended in."""
    directory = Path(directory)
    try:
        (directory / RUNNING).unlink()
    except FileNotFoundError:
        return
    _fsync_dir(directory)


def was_running(directory: str | os.PathLike) -> bool:
    """True if a run in ``directory`` did not end cleanly (its clients may be past the checkpoint)."""
    return (Path(directory) / RUNNING).exists()


# ------------------------------------------------------------- ArrayRecords
def record_to_state(record: ArrayRecord | None) -> list[dict[str, Any]] | None:
    """An ArrayRecord as plain values (name, dtype, shape, stype, bytes), in its order."""
    if record is None:
        return None
    return [
        {"name": name, "dtype": a.dtype, "shape": list(a.shape), "stype": a.stype, "data": bytes(a.data)}
        for name, a in record.items()
    ]


def record_from_state(state: list[dict[str, Any]] | None) -> ArrayRecord | None:
    """The ArrayRecord :func:`record_to_state` wrote (same arrays, bytes and order)."""
    if state is None:
        return None
    record = ArrayRecord()
    for entry in state:
        record[str(entry["name"])] = Array(
            dtype=str(entry["dtype"]), shape=tuple(int(s) for s in entry["shape"]), stype=str(entry["stype"]),
            data=bytes(entry["data"]),
        )
    return record
