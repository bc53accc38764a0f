"""The message contract between fl-sparse strategies and :class:`~fl_sparse.clients.SparseMod`.

Defined once, here; both sides use these names and helpers, and no other
module spells a record key or a protocol field as a string literal.

A train message from an fl-sparse strategy carries the user's own records
untouched (``strategy.configrecord_key``, by default ``"config"``: the
``train_config`` given to ``strategy.start``, plus Flower's ``server-round``;
SSGD-MV's values phase and the identify message carry none) and, beside them,
records whose names start with ``fl-sparse``:

==========================  ============  ==========================================
record                      direction     what it holds
==========================  ============  ==========================================
``fl-sparse``               both          :class:`Instruction` (server to client) or
                                          :class:`Report` (client to server)
``fl-sparse.sync``          down          brings the client's model copy to ``w_{t-1}``
``fl-sparse.exact``         both          arrays sent exactly, not compressed
                                          (integer buffers, arrays the user excluded)
``fl-sparse.mask``          down          SSGD-MV values phase: the common mask
``fl-sparse.update``        up            the encoded compressed update
``fl-sparse.vote``          up            SSGD-MV vote (or ``.vote-add`` / ``.vote-drop``)
``fl-sparse.metrics``       up            the mod's own numbers (:class:`UplinkMetrics`)
``fl-sparse.diagnostics``   up            dense ``a`` and step for the ρ estimates
==========================  ============  ==========================================

The mod removes every ``fl-sparse*`` record before the user's train function
sees the message and hands it the dense model under ``Instruction.arrays_key``;
on the way out it drops the trained ArrayRecord and adds its own reply records
(``fl-sparse``, ``.update`` or ``.vote*``, ``.metrics``, ``.exact``,
``.diagnostics``). The user's other records pass through untouched.

Every reader here validates types and ranges and raises :class:`ProtocolError`
(a :class:`fl_sparse.codec.PayloadError`) naming the field, so a malformed
message is refused with a clear reason on either side.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import MISSING, dataclass, fields
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fl_sparse.codec import PayloadError
from fl_sparse.records import config_record, metric_record, record_dict

__all__ = [
    "ProtocolError",
    "PREFIX",
    "RECORD",
    "SYNC",
    "EXACT",
    "MASK",
    "UPDATE",
    "VOTE",
    "VOTE_ADD",
    "VOTE_DROP",
    "METRICS",
    "DIAGNOSTICS",
    "PHASE_TRAIN",
    "PHASE_VOTE",
    "PHASE_VALUES",
    "PHASE_IDENTIFY",
    "PHASES",
    "SYNC_MODES",
    "ERROR_MEMORY_DTYPES",
    "Instruction",
    "Report",
    "UplinkMetrics",
    "is_protocol_key",
    "user_records",
    "array_record",
]

PREFIX = "fl-sparse"
RECORD = PREFIX
SYNC = f"{PREFIX}.sync"
EXACT = f"{PREFIX}.exact"
MASK = f"{PREFIX}.mask"
UPDATE = f"{PREFIX}.update"
VOTE = f"{PREFIX}.vote"
VOTE_ADD = f"{PREFIX}.vote-add"
VOTE_DROP = f"{PREFIX}.vote-drop"
METRICS = f"{PREFIX}.metrics"
DIAGNOSTICS = f"{PREFIX}.diagnostics"

PHASE_TRAIN = "train"  # train, compress, send the update (every strategy but SSGD-MV)
PHASE_VOTE = "vote"  # SSGD-MV phase 1: train, send the top-K positions
PHASE_VALUES = "values"  # SSGD-MV phase 2: send the kept update on the common mask
PHASE_IDENTIFY = "identify"  # tell the server this client's stable key; no training
PHASES = (PHASE_TRAIN, PHASE_VOTE, PHASE_VALUES, PHASE_IDENTIFY)

# none: the client holds w_{t-1}; dense: the whole model; delta: ĝ_{t-1} (client holds
# w_{t-2}); set: w_{t-1}'s values where it changed; values: SSGD-MV's last aggregate on
# the client's last mask.
SYNC_MODES = ("none", "dense", "delta", "set", "values")

# How a client stores its error memory between rounds (it computes in float32 either way).
ERROR_MEMORY_DTYPES = ("float32", "float16", "bfloat16")


class ProtocolError(PayloadError):
    """A message does not follow the fl-sparse protocol (names the field)."""


def is_protocol_key(key: str) -> bool:
    """True for the records this protocol owns (``fl-sparse`` and ``fl-sparse.*``)."""
    return key == PREFIX or key.startswith(PREFIX + ".")


def user_records(content: RecordDict) -> RecordDict:
    """A new RecordDict with every record of ``content`` except the protocol's."""
    return record_dict({k: v for k, v in content.items() if not is_protocol_key(k)})


