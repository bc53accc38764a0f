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
  server picks ``state-dir``: ``<out>/client-state`` with ``--out`` (kept, for
  ``--resume``), the folder ``--state-dir`` names, else a temporary folder (in
  ``/dev/shm`` when it has room, see :func:`fl_sparse.server_app.simulation_state_dir`)
  that it removes after the run;
* deployment: the SuperNode's ``--node-config "state-dir='/var/lib/fl-sparse'"``
  (or the ``FL_SPARSE_STATE_DIR`` environment variable) names a persistent
  folder, so the memory survives a SuperNode restart.

Writes are atomic (write to a temporary file, fsync, ``os.replace``, fsync
the folder): a crash while saving leaves the previous round's state, never a
torn file. A store for a throw-away folder (the simulation's temporary state
dir) may skip the fsyncs (``durable=False``): still atomic, just not flushed
to the disk.

**The spare** (``<name>.state.spare``; POSIX, states up to :data:`SPARE_MAX_BYTES`):
the state file a save replaces is kept under that name, and the next save
writes into it in place instead of into a new file, then renames it over the
state file as usual. On tmpfs a new 200 kB file costs about 150 us to
allocate and, once replaced, to free; the spare saves most of it. A save
*claims* the spare by renaming it to its own temporary name, so two saves
never write one file; the replaced file is linked to a temporary name first
and renamed to the spare only after the replace, so the spare is never the
live state file. The cost is one more file per client (twice the space for
states of this size). Because a spare reuses an earlier state file's inode,
the cache below also checks a file's last 8 bytes (its XXH3) before trusting
a cached entry.

The file is a small JSON header followed by the raw tensor bytes and a
checksum (XXH3-64) of everything before it (see :func:`encode_state`), not
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
A sound state file whose model copy in the model store is lost is not moved
aside: only the model is dropped (see the model store below).
Version 1 files (``FLSPARSE-STATE-1``, no checksum) are still read,
unverified, and version 2 files (``FLSPARSE-STATE-2``, the same layout with a
CRC-32 trailer) verified by their CRC; the next save rewrites either as
version 3. (XXH3 replaced CRC-32 because the checksum of the error memory was
a third of a save at MLP size: 62 us for 200 kB against 4 us.)

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
only while the file is the very one it wrote: same inode, size and mtime,
and the same checksum in its last 8 bytes (a spare rewritten by another
process can repeat the inode, the size and, on a coarse clock, the mtime),
so a state written by another process is always read from the file. Loads return copies: a caller
that changes the state and then fails leaves the cache as the file is.

