"""Where a client keeps what must outlive one message: its model copy and error memory.

Why not ``context.state``? Flower pickles the whole Context into the Ray
actor and back with every message. For 100 clients x ResNet-18 (two 44 MB
vectors each: model copy and error memory) that is ~90 MB of pickling per
message and ~9 GB held by the simulation engine. A SuperNode restart also
loses ``context.state``.

:class:`ClientStateStore` keeps one file per client under a directory:

* simulation: ``<state-dir>/gen-<generation>/client-<partition-id>.state``
  (the generation names the strategy's run, see
  :func:`fl_sparse.clients.mod.state_folder_name`); the
  server picks ``state-dir`` (a temporary folder, in ``/dev/shm`` when it has
  room, see :func:`fl_sparse.server_app.simulation_state_dir`) and removes it
  after the run;
* deployment: the SuperNode's ``--node-config "state-dir='/var/lib/fl-sparse'"``
  (or the ``FL_SPARSE_STATE_DIR`` environment variable) names a persistent
  folder, so the memory survives a SuperNode restart.

Writes are atomic (write to a temporary file, fsync, ``os.replace``, fsync
the folder): a crash while saving leaves the previous round's state, never a
torn file. A store for a throw-away folder (the simulation's temporary state
dir) may skip the fsyncs (``durable=False``): still atomic, just not flushed
to the disk.

The file is a small JSON header followed by the raw tensor bytes and a
CRC-32 of everything before it (see :func:`encode_state`), not
``torch.save``'s zip archive: a client saves its state after every message,
and at MLP size the archive's per-entry overhead cost more than the bytes
themselves. Every length in the header is checked against the file before
anything is read, and the checksum before any tensor is used, so a torn,
bit-flipped or foreign file is never taken for a state.

What :meth:`ClientStateStore.load` does with a file it cannot use (torn,
checksum mismatch, bad magic, an I/O error reading it): it renames the file
to ``<name>.corrupt-<unix-time>`` in the same folder (the newest
:data:`KEEP_CORRUPT` per client are kept, older ones deleted), logs a WARNING
naming the file and the reason, and returns an empty state (no model copy,
no error memory) with :attr:`ClientState.reset_reason` set. The client mod
then asks the server for a dense sync (see :mod:`fl_sparse.clients.mod`).
Version 1 files (``FLSPARSE-STATE-1``, no checksum, written before this
format) are still read, unverified; the next save rewrites them as version 2.

Temporary files of a save that never finished (the process was killed) are
removed when a store opens its folder (at most once per
:data:`SWEEP_INTERVAL_SECONDS` per folder and process). A temporary file
(``<name>.state.<host>.<pid>.<random>.tmp``, or ``<name>.state<random>.tmp``
from older versions) is stale when it was last written more than
:data:`STALE_TMP_SECONDS` ago (a live save writes its file continuously and
renames it within seconds), or, on POSIX, at once when its name says it was
written on this host by a process id that is no longer running. The second
rule assumes that processes sharing a folder under one host name share a
pid namespace (true for Ray actors and SuperNodes on one machine; containers
get their own host names by default).

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

import errno
import json
import math
import os
import re
import socket
import struct
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.common.logger import log

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
    previous vote of SSGD-MV-AD). ``reset_reason`` is not stored: a load sets
    it when the stored file was corrupt and this empty state replaces it.
    """

    model: torch.Tensor | None = None
    model_version: int = -1
    error: torch.Tensor | None = None
    steps_done: int = 0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    reset_reason: str | None = None

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
MAGIC = b"FLSPARSE-STATE-2\n"
MAGIC_V1 = b"FLSPARSE-STATE-1\n"  # no checksum; still read (unverified)
_CRC = struct.Struct("<I")  # the trailer: CRC-32 (zlib) of every byte before it
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
    """``state`` as the chunks of one file: magic, header length, JSON header, tensors, CRC-32.

    The header lists ``[name, dtype, shape, offset]`` per tensor; offsets count
    from the start of the data section, which begins right after the header.
    The last 4 bytes are the CRC-32 (little-endian) of everything before them.
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
    out = [MAGIC, struct.pack("<I", len(header)), header, *chunks]
    crc = 0
    for chunk in out:
        crc = zlib.crc32(chunk, crc)
    out.append(_CRC.pack(crc))
    return out


def decode_state(buf) -> ClientState:
    """The :class:`ClientState` in ``buf`` (a whole file); ``ValueError`` says what is wrong.

    Given a writable buffer (``bytearray``, a uint8 numpy array), the tensors
    are views of it (no copy: the caller hands the buffer over); given a
    read-only one (``bytes``), they are copies. A version 2 file's checksum is
    verified before any tensor is read; a version 1 file has none.
    """
    if memoryview(buf).readonly:
        buf = bytearray(buf)
    view = memoryview(buf).cast("B")
    magic = bytes(view[: len(MAGIC)])
    if magic == MAGIC:
        trailer = _CRC.size
    elif magic == MAGIC_V1:
        trailer = 0
    else:
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
    if len(view) - trailer - data != data_bytes:
        found = len(view) - trailer - data
        raise ValueError(f"data section is {found} bytes, the header says {data_bytes} (truncated or grown file)")
    if trailer:
        (stored,) = _CRC.unpack_from(view, len(view) - trailer)
        actual = zlib.crc32(view[: len(view) - trailer])
        if actual != stored:
            raise ValueError(f"checksum mismatch (CRC-32 {actual:08x}, the file says {stored:08x})")
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


# ------------------------------------------------------------------ housekeeping
KEEP_CORRUPT = 3  # corrupt files kept aside per client (the newest ones)
STALE_TMP_SECONDS = 60.0  # a temporary file not written for this long belongs to a dead save
SWEEP_INTERVAL_SECONDS = 60.0  # a process looks for stale temporary files at most this often per folder
# Errors that say nothing about the file (this process is out of something): raised, the file kept.
_TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR, errno.EAGAIN}
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"
_TMP = re.compile(r"^(?P<target>.+\.state)(?:\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.)?[a-z0-9_]*\.tmp$")
_CORRUPT = re.compile(r"\.corrupt-(\d+)(?:-(\d+))?$")
_swept: dict[str, float] = {}  # folder -> time.monotonic() of this process's last sweep
_swept_lock = threading.Lock()


def _pid_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():  # 0 would address our process group: count it alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _fsync_dir(path: Path) -> None:
    """Make the folder's entries (a rename, a new file) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not fsync folders (EINVAL)
        pass
    finally:
        os.close(fd)