def _find_record(content: RecordDict, key: str, kind: type):
    """``content[key]`` if it is a ``kind`` record, else None.

    Not ``content.array_records`` / ``config_records`` / ``metric_records``: each rebuilds a
    dict of the message's records per call (~8 us).
    """
    record = content[key] if key in content else None
    return record if isinstance(record, kind) else None


def find_array_record(content: RecordDict, key: str) -> ArrayRecord | None:
    """``content[key]`` if it is an ArrayRecord, else None."""
    return _find_record(content, key, ArrayRecord)


def array_record(content: RecordDict, key: str, *, what: str = "message") -> ArrayRecord:
    """``content[key]`` as an ArrayRecord, or ProtocolError naming the key."""
    record = find_array_record(content, key)
    if record is None:
        raise ProtocolError(f"{what} has no {key!r} ArrayRecord")
    return record


# ------------------------------------------------------------------ fields
def _check(name: str, value: Any, kind: type) -> Any:
    """``value`` if it is of ``kind`` (bool is not an int here), else ProtocolError."""
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
        value = float(value) if ok else value
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ProtocolError(f"protocol field {name!r} must be {kind.__name__}, got {value!r}")
    return value


_KINDS = {"int": int, "float": float, "str": str, "bool": bool}  # field annotations (strings)


@functools.lru_cache(maxsize=None)
def _wire_fields(cls) -> tuple[tuple[str, str, type, bool], ...]:
    """``(record key, attribute, kind, has a default)`` per field of ``cls``: built once per class."""
    return tuple((f.name.replace("_", "-"), f.name, _KINDS[f.type], f.default is not MISSING) for f in fields(cls))


@functools.lru_cache(maxsize=None)
def _wire_index(cls) -> tuple[dict[str, tuple[str, type]], tuple[str, ...]]:
    """``({record key: (attribute, kind)}, required record keys)`` of ``cls``: built once per class."""
    wire = _wire_fields(cls)
    return {key: (name, kind) for key, name, kind, _ in wire}, tuple(key for key, _, _, has in wire if not has)


def _from_record(cls, record: ConfigRecord | MetricRecord, what: str):
    """Build dataclass ``cls`` from a record: every field typed, unknown keys refused."""
    index, required = _wire_index(cls)
    data = dict(record.items())  # one pass over Flower's TypedDict, then plain dict lookups
    unknown = sorted(key for key in data if key not in index)
    if unknown:
        raise ProtocolError(f"{what} has unknown field(s) {unknown}")
    for key in required:
        if key not in data:
            raise ProtocolError(f"{what} lacks the field {key!r}")
    # The fields present only (a train message carries about 12 of the instruction's 25):
    # the others keep their defaults.
    values = {}
    for key, value in data.items():
        name, kind = index[key]
        values[name] = _check(key, value, kind)
    return cls(**values)