**The model store** (``share_models=True``; :class:`~fl_sparse.clients.SparseMod`
turns it on in the folder the server names, i.e. the simulation's, where all
clients share one folder, and leaves it off in a SuperNode's own folder).
A client's model copy is always the server's model at some version, so the
clients that synced to one version hold the same bytes. They are stored once,
in ``<folder>/models/``:

* ``models/<hash>.model``: the version file, the model's raw float32 bytes
  (no header), named by :func:`model_hash` = :func:`fl_sparse.flat.vector_hash`
  of those bytes (the hash the server sends with each sync and the mod checks);
* ``models/<client>.<hash>.model``: a hard link to it per client holding it;
* ``<client>.state`` records ``model_ref = [hash, "float32", shape]`` in its
  header instead of a ``model`` tensor.

A save links the client to the version first (``os.link`` of the version
file straight to the client's link name: a link is made whole or not at all,
and one that exists already holds this version; the version file is written,
to a temporary file and ``os.link``-ed to its name, only if it does not exist
yet), then replaces the state file, then removes the
client's link to the version it held before. **GC rule:** the file system's
link count is the reference count: after removing its old link, the client
removes that version's file if its canonical name is the only name left
(``st_nlink == 1``). A load reads the model through the client's own link,
so a version file removed or re-created by others never takes a client's
model away; if the client's link is missing it is re-made from the version
file. Races between processes (many Ray actors save at once) lose nothing:
every writer holds the model in memory, so a version file removed between a
look and a link (``FileNotFoundError``) is written again, and one written by
another process meanwhile (``FileExistsError``) is used. The worst a race
can do is leave one client on a private copy of a version (a version file
removed just after another client linked it), which is freed as usual when
that client moves on. In practice the two do not meet: clients move *to* the
server's current version and release *older* ones. Where hard links are not
supported (``os.link`` raises ``EPERM``, ``EXDEV``, ``ENOTSUP``, ``ENOSYS`` or
``EACCES``), the process keeps models inline in that folder, as without the
model store (a WARNING says so once); any other link error (a full disk, an
I/O error) keeps only that save's model inline, with a WARNING.

A version file is verified on every read from disk (size and hash of its
bytes against the state's ``model_ref``). A mismatch, a missing file or an
error reading it loses the model copy only, not the state: the state file
verified, so the load returns its error memory, ``steps_done`` and ``extra``
as stored, without a model (``model=None``, ``model_version=-1``, which no
server version matches) and with :attr:`ClientState.model_lost` set, and logs
a WARNING naming the state file and the reason. The state file is not moved
aside (the client's next save replaces it); the client's link is removed (the
version file too if it was the corrupt one, so no other client links it
again). The client mod then refuses any sync but a dense one, and the client
continues with its error memory from the dense model the server sends next.
(With ``reset_corrupt=False`` such a load raises, as for a corrupt file.) The
per-process cache keeps version bytes by hash, so the clients one Ray actor
handles share one read. A save killed between its link and its state file
leaves a link no state names; the sweep that removes stale temporary files
also removes such links and version files nobody links, once untouched
(ctime) for :data:`STALE_TMP_SECONDS`.

**The error memory's dtype** (``error_dtype``): ``"float32"`` (default),
``"float16"`` or ``"bfloat16"``. The memory is computed in float32; a save
stores it rounded to the chosen dtype (half the bytes) with ``casts =
{"error": "float32"}`` in the header, and a load casts it back, so the memory
a client continues from is the rounded one whether it comes from the cache or
the file. float16 overflow is *clamped*, not refused: entries beyond the
dtype's finite range (±65504 for float16, ±3.39e38 for bfloat16) are
stored as ±max with a WARNING giving their number and largest magnitude, never
as inf (refusing would fail the client's round for a memory that is already
far out of any useful range). float16 also flushes magnitudes below ~6e-8 to
zero; bfloat16 keeps 8 significant bits.
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import math
import os
import re
import secrets
import socket
import struct
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path

import numpy as np
import torch
import xxhash
from flwr.common.logger import log

from fl_sparse.flat import vector_hash

__all__ = [
    "ClientState",
    "ClientStateStore",
    "ERROR_DTYPES",
    "StateCorruptError",
    "decode_state",
    "encode_state",
    "model_hash",
]

ERROR_DTYPES = ("float32", "float16", "bfloat16")  # how a store may keep the error memory on disk


class StateCorruptError(RuntimeError):
    """A stored client state could not be read back."""


class StateFormatError(StateCorruptError, ValueError):
    """A state file written by a newer fl-sparse (a format this version cannot read): never reset."""


@dataclass
class ClientState:
    """Everything a client remembers between rounds.

    ``model`` is the client's copy of the global model at ``model_version``
    (``None`` before the first dense sync); ``error`` is the error-feedback
    memory; ``steps_done`` counts the rounds this client has trained;
    ``extra`` holds strategy-specific tensors (e.g. the
    previous vote of SSGD-MV-AD). Neither of the last two fields is stored; a
    load sets them. ``reset_reason``: the stored file was corrupt and this empty
    state replaces it. ``model_lost``: the state file was sound but its model
    copy in the model store was missing or corrupt; this state is the stored one
    (error memory, ``steps_done``, ``extra``) without a model (``model=None``,
    ``model_version=-1``).
    """

    model: torch.Tensor | None = None
    model_version: int = -1
    error: torch.Tensor | None = None
    steps_done: int = 0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    reset_reason: str | None = None
    model_lost: str | None = None

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
MAGIC = b"FLSPARSE-STATE-3\n"
MAGIC_V2 = b"FLSPARSE-STATE-2\n"  # the same layout with a CRC-32 (zlib) trailer; still read (verified)
MAGIC_V1 = b"FLSPARSE-STATE-1\n"  # no checksum; still read (unverified)
_XXH = struct.Struct("<Q")  # the trailer: XXH3-64 (seed 0) of every byte before it
_CRC = struct.Struct("<I")  # a version 2 file's trailer: CRC-32 (zlib) of every byte before it
_ALIGN = 64  # every tensor starts on a 64-byte boundary, as torch's own allocations do
_ZEROS = memoryview(bytes(_ALIGN))  # padding before a tensor: a slice of this, not a new bytes object
_DTYPES = {
    str(dt).removeprefix("torch."): dt
    for dt in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    )
}


_DTYPE_NAMES = {dt: name for name, dt in _DTYPES.items()}


def _tensors(state: ClientState) -> list[tuple[str, torch.Tensor]]:
    named = [("model", state.model), ("error", state.error)]
    named += [(f"extra/{key}", value) for key, value in state.extra.items()]
    out = []
    for name, tensor in named:
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"client state entry {name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.device.type != "cpu" or tensor.requires_grad or not tensor.is_contiguous():
            tensor = tensor.detach().to("cpu").contiguous()  # a save per message: skip three no-op calls
        out.append((name, tensor))
    return out


_HASH = re.compile(r"^[0-9a-f]{16,128}$")  # a hex digest of vector_hash


def model_hash(tensor: torch.Tensor) -> str:
    """The name of a float32 model copy in the model store: :func:`fl_sparse.flat.vector_hash` of its bytes.

    The very hash the server sends with every sync and the client checks its
    copy against, so clients at one server version name one file.
    """
    if tensor.dtype != torch.float32:
        raise TypeError(f"the model store keeps float32 models, not {tensor.dtype}")
    return vector_hash(tensor.reshape(-1))


@dataclass(frozen=True)
class _ModelRef:
    """A model copy kept in the model store, not in the state file: its hash, dtype and shape."""

    hash: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def to_json(self) -> list:
        return [self.hash, str(self.dtype).removeprefix("torch."), list(self.shape)]

    @classmethod
    def from_json(cls, value) -> "_ModelRef":
        try:
            digest, dtype_name, shape = value
            dtype = _DTYPES[dtype_name]
            shape = tuple(int(n) for n in shape)
        except (ValueError, KeyError, TypeError, OverflowError):
            raise ValueError(f"bad model_ref {value!r}") from None
        if not isinstance(digest, str) or not _HASH.match(digest) or any(n < 0 for n in shape) or dtype != torch.float32:
            raise ValueError(f"bad model_ref {value!r}")
        return cls(digest, dtype, shape)


def encode_state(
    state: ClientState, *, model_ref: _ModelRef | None = None, casts: dict[str, str] | None = None
) -> list[memoryview | bytes]:
    """``state`` as the chunks of one file: magic, header length, JSON header, tensors, XXH3-64.

    The header lists ``[name, dtype, shape, offset]`` per tensor; offsets count
    from the start of the data section, which begins right after the header.
    The last 8 bytes are the XXH3-64 digest (seed 0, little-endian) of everything before them.
    Chunks are views of the tensors' memory (no copy); write them in order.

    Two optional header keys (absent, the file is byte for byte the format
    before them): ``model_ref`` = ``[hash, dtype, shape]`` says the model copy
    is in the model store (``state.model`` must then be None; see
    :class:`ClientStateStore`), and ``casts`` = ``{"error": "float32"}`` says
    the stored error memory (float16 or bfloat16 in the file) is float32 in
    memory: :func:`decode_state` casts it back.
    """
    if model_ref is not None and state.model is not None:
        raise ValueError("a state with a model_ref stores no model tensor")
    entries, chunks, offset = [], [], 0
    for name, tensor in _tensors(state):
        dtype = _DTYPE_NAMES.get(tensor.dtype)
        if dtype is None:
            raise TypeError(f"client state entry {name!r} has unsupported dtype {tensor.dtype}")
        pad = -offset % _ALIGN
        if pad:
            chunks.append(_ZEROS[:pad])
            offset += pad
        entries.append([name, dtype, list(tensor.shape), offset])
        if tensor.numel():
            if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: its bytes through torch
                chunks.append(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            else:  # numpy's views are cheaper than torch's
                chunks.append(memoryview(tensor.numpy()).cast("B"))
            offset += tensor.numel() * tensor.element_size()
    fields_ = {
        "model_version": int(state.model_version),
        "steps_done": int(state.steps_done),
        "tensors": entries,
        "data_bytes": offset,
    }
    if model_ref is not None:
        fields_["model_ref"] = model_ref.to_json()
    if casts:
        fields_["casts"] = dict(casts)
    header = json.dumps(fields_, separators=(",", ":")).encode()
    # Pad the header (JSON allows trailing spaces) so the data section starts
    # on an _ALIGN boundary: a reader can then use the tensors in place.
    header += b" " * (-(len(MAGIC) + 4 + len(header)) % _ALIGN)
    out = [MAGIC, struct.pack("<I", len(header)), header, *chunks]
    digest = xxhash.xxh3_64()
    for chunk in out:
        digest.update(chunk)
    out.append(_XXH.pack(digest.intdigest()))
    return out


def _is_damaged_v3(view: memoryview) -> bool:
    """Whether a file whose magic names a newer format checks out as version 3 with that magic restored.

    One flipped bit can turn the ``3`` into ``7``: that file is damaged, not newer. A file of a
    newer format has its own magic in whatever it checksums, so the version-3 XXH3 of it with
    the magic put back to ``MAGIC`` does not match its last 8 bytes (but by a 2**-64 chance).
    """
    if len(view) < len(MAGIC) + 4 + _XXH.size:
        return False
    digest = xxhash.xxh3_64(MAGIC)
    digest.update(view[len(MAGIC) : len(view) - _XXH.size])
    return digest.intdigest() == _XXH.unpack_from(view, len(view) - _XXH.size)[0]


def decode_state(buf) -> ClientState:
    """The :class:`ClientState` in ``buf`` (a whole file); ``ValueError`` says what is wrong.

    Given a writable buffer (``bytearray``, a uint8 numpy array), the tensors
    are views of it (no copy: the caller hands the buffer over); given a
    read-only one (``bytes``), they are copies. A version 3 (or 2) file's checksum
    is verified before any tensor is read; a version 1 file has none. A file
    whose model copy is in the model store decodes with ``model=None``
    (:meth:`ClientStateStore.load` fetches it); a stored float16 / bfloat16
    error memory comes back as the dtype the header's ``casts`` names.
    """
    return _decode(buf)[0]


def _decode(buf) -> tuple[ClientState, _ModelRef | None]:
    if memoryview(buf).readonly:
        buf = bytearray(buf)
    view = memoryview(buf).cast("B")
    magic = bytes(view[: len(MAGIC)])
    if magic == MAGIC:
        trailer = _XXH.size
    elif magic == MAGIC_V2:
        trailer = _CRC.size
    elif magic == MAGIC_V1:
        trailer = 0
    elif (m := re.fullmatch(rb"FLSPARSE-STATE-(\d{1,6})\n", magic)) is not None and int(m.group(1)) > 3:
        if _is_damaged_v3(view):
            raise ValueError("bad magic: a version 3 file with a damaged version number")
        raise StateFormatError(
            f"written by a newer fl-sparse (state format {int(m.group(1))}; this version reads formats 1 to 3): "
            "run the newer fl-sparse, or move the file away to start this client from an empty state"
        )
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
        ref = _ModelRef.from_json(header["model_ref"]) if "model_ref" in header else None
        casts = header.get("casts") or {}
        if not isinstance(casts, dict) or set(casts) - {"error"}:
            raise TypeError(f"bad casts {casts!r}")
        cast_error = _DTYPES[casts["error"]] if "error" in casts else None
    except (ValueError, KeyError, TypeError, OverflowError, AttributeError, RecursionError) as exc:  # deep JSON
        raise ValueError(f"unreadable header: {exc!r}") from None
    data = pos + header_len
    if len(view) - trailer - data != data_bytes:
        found = len(view) - trailer - data
        raise ValueError(f"data section is {found} bytes, the header says {data_bytes} (truncated or grown file)")
    if trailer:
        if magic == MAGIC:
            (stored,) = _XXH.unpack_from(view, len(view) - trailer)
            actual = xxhash.xxh3_64_intdigest(view[: len(view) - trailer])
            if actual != stored:
                raise ValueError(f"checksum mismatch (XXH3-64 {actual:016x}, the file says {stored:016x})")
        else:
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
            if ref is not None:
                raise ValueError("a model tensor beside a model_ref")
            state.model = tensor
        elif name == "error":
            state.error = tensor
        elif isinstance(name, str) and name.startswith("extra/"):
            state.extra[name.removeprefix("extra/")] = tensor
        else:
            raise ValueError(f"unknown tensor entry {name!r}")
    if cast_error is not None and state.error is not None:
        if not (state.error.dtype.is_floating_point and cast_error.is_floating_point):
            raise ValueError(f"cannot cast a stored {state.error.dtype} error memory to {cast_error}")
        state.error = _widen(state.error, cast_error)
    return state, ref


# ------------------------------------------------------------------ housekeeping
KEEP_CORRUPT = 3  # corrupt files kept aside per client (the newest ones)
STALE_TMP_SECONDS = 60.0  # a temporary file not written for this long belongs to a dead save
SWEEP_INTERVAL_SECONDS = 60.0  # a process looks for stale temporary files at most this often per folder
SPARE_MAX_BYTES = 4 << 20  # larger states get no spare: it would double their space on disk or in RAM
SPARE_SUFFIX = ".spare"
_TEMP_COUNTER = itertools.count(secrets.randbits(32) << 16)  # a random start: a dead process's names are not reused
_PATHS_KEPT = 4096  # client names a store remembers its file names for (a Ray actor serves many clients)
# Errors that say nothing about the file (this process is out of something, or may not read it):
# raised, the file kept.
_TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR, errno.EAGAIN, errno.EACCES, errno.EPERM}
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"
_TMP = re.compile(r"^(?P<target>.+\.(?:state|model))(?:\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.)?[a-z0-9_]*\.tmp$")
MODELS = "models"  # the model store: a sub-folder of the store's folder
_CANONICAL = re.compile(r"^(?P<hash>[0-9a-f]{16,128})\.model$")
_LINK = re.compile(r"^(?P<key>.+)\.(?P<hash>[0-9a-f]{16,128})\.model$")
_LINK_TRIES = 8  # a version file removed under a linking client this often in a row: store the model inline
_no_links: set[str] = set()  # model folders where os.link failed: this process stores models inline there
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


@functools.lru_cache(maxsize=4096)
def _safe(key: str) -> str:
    """``key`` as a file name part (a save names a client's model link twice: cached, not rebuilt per message)."""
    return "".join(c if (c.isalnum() or c in "-_.") else "_" for c in key)


def error_dtype_name(value: str | torch.dtype) -> str:
    """``value`` as one of :data:`ERROR_DTYPES`, or ValueError."""
    name = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
    if name not in ERROR_DTYPES:
        raise ValueError(f"error memory dtype must be one of {', '.join(ERROR_DTYPES)}, got {value!r}")
    return name


# float32 <-> float16 / bfloat16 with numpy: torch's casts of a model-sized vector use its thread pool,
# which on a busy machine waits milliseconds at the barrier (the same rounding, bit for bit).
def _narrow_array(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """float32 ``a`` rounded to nearest-even float16 / bfloat16, as ``torch.Tensor.to`` rounds."""
    if dtype == torch.float16:
        with np.errstate(over="ignore"):  # beyond the range: inf, as torch; the store clamps first
            return torch.from_numpy(a.astype(np.float16))
    u = a.view(np.uint32)
    one, half = np.uint32(1), np.uint32(0x7FFF)
    top = ((u + (half + ((u >> np.uint32(16)) & one))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():  # a NaN stays a (quiet) NaN
        top[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return torch.from_numpy(top.view(np.int16)).view(torch.bfloat16)


def _widen(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` (a new tensor), through numpy for float16 / bfloat16 to float32."""
    if dtype == torch.float32 and t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16):
        flat = t.contiguous().reshape(-1)
        if t.dtype == torch.float16:
            out = flat.numpy().astype(np.float32)
        else:
            out = (flat.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
        return torch.from_numpy(out).reshape(t.shape)
    return t.to(dtype, copy=True)


class _Unlinkable(Exception):
    """The model store cannot hold this model by hard links now: store it inline."""


class _BadModel(ValueError):
    """A model file whose size or bytes do not match its name (``path``: that file)."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path = path


def _create_temp(path: Path) -> tuple[int, str]:
    """A new temporary file beside ``path`` (named by :func:`_temp_name`): ``(fd, name)``.

    What ``tempfile.mkstemp`` does (``O_EXCL``, mode 0600), without its name
    generator and path juggling (36 us a save at MLP size, most of it Python).
    A name taken already (a dead process's, with this pid) is skipped.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = _temp_name(path)
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of ``tensor`` as a flat uint8 CPU tensor (a view where it already is one)."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def _temp_name(path: Path) -> str:
    """A temporary name beside ``path`` that no other live process uses (host, pid, a counter).

    The pattern the stale-file sweep knows (``_TMP``); a counter, not random bytes
    (``secrets`` costs ~4 us a call).
    """
    return f"{path}.{_HOST}.{os.getpid()}.{next(_TEMP_COUNTER):x}.tmp"


class _SpareLost(OSError):
    """A claimed spare vanished before the save could rename it into place."""


def _claim_spare(spare: str, path: Path) -> tuple[int | None, str | None]:
    """Take the spare for this save: renamed to a temporary name first, so one save gets it."""
    tmp = _temp_name(path)
    try:
        os.rename(spare, tmp)
    except OSError:  # no spare (the first saves), or another save took it
        return None, None
    try:
        # Ours alone only while our name is its only one (then no one can give it another):
        # saves of one client racing can leave a spare that another name holds, even the
        # state file's, and writing it in place would tear that file.
        if os.stat(tmp).st_nlink != 1:
            raise OSError(errno.EBUSY, "the spare has another name", tmp)
        return os.open(tmp, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)), tmp
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return None, None


def _cached_state(path: Path, stat: os.stat_result) -> "_Stored | None":
    """The cached state of the file at ``path`` (``stat``), if the file is still the one cached.

    Inode, size and mtime are not enough alone: a spare reuses the inode of an
    earlier state file, and on kernels with coarse file times a rewrite may keep
    its mtime. So a hit is confirmed by the file's last 8 bytes, its XXH3 (one
    small read): the same digest means the same bytes.
    """
    stored = _CACHE.get(path, _signature(stat))
    if stored is None or stored.trailer is None:
        return stored
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            tail = os.pread(fd, len(stored.trailer), stat.st_size - len(stored.trailer))
        finally:
            os.close(fd)
    except OSError:
        tail = None
    if tail != stored.trailer:
        _CACHE.drop(path)
        return None
    return stored


def _read_all(fh, buf: np.ndarray) -> int:
    """Fill the uint8 array ``buf`` from ``fh``; the bytes read (fewer only at the end of the file).

    One ``read`` returns at most 2 GiB - 4 kB on Linux, whatever was asked for.
    """
    got = fh.readinto(buf) or 0
    while 0 < got < len(buf):
        n = fh.readinto(memoryview(buf)[got:])
        if not n:
            break
        got += n
    return got


def _write_all(fd: int, chunks: list) -> None:
    """Write ``chunks`` in order with as few system calls as the OS allows (``writev``, short writes resumed)."""
    views = [memoryview(c).cast("B") for c in chunks if len(c)]
    if not hasattr(os, "writev"):  # Windows
        for view in views:
            while view:
                view = view[os.write(fd, view):]
        return
    iov_max = 1024  # POSIX guarantees at least 16; Linux and macOS take 1024
    while views:
        done = os.writev(fd, views[:iov_max])
        while views and done >= len(views[0]):
            done -= len(views[0])
            views.pop(0)
        if done:
            views[0] = views[0][done:]


# fsync errors that say a folder cannot be fsynced here at all (nothing was lost): ignored.
_NO_DIR_FSYNC = frozenset(
    getattr(errno, name) for name in ("EINVAL", "EBADF", "ENOTSUP", "EOPNOTSUPP") if hasattr(errno, name)
)


def _fsync_dir(path: Path, *, strict: bool = False) -> None:
    """Make the folder's entries (a rename, a new file) durable; a no-op where folders cannot be opened.

    ``strict``: an error that says the entries may not be on the disk (EIO, ENOSPC, ...) is
    raised, not ignored (a save must not report a replace durable that may be lost).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems do not fsync folders (EINVAL)
        if strict and exc.errno not in _NO_DIR_FSYNC:
            raise
    finally:
        os.close(fd)


class ClientStateStore:
    """One atomic file per client under ``root`` (fsync'd, file and folder, unless ``durable=False``).

    ``share_models``: keep model copies in the content-addressed model store
    ``root/models`` (one file per model version, hard-linked by the clients
    that hold it) instead of in each state file; see the module docstring.
    ``error_dtype``: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``,
    the dtype the error memory is stored in (it is float32 again after a load).

    Opening a store removes stale temporary files of earlier saves from
    ``root`` (see the module docstring for the rule).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        durable: bool = True,
        *,
        share_models: bool = False,
        error_dtype: str | torch.dtype = "float32",
    ) -> None:
        self.root = Path(root)
        self.durable = durable
        self.share_models = bool(share_models)
        self.error_dtype = error_dtype_name(error_dtype)
        self.models = self.root / MODELS
        self._root_key = str(self.root)
        self._models_key = str(self.models)
        # Names per client key, built once: pathlib joins cost ~10 us each, three per message.
        self._paths: dict[str, Path] = {}
        _CACHE.limit()  # a bad FL_SPARSE_STATE_CACHE_MB is refused here, not after a save's write
        self.sweep_if_due()

    def sweep_if_due(self) -> None:
        """Remove stale temporary files (see the module docstring), at most once per
        :data:`SWEEP_INTERVAL_SECONDS` per folder and process. A store kept open for many
        messages (the client mod keeps its stores) calls this per message.
        """
        key = self._root_key
        now = time.monotonic()
        with _swept_lock:
            due = key not in _swept or now - _swept[key] >= SWEEP_INTERVAL_SECONDS
            if due:
                _swept[key] = now
        if due:
            self.remove_stale_temp_files()

    def __repr__(self) -> str:
        return (f"ClientStateStore({str(self.root)!r}, durable={self.durable}, share_models={self.share_models}, "
                f"error_dtype={self.error_dtype!r})")

    def path(self, key: str) -> Path:
        path = self._paths.get(key)
        if path is None:
            if len(self._paths) >= _PATHS_KEPT:
                self._paths.clear()
            path = self._paths[key] = self.root / f"{_safe(key)}.state"
        return path

    def model_path(self, key: str, digest: str) -> Path:
        """The hard link through which client ``key`` holds model version ``digest``."""
        return Path(self._link_name(key, digest))

    def canonical_model_path(self, digest: str) -> Path:
        """The model store's own name for version ``digest`` (what new clients link to)."""
        return Path(self._canonical_name(digest))

    # The same names as plain strings for the per-message path: a save links one and releases
    # another (four names), and a pathlib join costs ~8 us where an f-string costs ~0.3.
    def _link_name(self, key: str, digest: str) -> str:
        return f"{self._models_key}{os.sep}{_safe(key)}.{digest}.model"

    def _canonical_name(self, digest: str) -> str:
        return f"{self._models_key}{os.sep}{digest}.model"

    def load(self, key: str, *, reset_corrupt: bool = True, shared: bool = False) -> ClientState:
        """The stored state, or a fresh one if there is none yet.

        Its tensors are the caller's own copies, or with ``shared=True`` possibly
        the cache's own (no copy): the caller must then replace them, never change
        one in place, or the next load in this process would see the change.

        A file that cannot be used (torn, checksum mismatch, foreign, an I/O
        error) is moved aside to ``<name>.corrupt-<unix-time>`` with a
        WARNING, and an empty state with ``reset_reason`` set is returned.
        A sound file whose shared model copy is missing or whose bytes do not
        hash to its name (or cannot be read) stays where it is: the state comes
        back without its model (``model=None``, ``model_version=-1``,
        ``model_lost`` set), everything else as stored, with a WARNING. With
        ``reset_corrupt=False`` either case raises :class:`StateCorruptError`
        instead and leaves the files where they are.
        """
        path = self.path(key)
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            _CACHE.drop(path)
            return ClientState()
        stored = _cached_state(path, stat)
        fresh, read_stat, reason, bad_model = False, None, None, None
        # A file that does not decode is read once more before it is judged: a read that
        # overlapped two saves of this client by other processes saw the file it had open
        # rewritten in place (it had become the spare, then was claimed).
        for _ in range(2 if stored is None else 0):
            try:
                with open(path, "rb", buffering=0) as fh:
                    read_stat = os.fstat(fh.fileno())  # of the very file read, even if replaced meanwhile
                    buf = np.empty(read_stat.st_size, dtype=np.uint8)  # not zero-filled, unlike bytearray(n)
                    got = _read_all(fh, buf)
                    if got != read_stat.st_size:
                        raise ValueError(f"short read ({got} of {read_stat.st_size} bytes)")
                state, ref = _decode(buf)
            except StateFormatError as exc:  # not corrupt: left where it is, whatever reset_corrupt says
                raise StateFormatError(f"cannot read client state {path}: {exc}") from None
            except FileNotFoundError:
                _CACHE.drop(path)
                return ClientState()
            except OSError as exc:
                if exc.errno in _TRANSIENT:
                    raise
                reason = f"cannot read it: {exc}"
                break
            except ValueError as exc:  # torn, bit-flipped or foreign file
                reason = str(exc)
            else:
                # Not cached: a handler saves what it loaded, and the save caches that.
                stored, fresh, reason = _Stored(state, ref, None), True, None
                break
        model, model_reason = None, None
        if reason is None and stored.ref is not None:
            try:
                model = self._model_bytes(key, stored.ref)
            except _BadModel as exc:
                model_reason, bad_model = str(exc), exc.path
            except OSError as exc:
                if exc.errno in _TRANSIENT:
                    raise
                model_reason = f"cannot read its model copy: {exc}"
            except ValueError as exc:
                model_reason = str(exc)
        if reason is None and model_reason is None:
            return _materialize(stored, model, fresh=fresh or shared, shared_model=shared)
        _CACHE.drop(path)
        if not reset_corrupt:
            raise StateCorruptError(f"cannot read client state {path}: {reason or model_reason}")
        if model_reason is not None:  # the state file itself verified: only its model copy is lost
            return self._model_lost(key, path, stored, model_reason, bad_model, fresh=fresh or shared)
        self._move_aside(path, read_stat, reason)
        return ClientState(reset_reason=f"{path.name}: {reason}")

    def _model_lost(
        self, key: str, path: Path, stored: "_Stored", reason: str, bad_model: Path | None, *, fresh: bool
    ) -> ClientState:
        """The state of a sound state file whose model copy in the model store cannot be used.

        Everything but the model is kept (error memory, steps, ``extra``); the model is
        None at version -1, which no server version matches, so the mod asks for a
        dense sync. The state file stays where it is (the next save replaces it); the
        client's link to the version is removed, and a corrupt version file's own name
        too, so no other client links those bytes again.
        """
        if bad_model is not None:
            self._forget_bad_model(stored.ref.hash, bad_model)
        self._release(key, stored.ref.hash)
        log(
            WARNING,
            "client state %s: lost its model copy (%s); the client keeps its error memory and the "
            "rest of its state, and needs a dense sync",
            path, reason,
        )
        state = _materialize(stored, None, fresh=fresh)
        state.model_lost = f"{path.name}: {reason}"
        return state

    def save(self, key: str, state: ClientState, *, model_hash: str | None = None) -> None:
        """Write ``state`` atomically; the cache keeps it (do not change it in place afterwards).

        With ``share_models`` the model copy goes to the model store first
        (linked, or written once per version), then the state file naming it
        replaces the old one, then the link to the version this client held
        before is removed and that version's file too if no client links it.

        ``model_hash``: :func:`~fl_sparse.flat.vector_hash` of ``state.model``, where the
        caller has it already (the mod checks it against the server's on every message),
        so the model is not hashed twice. It is trusted: a wrong one would file the model
        copy under another version's name.
        """
        path = self.path(key)
        held = self._held_hash(path, trust_cache=True)  # the model version this client holds through a link now
        _CACHE.drop(path)
        ref, linked = None, False
        model = state.model
        if (
            self.share_models
            and isinstance(model, torch.Tensor)
            and model.numel()
            and model.dtype == torch.float32  # the mod's; any other model stays in the state file
            and self._models_key not in _no_links
        ):
            digest = model_hash if model_hash is not None else vector_hash(model)
            try:
                linked = self._link(key, digest, model)
            except _Unlinkable:
                pass
            else:
                ref = _ModelRef(digest, model.dtype, tuple(model.shape))
        try:
            error, error_from = self._narrow(state.error)
            casts = {"error": str(error_from).removeprefix("torch.")} if error_from is not None else None
            body = ClientState(None if ref else model, state.model_version, error, state.steps_done, dict(state.extra))
            chunks = encode_state(body, model_ref=ref, casts=casts)  # TypeError for a dtype it cannot store
            size = sum(map(len, chunks))  # bytes and byte-format memoryviews: len is the byte count
            spare = self._spare_path(key) if size <= SPARE_MAX_BYTES and os.name == "posix" else None
            try:
                written = self._write_file(path, spare, chunks, size)
            except _SpareLost:  # swept away while we wrote it: once more in a new file
                written = self._write_file(path, None, chunks, size)
        except BaseException:
            # Release the new link only if no state file names it: a save can fail after its
            # replace (a signal during the folder's fsync, a rename NFS did but reported failed),
            # and the file then in place names this version, as does the previous one when it
            # held this version already (its missing link was made again just now).
            if linked and self._held_hash(path) != ref.hash:
                self._release(key, ref.hash)
            raise
        if held is not None and (ref is None or ref.hash != held):
            self._release(key, held)
        stored = _Stored(body, ref, error_from, bytes(chunks[-1]))
        _CACHE.put(path, _signature(written), stored, _nbytes(body))
        if ref is not None:
            model_key = (self._models_key, ref.hash)
            if _CACHE.get(model_key, None) is None:  # a copy: the caller's tensor is theirs to change
                flat = _as_bytes(model).clone()
                _CACHE.put(model_key, None, flat, flat.numel())

    def _write_file(self, path: Path, spare: str | None, chunks: list, size: int) -> os.stat_result:
        """Write ``chunks`` (``size`` bytes) as the new file at ``path``, atomically; its stat.

        Into a temporary file, then ``os.replace``. The temporary file is the client's
        spare (``<name>.spare``) when it has one: its state file of two saves ago, whose
        pages the file system need not allocate again. On tmpfs a new 200 kB file costs
        about 150 us to allocate and, once replaced, to free; rewriting a spare in place
        about 20 us. The file this save replaces becomes the next spare, renamed there
        only once it is no longer the state file, so a spare is never the live file.
        """
        fd = tmp = None
        if spare is not None:
            fd, tmp = _claim_spare(spare, path)
        claimed = fd is not None
        if fd is None:
            try:
                fd, tmp = _create_temp(path)
            except FileNotFoundError:  # the folder's first save (no stat of it on every save)
                self._make_root()
                fd, tmp = _create_temp(path)
        old = None
        try:
            try:
                if claimed:
                    os.ftruncate(fd, size)  # a spare from a larger state keeps no stale tail
                _write_all(fd, chunks)
                if self.durable:
                    os.fsync(fd)
                written = os.fstat(fd)  # os.replace keeps inode, size and mtime: the cache's signature
            finally:
                os.close(fd)
            if spare is not None:
                old = _temp_name(path)
                try:
                    os.link(path, old)  # the file about to be replaced, kept under a name no save claims
                except OSError:  # no state file yet (or no links here): no spare this time
                    old = None
            try:
                os.replace(tmp, path)
            except FileNotFoundError:
                if claimed:  # the stale-file sweep of another process took the claimed spare
                    raise _SpareLost(tmp) from None
                raise
        except BaseException:
            for name in (tmp, old):
                if name is not None:
                    try:
                        os.unlink(name)
                    except FileNotFoundError:
                        pass
            raise
        if self.durable:
            try:
                _fsync_dir(self.root, strict=True)  # the rename itself survives a power cut
            except OSError:
                if old is not None:  # the replaced file may still be the state file on the disk:
                    try:             # never rewrite it in place as the next spare
                        os.unlink(old)
                    except OSError:
                        pass
                raise
        if old is not None:
            try:
                os.rename(old, spare)
            except OSError:
                try:
                    os.unlink(old)
                except OSError:
                    pass
        return written

    def shared_model(self, digest: str, numel: int) -> torch.Tensor | None:
        """Model version ``digest`` as a flat float32 vector of ``numel``, if this process holds it.

        Only with ``share_models``: the per-process cache keeps each version this
        process has saved or read, by its hash. The tensor is the cache's own:
        read it, never change it (a save of a state holding it is fine).
        """
        if not self.share_models or not digest:
            return None
        cached = _CACHE.get((self._models_key, digest), None)
        if cached is None or cached.numel() != 4 * numel:
            return None
        return cached.view(torch.float32)

    def _spare_path(self, key: str) -> str:
        return f"{self.path(key)}{SPARE_SUFFIX}"

    def delete(self, key: str) -> None:
        path = self.path(key)
        held = self._held_hash(path)
        _CACHE.drop(path)
        path.unlink(missing_ok=True)
        try:
            os.unlink(self._spare_path(key))
        except FileNotFoundError:
            pass
        if held is not None:
            self._release(key, held)

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
        In the model store (``root/models``) it also removes what a killed
        save left there: a client's link to a version its state file does not
        name, and a version file no client links (see the module docstring);
        both only when untouched for :data:`STALE_TMP_SECONDS`.
        """
        now = time.time() if now is None else now
        removed = []
        try:
            entries = list(os.scandir(self.root))
        except OSError:  # no folder yet
            return removed
        removed += self._sweep_temp(entries, now)
        try:
            models = list(os.scandir(self.models))
        except OSError:  # no model store here
            return removed
        removed += self._sweep_temp(models, now, by_ctime=True)
        removed += self._sweep_models(models, now)
        return removed

    def _sweep_temp(self, entries: list[os.DirEntry], now: float, by_ctime: bool = False) -> list[Path]:
        # In the model store a temporary *link* to an old version file has that file's old mtime;
        # its ctime is when it was linked.
        removed = []
        for entry in entries:
            m = _TMP.match(entry.name)
            if m is None:
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
                old = now - (max(st.st_mtime, st.st_ctime) if by_ctime else st.st_mtime) > STALE_TMP_SECONDS
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

    def _sweep_models(self, entries: list[os.DirEntry], now: float) -> list[Path]:
        """Links no state file names, and version files no client links, untouched for a while."""
        removed, links, canonical = [], {}, []
        for entry in entries:
            if _CANONICAL.match(entry.name):
                canonical.append(entry)
            elif (m := _LINK.match(entry.name)) is not None:
                links.setdefault(m.group("key"), []).append((m.group("hash"), entry))

        def untouched(entry: os.DirEntry) -> os.stat_result | None:
            try:
                st = os.stat(entry.path, follow_symlinks=False)  # fresh: not the scan's cached one
            except OSError:
                return None
            return st if now - max(st.st_mtime, st.st_ctime) > STALE_TMP_SECONDS else None

        for key, held in links.items():
            state_path = self.root / f"{key}.state"
            if len(held) == 1 and state_path.exists():
                continue  # the usual case: one link, its state file there (its header is not read)
            try:
                current = self._held_hash(state_path, strict=True)
            except OSError:  # cannot tell now which version it names: its links wait for the next sweep
                continue
            for digest, entry in held:
                # A link a save made moments ago may be one its state file is about to name.
                if digest != current and untouched(entry) is not None:
                    try:
                        os.unlink(entry.path)
                        removed.append(Path(entry.path))
                    except OSError:
                        pass
        for entry in canonical:
            st = untouched(entry)
            if st is not None and st.st_nlink <= 1:
                try:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
                except OSError:
                    pass
        return removed

    # ------------------------------------------------------------ internals
    def _make_root(self) -> None:
        if self.root.is_dir():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if self.durable:
            _fsync_dir(self.root.parent)  # the new folder's own entry

    # ---- the model store
    def _held_hash(self, path: Path, *, trust_cache: bool = False, strict: bool = False) -> str | None:
        """The model version the state file at ``path`` names (held through a link), or None.

        ``trust_cache`` (a save): the cached entry as it is, without a ``stat`` of the file.
        The load just before the save confirmed it; an entry gone stale since (another
        process saving this client meanwhile, which the server never asks for) costs at
        most a link that the sweep removes later.

        ``strict`` (the sweep): an error reading the file (other than its absence) is raised,
        not taken to mean that the file names no version.
        """
        if trust_cache:
            stored = _CACHE.peek(path)
            if stored is not None:
                return stored.ref.hash if stored.ref is not None else None
        try:
            return self._read_held_hash(path)
        except FileNotFoundError:
            return None
        except OSError:
            if strict:
                raise
            return None

    def _read_held_hash(self, path: Path) -> str | None:
        """:meth:`_held_hash` from the cache (by the file's signature) or the file's header; raises OSError."""
        stat = os.stat(path)
        # The signature alone, without _cached_state's read of the file's digest (see above).
        stored = _CACHE.get(path, _signature(stat))
        if stored is not None:
            return stored.ref.hash if stored.ref is not None else None
        if not self.models.is_dir():
            return None  # nothing was ever shared here: no header to read
        try:
            with open(path, "rb") as fh:
                head = fh.read(len(MAGIC) + 4)
                if head[: len(MAGIC)] not in (MAGIC, MAGIC_V2) or len(head) < len(MAGIC) + 4:
                    return None
                (header_len,) = struct.unpack_from("<I", head, len(MAGIC))
                if header_len > 1 << 20:
                    return None
                header = json.loads(fh.read(header_len))
            return _ModelRef.from_json(header["model_ref"]).hash if "model_ref" in header else None
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return None

    def _link(self, key: str, digest: str, model: torch.Tensor) -> bool:
        """Make ``key``'s link to version ``digest`` of ``model`` (writing the version file if there is none).

        True if a new link was made, False if the client already had it.
        Raises :class:`_Unlinkable` where hard links do not work.
        """
        link, canonical = self._link_name(key, digest), self._canonical_name(digest)
        for _ in range(_LINK_TRIES):
            try:
                # Straight to the client's name: a link is made whole or not at all, so no
                # temporary name is needed, and one that exists already holds this very version
                # (names are content hashes; a killed save may have left it).
                os.link(canonical, link)
            except FileExistsError:
                return False
            except FileNotFoundError:  # no such version yet, its last holder just removed it, or no folder
                if os.path.lexists(link):  # link(2) looks at the source first: we hold this version already
                    return False
                if not self.models.is_dir():
                    self._make_root()
                    self.models.mkdir(exist_ok=True)
                    if self.durable:
                        _fsync_dir(self.root)
                self._write_canonical(canonical, model)
                continue
            except OSError as exc:
                self._links_unsupported(exc)
            if self.durable:
                try:
                    _fsync_dir(self.models, strict=True)  # the link must be on the disk before a state names it
                except OSError:
                    try:
                        os.unlink(link)
                    except OSError:
                        pass
                    raise
            return True
        log(WARNING, "model store %s: version %s vanished %d times while linking it; stored inline",
            self.models, digest, _LINK_TRIES)
        raise _Unlinkable(digest)

    def _write_canonical(self, canonical: str, model: torch.Tensor) -> None:
        """Write a version file; another writer's (the same bytes, by its name) wins a race."""
        fd, tmp = _create_temp(canonical)
        try:
            try:
                _write_all(fd, [_as_bytes(model).numpy()])
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, canonical)  # never os.replace: the clients' links must stay on one file
            except FileExistsError:
                pass
            except FileNotFoundError:
                raise
            except OSError as exc:
                self._links_unsupported(exc)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def _links_unsupported(self, exc: OSError):
        if exc.errno not in _NO_LINKS_ERRNOS:
            # Too many links to one file (EMLINK: only this version, only now), or a passing
            # failure (a full disk, a quota, an I/O error): this save keeps the model inline,
            # and the next one tries the store again.
            if exc.errno != errno.EMLINK:
                log(WARNING, "model store %s: cannot link a model version (%s); this save keeps its "
                    "model in the client's state file", self.models, exc)
        else:
            with _swept_lock:
                first = self._models_key not in _no_links
                _no_links.add(self._models_key)
            if first:
                log(WARNING, "model store %s: hard links do not work here (%s); clients keep their model "
                    "copy in their own state file", self.models, exc)
        raise _Unlinkable(str(exc)) from exc

    def _release(self, key: str, digest: str) -> None:
        """Remove ``key``'s link to version ``digest``; remove the version if no client links it now."""
        try:
            os.unlink(self._link_name(key, digest))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log(WARNING, "could not remove model link %s: %s", self._link_name(key, digest), exc)
            return
        self._collect(digest)

    def _collect(self, digest: str) -> bool:
        """The GC rule: a version file whose only name left is its canonical one is removed."""
        canonical = self._canonical_name(digest)
        try:
            if os.stat(canonical).st_nlink > 1:
                return False
            os.unlink(canonical)
        except FileNotFoundError:
            return False
        except OSError as exc:
            log(WARNING, "could not remove unused model version %s: %s", canonical, exc)
            return False
        _CACHE.drop((self._models_key, digest))
        return True

    def _model_bytes(self, key: str, ref: _ModelRef) -> torch.Tensor:
        """Version ``ref`` as uint8 bytes (shared with the cache: copy before changing), verified."""
        cache_key = (self._models_key, ref.hash)
        cached = _CACHE.get(cache_key, None)
        if cached is not None and cached.numel() == ref.nbytes:
            return cached
        link = self.model_path(key, ref.hash)
        try:
            data = self._read_model(link, ref)
        except FileNotFoundError:
            canonical = self.canonical_model_path(ref.hash)
            try:
                data = self._read_model(canonical, ref)
            except FileNotFoundError:
                raise ValueError(f"its model copy {MODELS}/{link.name} is missing") from None
            try:  # hold it again through our own link
                self._link(key, ref.hash, data)
            except (_Unlinkable, OSError):
                pass
        _CACHE.put(cache_key, None, data, data.numel())
        return data

    @staticmethod
    def _read_model(path: Path, ref: _ModelRef) -> torch.Tensor:
        with open(path, "rb", buffering=0) as fh:
            size = os.fstat(fh.fileno()).st_size
            if size != ref.nbytes:
                raise _BadModel(path, f"model file {MODELS}/{path.name} is {size} bytes, the state says {ref.nbytes}")
            buf = np.empty(size, dtype=np.uint8)
            got = _read_all(fh, buf)
            if got != size:
                raise OSError(f"short read of {path} ({got} of {size} bytes)")
        digest = vector_hash(torch.from_numpy(buf).view(torch.float32))
        if digest != ref.hash:
            raise _BadModel(path, f"model file {MODELS}/{path.name} is corrupt (its bytes hash to {digest})")
        return torch.from_numpy(buf)

    def _forget_bad_model(self, digest: str, bad: Path) -> None:
        """A corrupt version file is not handed to other clients: drop its canonical name if it is that file."""
        canonical = self.canonical_model_path(digest)
        try:
            if bad == canonical or os.path.samestat(os.stat(bad), os.stat(canonical)):
                os.unlink(canonical)
        except OSError:
            pass
        _CACHE.drop((self._models_key, digest))

    # ---- the error memory's dtype
    def _narrow(self, error: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.dtype | None]:
        """``error`` as stored (cast to ``error_dtype``, clamped to its range) and the dtype to cast back to."""
        if error is None or self.error_dtype == "float32" or not error.is_floating_point():
            return error, None
        target = _DTYPES[self.error_dtype]
        if error.dtype == target:
            return error, None
        a = error.detach().to("cpu", torch.float32).contiguous().reshape(-1).numpy()
        limit = float(torch.finfo(target).max)
        if a.size and not (float(a.max()) <= limit and float(a.min()) >= -limit):  # NaN takes this path too
            beyond = np.isfinite(a) & (np.abs(a) > limit)  # a non-finite entry is left as it is
            over = int(beyond.sum())
            if over:
                log(WARNING, "error memory: %d entries beyond the %s range (largest magnitude %.4g) are "
                    "stored clamped to +-%.6g", over, self.error_dtype, float(np.abs(a[beyond]).max()), limit)
                a = np.where(beyond, np.clip(a, -limit, limit), a)
        return _narrow_array(a, target).reshape(error.shape), error.dtype

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


@dataclass
class _Stored:
    """A state file's contents as the cache keeps them.

    ``state.model`` is None when ``ref`` names the model store's version;
    ``state.error`` is as stored, and cast to ``error_from`` (when set) on load.
    """

    state: ClientState
    ref: _ModelRef | None
    error_from: torch.dtype | None
    trailer: bytes | None = None  # the file's last 8 bytes (its XXH3) when this process wrote it


def _materialize(stored: _Stored, model: torch.Tensor | None, *, fresh: bool, shared_model: bool = False) -> ClientState:
    """The state a load returns: copies of the cached tensors, or (``fresh``) the tensors themselves.

    ``model``: the model store's version bytes (the cache's, shared by every client
    holding that version), copied unless ``shared_model``; None where ``stored.ref``
    names a version that could not be read (the state then holds no model, at version -1).
    """
    def own(t):
        return t if fresh or not isinstance(t, torch.Tensor) else t.clone()

    st = stored.state
    version = st.model_version
    if stored.ref is None:
        out_model = own(st.model)
    elif model is None:  # the model store's copy is lost (ClientStateStore._model_lost): no version held
        out_model, version = None, -1
    else:
        out_model = (model if shared_model else model.clone()).view(stored.ref.dtype).reshape(stored.ref.shape)
    if stored.error_from is not None and st.error is not None:
        error = _widen(st.error, stored.error_from)  # a new tensor
    else:
        error = own(st.error)
    return ClientState(out_model, version, error, st.steps_done, {k: own(v) for k, v in st.extra.items()})


def _nbytes(state: ClientState) -> int:
    tensors = [state.model, state.error, *state.extra.values()]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class _StateCache:
    """Per-process LRU of client states (keyed by file path, checked against the file's stat)
    and of model store versions (keyed by (folder, hash); content-addressed, so never stale).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: "OrderedDict[object, tuple[tuple | None, object, int]]" = OrderedDict()
        self._bytes = 0

    @staticmethod
    def limit() -> int:
        text = os.environ.get("FL_SPARSE_STATE_CACHE_MB", "512")
        try:
            megabytes = float(text)
        except ValueError:
            megabytes = math.nan
        if not (math.isfinite(megabytes) and megabytes >= 0):
            raise ValueError(f"FL_SPARSE_STATE_CACHE_MB must be a number of megabytes >= 0, got {text!r}")
        return int(megabytes * 2**20)

    def get(self, key, signature: tuple | None):
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] != signature:  # the file changed under us: read it
                self._pop(key)
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def peek(self, key):
        """The entry's value whatever its signature (None if there is none); its place in the LRU stays."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry[1]

    def put(self, key, signature: tuple | None, value, size: int) -> None:
        limit = self.limit()
        with self._lock:
            self._pop(key)
            if size > limit:
                return
            self._entries[key] = (signature, value, size)
            self._bytes += size
            while self._bytes > limit:
                self._pop(next(iter(self._entries)))

    def drop(self, key) -> None:
        with self._lock:
            self._pop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _pop(self, key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[2]


_CACHE = _StateCache()

# link(2) errors that say hard links do not work in this folder at all: the model store is off
# for it for the rest of the process. Any other error costs only the save that met it.
_NO_LINKS_ERRNOS = frozenset(
    getattr(errno, name) for name in ("EPERM", "EXDEV", "ENOTSUP", "EOPNOTSUPP", "ENOSYS", "EACCES")
    if hasattr(errno, name)
)
