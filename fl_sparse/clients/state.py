"""Where a client keeps what must outlive one message: its model copy and error memory.

Why not ``context.state``? Flower pickles the whole Context into the Ray
actor and back with every message. For 100 clients x ResNet-18 (two 44 MB
vectors each: model copy and error memory) that is ~90 MB of pickling per
message and ~9 GB held by the simulation engine. A SuperNode restart also
loses ``context.state``.

:class:`ClientStateStore` keeps one file per client under a directory:

* simulation: ``<state-dir>/<run-id>/client-<partition-id>.state``; the
  server picks ``state-dir`` (a temporary folder, in ``/dev/shm`` when it has
  room, see :func:`fl_sparse.server_app.simulation_state_dir`) and removes it
  after the run;
* deployment: the SuperNode's ``--node-config "state-dir='/var/lib/fl-sparse'"``
  (or the ``FL_SPARSE_STATE_DIR`` environment variable) names a persistent
  folder, so the memory survives a SuperNode restart.

Writes are atomic (write to a temporary file, fsync, ``os.replace``): a crash
while saving leaves the previous round's state, never a torn file. A store
for a throw-away folder (the simulation's temporary state dir) may skip the
fsync (``durable=False``): still atomic, just not flushed to the disk.

The file is a small JSON header followed by the raw tensor bytes (see
:func:`encode_state`), not ``torch.save``'s zip archive: a client saves its
state after every message, and at MLP size the archive's per-entry overhead
cost more than the bytes themselves. Every length in the header is checked
against the file before anything is read, so a torn or foreign file raises
:class:`StateCorruptError` naming it.

Every process keeps a write-through cache of the states it saved (up to
``FL_SPARSE_STATE_CACHE_MB``, default 512 MB, least recently used first
out), so a Ray actor or SuperNode that handles a client again reads its
state from memory instead of the file. A cached entry is used
only while the file is the very one it wrote (same inode, size and
mtime; ``os.replace`` gives every save a new inode), so a state written by
another process is always read from the file. Loads return copies: a caller
that changes the state and then fails leaves the cache as the file is.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["ClientState", "ClientStateStore", "StateCorruptError", "decode_state", "encode_state"]


class StateCorruptError(RuntimeError):
    """A stored client state could not be read back."""


@dataclass
class ClientState:
    """Everything a client remembers between rounds.

    ``model`` is the client's copy of the global model at ``model_version``
    (``None`` before the first dense sync); ``error`` is the error-feedback
    memory; ``steps_done`` counts the rounds this client has trained;
    ``extra`` holds strategy-specific tensors (e.g. the
    previous vote of SSGD-MV-AD).
    """

    model: torch.Tensor | None = None
    model_version: int = -1
    error: torch.Tensor | None = None
    steps_done: int = 0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_payload(self) -> dict:
        return {
            "model": self.model,
            "model_version": self.model_version,
            "error": self.error,
            "steps_done": self.steps_done,
            "extra": self.extra,
        }

    @classmethod
    def from_payload(cls, payload: dict) -> "ClientState":
        return cls(
            model=payload.get("model"),
            model_version=int(payload.get("model_version", -1)),
            error=payload.get("error"),
            steps_done=int(payload.get("steps_done", 0)),
            extra=dict(payload.get("extra") or {}),
        )


# ------------------------------------------------------------------ file format
MAGIC = b"FLSPARSE-STATE-1\n"
_ALIGN = 64  # every tensor starts on a 64-byte boundary, as torch's own allocations do
_DTYPES = {
    str(dt).removeprefix("torch."): dt
    for dt in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    )
}


def _tensors(state: ClientState) -> list[tuple[str, torch.Tensor]]:
    named = [("model", state.model), ("error", state.error)]
    named += [(f"extra/{key}", value) for key, value in state.extra.items()]
    out = []
    for name, tensor in named:
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"client state entry {name!r} is a {type(tensor).__name__}, not a tensor")
        out.append((name, tensor.detach().to("cpu").contiguous()))
    return out


def encode_state(state: ClientState) -> list[memoryview | bytes]:
    """``state`` as the chunks of one file: magic, header length, JSON header, tensors.

    The header lists ``[name, dtype, shape, offset]`` per tensor; offsets count
    from the start of the data section, which begins right after the header.
    Chunks are views of the tensors' memory (no copy); write them in order.
    """
    entries, chunks, offset = [], [], 0
    for name, tensor in _tensors(state):
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise TypeError(f"client state entry {name!r} has unsupported dtype {tensor.dtype}")
        pad = -offset % _ALIGN
        if pad:
            chunks.append(bytes(pad))
            offset += pad
        entries.append([name, dtype, list(tensor.shape), offset])
        if tensor.numel():
            chunks.append(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            offset += tensor.numel() * tensor.element_size()
    header = json.dumps(
        {
            "model_version": int(state.model_version),
            "steps_done": int(state.steps_done),
            "tensors": entries,
            "data_bytes": offset,
        },
        separators=(",", ":"),
    ).encode()
    # Pad the header (JSON allows trailing spaces) so the data section starts
    # on an _ALIGN boundary: a reader can then use the tensors in place.
    header += b" " * (-(len(MAGIC) + 4 + len(header)) % _ALIGN)
    return [MAGIC, struct.pack("<I", len(header)), header, *chunks]


def decode_state(buf) -> ClientState:
    """The :class:`ClientState` in ``buf`` (a whole file); ``ValueError`` says what is wrong.

    Given a writable buffer (``bytearray``, a uint8 numpy array), the tensors
    are views of it (no copy: the caller hands the buffer over); given a
    read-only one (``bytes``), they are copies.
    """
    if memoryview(buf).readonly:
        buf = bytearray(buf)
    view = memoryview(buf).cast("B")
    if view[: len(MAGIC)] != MAGIC:
        raise ValueError("not an fl-sparse client state file (bad magic)")
    pos = len(MAGIC)
    if len(view) < pos + 4:
        raise ValueError("truncated before the header length")
    (header_len,) = struct.unpack_from("<I", view, pos)
    pos += 4
    if header_len > len(view) - pos:
        raise ValueError(f"header of {header_len} bytes runs past the end of the file")
    try:
        header = json.loads(bytes(view[pos : pos + header_len]))
        entries = header["tensors"]
        data_bytes = int(header["data_bytes"])
        model_version, steps_done = int(header["model_version"]), int(header["steps_done"])
        if not isinstance(entries, list):
            raise TypeError("'tensors' is not a list")
    except (ValueError, KeyError, TypeError, OverflowError) as exc:
        raise ValueError(f"unreadable header: {exc!r}") from None
    data = pos + header_len
    if len(view) - data != data_bytes:
        raise ValueError(f"data section is {len(view) - data} bytes, the header says {data_bytes}")
    state = ClientState(model_version=model_version, steps_done=steps_done)
    for entry in entries:
        try:
            name, dtype_name, shape, offset = entry
            dtype = _DTYPES[dtype_name]
            shape = [int(n) for n in shape]
            offset = int(offset)
        except (ValueError, KeyError, TypeError, OverflowError):
            raise ValueError(f"bad tensor entry {entry!r}") from None
        if any(n < 0 for n in shape) or offset < 0:
            raise ValueError(f"tensor {name!r}: negative shape or offset")
        nbytes = math.prod(shape) * dtype.itemsize
        if offset + nbytes > data_bytes:
            raise ValueError(f"tensor {name!r} ({nbytes} bytes at {offset}) runs past the data section")
        if nbytes:
            tensor = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=data + offset)
            if tensor.data_ptr() % _ALIGN:  # a file written without alignment: copy to aligned memory
                tensor = tensor.clone()
        else:
            tensor = torch.empty(0, dtype=torch.uint8)
        tensor = tensor.view(dtype).reshape(shape)
        if name == "model":
            state.model = tensor
        elif name == "error":
            state.error = tensor
        elif isinstance(name, str) and name.startswith("extra/"):
            state.extra[name.removeprefix("extra/")] = tensor
        else:
            raise ValueError(f"unknown tensor entry {name!r}")
    return state


class ClientStateStore:
    """One atomic file per client under ``root`` (fsync'd unless ``durable=False``)."""

    def __init__(self, root: str | os.PathLike, durable: bool = True) -> None:
        self.root = Path(root)
        self.durable = durable

    def path(self, key: str) -> Path:
        safe = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in key)
        return self.root / f"{safe}.state"

    def load(self, key: str) -> ClientState:
        """The stored state, or a fresh one if there is none yet."""
        path = self.path(key)
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            _CACHE.drop(path)
            return ClientState()
        cached = _CACHE.get(path, _signature(stat))
        if cached is not None:
            return _copy(cached)
        try:
            with open(path, "rb", buffering=0) as fh:
                stat = os.fstat(fh.fileno())  # of the very file read, even if replaced meanwhile
                buf = np.empty(stat.st_size, dtype=np.uint8)  # not zero-filled, unlike bytearray(n)
                if fh.readinto(buf) != stat.st_size:
                    raise OSError(f"short read ({stat.st_size} bytes expected)")
        except FileNotFoundError:
            _CACHE.drop(path)
            return ClientState()
        except OSError as exc:
            raise StateCorruptError(f"cannot read client state {path}: {exc}") from exc
        try:
            state = decode_state(buf)
        except ValueError as exc:  # torn or foreign file: say which and why
            raise StateCorruptError(f"cannot read client state {path}: {exc}") from exc
        # Not cached: a handler saves what it loaded, and the save caches that.
        return state

    def save(self, key: str, state: ClientState) -> None:
        """Write ``state`` atomically; the cache keeps it (do not change it in place afterwards)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        _CACHE.drop(path)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                for chunk in encode_state(state):
                    fh.write(chunk)
                fh.flush()
                if self.durable:
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        snapshot = ClientState(state.model, state.model_version, state.error, state.steps_done, dict(state.extra))
        _CACHE.put(path, _signature(os.stat(path)), snapshot)

    def delete(self, key: str) -> None:
        path = self.path(key)
        _CACHE.drop(path)
        path.unlink(missing_ok=True)


def _signature(stat: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _copy(state: ClientState) -> ClientState:
    def clone(t):
        return t.clone() if isinstance(t, torch.Tensor) else t

    return ClientState(
        clone(state.model),
        state.model_version,
        clone(state.error),
        state.steps_done,
        {k: clone(v) for k, v in state.extra.items()},
    )


def _nbytes(state: ClientState) -> int:
    tensors = [state.model, state.error, *state.extra.values()]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class _StateCache:
    """Per-process LRU of client states, keyed by file path and checked against the file's stat."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: "OrderedDict[Path, tuple[tuple, ClientState, int]]" = OrderedDict()
        self._bytes = 0

    @staticmethod
    def limit() -> int:
        return int(float(os.environ.get("FL_SPARSE_STATE_CACHE_MB", "512")) * 2**20)

    def get(self, path: Path, signature: tuple) -> ClientState | None:
        with self._lock:
            entry = self._entries.get(path)
            if entry is None:
                return None
            if entry[0] != signature:  # the file changed under us: read it
                self._pop(path)
                return None
            self._entries.move_to_end(path)
            return entry[1]

    def put(self, path: Path, signature: tuple, state: ClientState) -> None:
        size, limit = _nbytes(state), self.limit()
        with self._lock:
            self._pop(path)
            if size > limit:
                return
            self._entries[path] = (signature, state, size)
            self._bytes += size
            while self._bytes > limit:
                self._pop(next(iter(self._entries)))

    def drop(self, path: Path) -> None:
        with self._lock:
            self._pop(path)

    def _pop(self, path: Path) -> None:
        entry = self._entries.pop(path, None)
        if entry is not None:
            self._bytes -= entry[2]


_CACHE = _StateCache()