@functools.lru_cache(maxsize=None)
def _field_defaults(cls) -> dict[str, Any]:
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def _to_items(obj, *, skip_defaults: bool = False) -> dict[str, Any]:
    """The record items of ``obj``; ``skip_defaults``: leave out fields at their default (the reader fills them in)."""
    # Not dataclasses.asdict: it deep-copies every value (the fields are scalars) and cost more than the record.
    defaults = _field_defaults(type(obj)) if skip_defaults else {}
    items = {}
    for key, name, _, _ in _wire_fields(type(obj)):
        value = getattr(obj, name)
        default = defaults.get(name, MISSING)
        if not (type(value) is type(default) and value == default):
            items[key] = value
    return items


# ------------------------------------------------------------------ server -> client
_GENERATION_NAME = re.compile(r"[A-Za-z0-9_-]{0,64}")


@dataclass(frozen=True)
class Instruction:
    """What the server tells a client's :class:`~fl_sparse.clients.SparseMod` in a train message.

    ``nonce`` is fresh for every message; the reply must echo it.
    ``generation`` names the strategy's run: when it changes (a new
    ``start``), the client forgets its error memory and votes from the last
    one. Clients keep their state in a folder named after it, so a run
    resumed from a checkpoint (same generation, new Flower run id) finds it. Sync: ``sync_mode`` (one of :data:`SYNC_MODES`) brings the client from
    ``base_version`` to ``model_version``, whose flat model hashes to
    ``model_hash``; ``layout`` (JSON of :class:`~fl_sparse.flat.FlatLayout`)
    comes with every dense sync. ``accepted_round`` is the last round whose
    update from this client the server aggregated (the client puts back into
    its error memory an update the server did not take).

    Uplink: ``uplink`` is the compressor spec (JSON, built with
    :func:`fl_sparse.compressors.build_compressor`), ``uplink_values`` and
    ``uplink_positions`` the wire codes, ``error_feedback`` whether the client
    keeps its error memory, ``error_memory_dtype`` (one of
    :data:`ERROR_MEMORY_DTYPES`) the dtype it stores that memory in between
    rounds, ``seed`` seeds random compressors (with the
    round and the client's partition id, else its node id). SSGD-MV adds ``vote_k``, ``add_drop_k``,
    ``vote_round`` (which of this client's votes the server holds),
    ``vote_positions`` and ``mask_round``.

    The rest: ``arrays_key`` is where the train function finds the model;
    ``diagnostics`` asks for the dense ``a`` and step (ρ estimates);
    ``state_dir`` / ``state_fsync`` are the server's state-folder hint and
    whether saves there must be fsynced.
    """

    server_round: int
    phase: str = PHASE_TRAIN
    generation: str = ""
    nonce: str = ""
    model_version: int = 0
    model_hash: str = ""
    sync_mode: str = "none"
    base_version: int = -1
    accepted_round: int = -1
    layout: str = ""
    arrays_key: str = "arrays"
    uplink: str = '{"name": "none"}'
    uplink_values: str = "fp32"
    uplink_positions: str = "raw"
    error_feedback: bool = True
    error_memory_dtype: str = "float32"
    seed: int = 0
    diagnostics: bool = False
    state_dir: str = ""
    state_fsync: bool = True
    vote_k: int = 0
    add_drop_k: int = 0
    vote_round: int = -1
    vote_positions: str = "raw"
    mask_round: int = -1

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ProtocolError(f"unknown phase {self.phase!r}; expected one of {PHASES}")
        if self.sync_mode not in SYNC_MODES:
            raise ProtocolError(f"unknown sync-mode {self.sync_mode!r}; expected one of {SYNC_MODES}")
        if self.server_round < 0:
            raise ProtocolError(f"server-round must be >= 0, got {self.server_round}")
        if not _GENERATION_NAME.fullmatch(self.generation):
            # It names the clients' state folder: letters, digits, '-' and '_' only.
            raise ProtocolError(f"generation must be 0-64 of [A-Za-z0-9_-], got {self.generation!r}")
        if self.error_memory_dtype not in ERROR_MEMORY_DTYPES:
            raise ProtocolError(
                f"unknown error-memory-dtype {self.error_memory_dtype!r}; expected one of {ERROR_MEMORY_DTYPES}"
            )
        for name in ("vote_k", "add_drop_k"):
            if getattr(self, name) < 0:
                raise ProtocolError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")

    def uplink_spec(self) -> dict[str, Any]:
        """The uplink compressor spec as a dict."""
        try:
            spec = json.loads(self.uplink)
        except json.JSONDecodeError as exc:
            raise ProtocolError(f"uplink spec is not JSON: {exc}") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ProtocolError(f"uplink spec must be an object with a 'name', got {self.uplink!r}")
        return spec

    def to_record(self) -> ConfigRecord:
        # Fields at their default are left out (a train message of a plain top-K round carries
        # about 12 of the 25): Flower type-checks every record item, at about 3 us each, on both sides.
        return config_record(_to_items(self, skip_defaults=True))

    @classmethod
    def from_record(cls, record: ConfigRecord) -> "Instruction":
        return _from_record(cls, record, "instruction")

    @classmethod
    def read(cls, content: RecordDict) -> "Instruction | None":
        """The instruction in ``content``, or None if it is not an fl-sparse message."""
        record = _find_record(content, RECORD, ConfigRecord)
        return None if record is None else cls.from_record(record)