class ClientStateStore:
    """One atomic file per client under ``root`` (fsync'd, file and folder, unless ``durable=False``).

    Opening a store removes stale temporary files of earlier saves from
    ``root`` (see the module docstring for the rule).
    """

    def __init__(self, root: str | os.PathLike, durable: bool = True) -> None:
        self.root = Path(root)
        self.durable = durable
        key = str(self.root)
        now = time.monotonic()
        with _swept_lock:
            due = key not in _swept or now - _swept[key] >= SWEEP_INTERVAL_SECONDS
            if due:
                _swept[key] = now
        if due:
            self.remove_stale_temp_files()

    def path(self, key: str) -> Path:
        safe = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in key)
        return self.root / f"{safe}.state"

    def load(self, key: str, *, reset_corrupt: bool = True) -> ClientState:
        """The stored state, or a fresh one if there is none yet.

        A file that cannot be used (torn, checksum mismatch, foreign, an I/O
        error) is moved aside to ``<name>.corrupt-<unix-time>`` with a
        WARNING, and an empty state with ``reset_reason`` set is returned;
        with ``reset_corrupt=False`` it raises :class:`StateCorruptError`
        instead and leaves the file where it is.
        """
        path = self.path(key)
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            _CACHE.drop(path)
            return ClientState()
        cached = _CACHE.get(path, _signature(stat))
        if cached is not None:
            return _copy(cached)
        read_stat = None
        try:
            with open(path, "rb", buffering=0) as fh:
                read_stat = os.fstat(fh.fileno())  # of the very file read, even if replaced meanwhile
                buf = np.empty(read_stat.st_size, dtype=np.uint8)  # not zero-filled, unlike bytearray(n)
                got = fh.readinto(buf)
                if got != read_stat.st_size:
                    raise OSError(f"short read ({got} of {read_stat.st_size} bytes)")
            state = decode_state(buf)
        except FileNotFoundError:
            _CACHE.drop(path)
            return ClientState()
        except OSError as exc:
            if exc.errno in _TRANSIENT:
                raise
            reason = f"cannot read it: {exc}"
        except ValueError as exc:  # torn, bit-flipped or foreign file
            reason = str(exc)
        else:
            # Not cached: a handler saves what it loaded, and the save caches that.
            return state
        _CACHE.drop(path)
        if not reset_corrupt:
            raise StateCorruptError(f"cannot read client state {path}: {reason}")
        self._move_aside(path, read_stat, reason)
        return ClientState(reset_reason=f"{path.name}: {reason}")

    def save(self, key: str, state: ClientState) -> None:
        """Write ``state`` atomically; the cache keeps it (do not change it in place afterwards)."""
        self._make_root()
        path = self.path(key)
        _CACHE.drop(path)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f"{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp")
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
        if self.durable:
            _fsync_dir(self.root)  # the rename itself survives a power cut
        snapshot = ClientState(state.model, state.model_version, state.error, state.steps_done, dict(state.extra))
        _CACHE.put(path, _signature(os.stat(path)), snapshot)

    def delete(self, key: str) -> None:
        path = self.path(key)
        _CACHE.drop(path)
        path.unlink(missing_ok=True)

    def corrupt_files(self, key: str) -> list[Path]:
        """The files of ``key`` moved aside as corrupt, oldest first."""
        path = self.path(key)
        found = []
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        for name in names:
            if name.startswith(path.name + ".corrupt-"):
                m = _CORRUPT.search(name)
                if m and m.start() == len(path.name):
                    found.append(((int(m.group(1)), int(m.group(2) or 0)), self.root / name))
        return [p for _, p in sorted(found)]

    def remove_stale_temp_files(self, now: float | None = None) -> list[Path]:
        """Delete this store's temporary files that no save will finish; returns them.

        Stale: last written more than :data:`STALE_TMP_SECONDS` before ``now``,
        or named as written on this host by a process that no longer exists.
        """
        now = time.time() if now is None else now
        removed = []
        try:
            entries = list(os.scandir(self.root))
        except OSError:  # no folder yet
            return removed
        for entry in entries:
            m = _TMP.match(entry.name)
            if m is None:
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                old = now - entry.stat(follow_symlinks=False).st_mtime > STALE_TMP_SECONDS
                dead = (
                    os.name == "posix"
                    and m.group("host") == _HOST
                    and m.group("pid") is not None
                    and not _pid_alive(int(m.group("pid")))
                )
                if old or dead:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
            except FileNotFoundError:  # its writer renamed or removed it meanwhile
                continue
            except OSError as exc:
                log(WARNING, "could not remove stale temporary client state %s: %s", entry.path, exc)
        return removed

    # ------------------------------------------------------------ internals
    def _make_root(self) -> None:
        if self.root.is_dir():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if self.durable:
            _fsync_dir(self.root.parent)  # the new folder's own entry

    def _move_aside(self, path: Path, read_stat: os.stat_result | None, reason: str) -> None:
        """Rename the corrupt file to ``<name>.corrupt-<unix-time>``, keep the newest few, warn."""
        try:
            now_stat = os.stat(path)
        except OSError:
            now_stat = None
        if read_stat is not None and now_stat is not None and (now_stat.st_dev, now_stat.st_ino) != (
            read_stat.st_dev,
            read_stat.st_ino,
        ):
            # Another process replaced it since we read it: that new file is not ours to judge.
            log(WARNING, "client state %s was corrupt (%s), since replaced; starting empty", path, reason)
            return
        stamp = int(time.time())
        target, n = path.with_name(f"{path.name}.corrupt-{stamp}"), 0
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return
        except OSError as exc:
            log(
                WARNING,
                "client state %s is corrupt (%s) and could not be moved aside (%s); starting from an empty state",
                path, reason, exc,
            )
            return
        if self.durable:
            _fsync_dir(self.root)
        log(
            WARNING,
            "client state %s is corrupt (%s): moved to %s; this client starts from an empty state "
            "(no model copy, no error memory) and needs a dense sync",
            path, reason, target.name,
        )
        for old in self.corrupt_files(path.stem)[:-KEEP_CORRUPT]:
            try:
                old.unlink()
            except OSError:
                pass


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