# ------------------------------------------------------------------ client -> server
@dataclass(frozen=True)
class Report:
    """What a client's mod tells the server beside its payload.

    ``nonce`` echoes the instruction's; ``model_version`` and
    ``model_hash`` name the model the client trained from (after the sync), ``server_round`` the round this reply answers,
    ``partition_id`` (-1 without one) is what the server orders and samples
    nodes by; ``client_key`` is the client's state-file name (``client-<pid>``
    or ``node-<id>``), for the logs; ``vote_kind`` / ``vote_base_round``
    describe an SSGD-MV vote.
    """

    server_round: int
    nonce: str = ""
    model_version: int = -1
    model_hash: str = ""
    client_key: str = ""
    partition_id: int = -1
    vote_kind: str = ""
    vote_base_round: int = -1

    def to_record(self) -> ConfigRecord:
        # Fields at their default are left out (the reader fills them in): besides being smaller, the
        # record then holds no empty string, which Flower's ConfigRecord.count_bytes() refuses (a
        # message_size_mod in front of SparseMod measured every reply and dropped it).
        return config_record(_to_items(self, skip_defaults=True))

    @classmethod
    def from_record(cls, record: ConfigRecord) -> "Report":
        return _from_record(cls, record, "client report")

    @classmethod
    def read(cls, content: RecordDict) -> "Report":
        record = _find_record(content, RECORD, ConfigRecord)
        if record is None:
            raise ProtocolError(f"reply has no {RECORD!r} ConfigRecord (is SparseMod in the ClientApp's mods?)")
        return cls.from_record(record)


@dataclass(frozen=True)
class UplinkMetrics:
    """The mod's own numbers for one reply (``fl-sparse.metrics``).

    ``uplink_bytes``: encoded size of what was sent; ``density``: sent
    entries / d; ``error_norm``: ‖e‖ after the round; ``compression_error``:
    ‖a − sent‖² of this round (the hard-threshold paper's per-round error).
    """

    uplink_bytes: int = 0
    density: float = 0.0
    error_norm: float = 0.0
    compression_error: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value < 0:
                raise ProtocolError(f"metric {f.name.replace('_', '-')!r} must be >= 0, got {value!r}")

    def to_record(self) -> MetricRecord:
        return metric_record(_to_items(self))

    @classmethod
    def read(cls, content: RecordDict) -> "UplinkMetrics":
        record = _find_record(content, METRICS, MetricRecord)
        if record is None:
            raise ProtocolError(f"reply has no {METRICS!r} MetricRecord")
        # MetricRecord keeps ints as ints and floats as floats; accept an int where a float is due.
        items = {k: (float(v) if isinstance(v, int) and k != "uplink-bytes" and not isinstance(v, bool) else v) for k, v in record.items()}
        return _from_record(cls, MetricRecord(items), "uplink metrics")
