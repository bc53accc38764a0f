"""``SparseMod``: make any Flower ClientApp send compressed, error-compensated updates.

Put it in front of an ordinary train function, as Flower's own
``fixedclipping_mod`` goes in front of one for differential privacy::

    from flwr.clientapp import ClientApp
    from fl_sparse.clients import SparseMod

    app = ClientApp(mods=[SparseMod()])

    @app.train()
    def train(msg, context):
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        ...                                   # train as usual
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": n})}), reply_to=msg)

and run it with any strategy of :mod:`fl_sparse.strategies` on the server.
The train function contains nothing sparse. Per train message from an
fl-sparse strategy (:mod:`fl_sparse.protocol` for the records)::

    on the way in:   w ← sync(w_stored)               exact copy of the server's w_{t-1}
                     check hash(w); put an update the server did not take back into e
                     hand the user  {arrays: w (same keys, shapes, dtypes), config, ...}
    the user trains: returns w' (and metrics)
    on the way out:  Δ = w − w'                        (float arrays, as one flat vector)
                     a = e + Δ;  s = Q(C_t(a));  e ← a − s      C_t: the round's uplink spec
                     store (w, e) atomically (fsynced unless the server's folder is throw-away)
                     reply encode(s), the exact arrays, the user's metrics

SSGD-MV's two phases (:mod:`fl_sparse.strategies.ssgd_mv`) are train messages
too: the vote phase calls the train function once and replies with the top-K
positions of ``a`` (or add/drop changes); the values phase replies with ``a``
on the server's common mask without calling it again. Evaluate and query
messages, and train messages that carry no fl-sparse instruction, pass
through untouched (the latter with a warning, once: the server's strategy is
then not an fl-sparse one, and the trained model goes back dense).

Any model: float arrays of any shape and float dtype, computed in float32 on
the flat vector and handed back in their own dtype (float16 loses nothing;
float64 is rounded to float32 precision, and the strategy warns). Complex arrays
are refused (as two real arrays, ``torch.view_as_real``, they work). Tied
weights (one tensor under two ``state_dict`` keys) are two arrays here, each
compressed on its own, so the server's two copies can drift apart (the strategy
warns at the start when two initial arrays are equal and not constant): return one
key per tensor (and load with ``strict=False``) or tie them again after loading. bfloat16:
Flower 1.42's ArrayRecord refuses bfloat16 tensors ("unsupported ScalarType
BFloat16"), so a bfloat16 model travels as float32 arrays
(``{k: v.float() for k, v in model.state_dict().items()}``) and is cast back
by the train function. Integer arrays (BatchNorm's ``num_batches_tracked``)
and the float arrays the server's strategy sends exactly (``exact_arrays``,
and by default BatchNorm's running statistics) are not compressed: the server
sends their current values with every message and the client returns the
trained values whole.

State between rounds (model copy, error memory, SSGD-MV votes) lives in a
:class:`~fl_sparse.clients.state.ClientStateStore`, one file per client, not
in ``context.state``: see that module for why. The folder is, in order: the
``state_dir`` given to the mod, the SuperNode's ``--node-config
state-dir=...``, ``$FL_SPARSE_STATE_DIR``, the server's hint (a
simulation's ``--out``/``--state-dir`` folder or its temporary one),
``$XDG_CACHE_HOME/fl-sparse/state`` (else ``~/.cache/fl-sparse/state``).
Inside it each strategy run has its own sub-folder (:func:`state_folder_name`),
kept after the run so that a resumed run finds its clients' memory: remove the
ones of runs you will not resume. A corrupt state
file is moved aside and the client starts empty: a message whose sync is dense
trains as usual; any other fails with :class:`SyncError` ("client state was
corrupt and has been reset; the server must send a dense sync"), the server
drops that reply and sends this client the dense model next time. A state
file that verifies but whose shared model copy is missing or damaged loses
only that copy: the error memory is kept, and the next non-dense message fails
the same way ("client's model copy was lost ...") until the dense model comes.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

import numpy as np
import torch
import xxhash
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log

from fl_sparse import algorithms, codec, protocol
from fl_sparse.clients.state import ClientState, ClientStateStore, error_dtype_name
from fl_sparse.compressors import (
    HardThreshold,
    Identity,
    RandomK,
    RTopK,
    TopK,
    build_compressor,
    magnitude_topk_indices,
    torch_threads as _torch_threads,
)
from fl_sparse.flat import FlatLayout, all_finite, array_to_numpy, vector_hash
from fl_sparse.memory import ErrorFeedback
from fl_sparse.protocol import Instruction, Report, UplinkMetrics
from fl_sparse.records import record_dict
from fl_sparse.sparse import SparseTensor

__all__ = [
    "SparseMod", "SyncError", "client_key", "state_folder_name", "client_generator_seed", "DEFAULT_STATE_DIR",
    "STATE_DIR_VARIABLE", "default_state_dir",
]

DEFAULT_STATE_DIR = Path.home() / ".cache" / "fl-sparse" / "state"  # the last resort, without $XDG_CACHE_HOME
STATE_DIR_VARIABLE = "FL_SPARSE_STATE_DIR"  # the environment variable naming a node's state folder

# ClientState.extra keys
_LAYOUT = "layout"  # the model's FlatLayout as JSON bytes (uint8), from the last dense sync
_GENERATION = "generation"  # the strategy run this state belongs to (bytes, uint8)
_PENDING_INDICES, _PENDING_VALUES, _PENDING_ROUND = "pending_indices", "pending_values", "pending_round"
_A, _A_ROUND = "ssgd_a", "ssgd_a_round"  # a, kept from the vote phase for the values phase
_MASK, _MASK_ROUND = "ssgd_mask", "ssgd_mask_round"  # the last common mask
_VOTE, _VOTE_ROUND = "ssgd_vote", "ssgd_vote_round"  # the vote sent before the last one
_SENT_VOTE, _SENT_VOTE_ROUND = "ssgd_sent_vote", "ssgd_sent_vote_round"  # the last vote sent


class SyncError(RuntimeError):
    """The client's stored model is not the version the server's sync assumes."""


def state_folder_name(instr: Instruction, context: Context) -> str:
    """The sub-folder of the state dir for this strategy run: ``gen-<generation>``.

    Keyed by the strategy's generation, not Flower's run id, so that a run
    resumed from a checkpoint (a new ``flwr run``, a new run id, the same
    generation) finds its clients' error memory on remote SuperNodes too.
    Without a generation (a strategy that sets none) it is ``run-<run id>``.
    """
    return f"gen-{instr.generation}" if instr.generation else f"run-{context.run_id}"


def default_state_dir() -> str:
    """The folder of a client that nobody names one for: ``$XDG_CACHE_HOME/fl-sparse/state``, else
    :data:`DEFAULT_STATE_DIR` (as the data cache follows ``$XDG_CACHE_HOME``)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return str(Path(xdg).expanduser() / "fl-sparse" / "state") if xdg else str(DEFAULT_STATE_DIR)


def node_int(context: Context, key: str, minimum: int = 0) -> int | None:
    """An integer node-config entry (``3``, ``3.0`` or ``"3"``) of at least ``minimum``, None when absent;
    anything else is named.

    The one parser of ``partition-id`` (and the built-in app's ``num-partitions``): ``2.7`` or ``True``
    is refused, not truncated or taken for 1, so a node never silently claims another's partition;
    ``-1`` too (the protocol's "no partition": the node would name a state file ``client--1`` and
    draw its random numbers as if it had no partition id).
    """
    value = context.node_config.get(key)
    if value is None:
        return None
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            pass
    if number is None or number < minimum:
        what = "not an integer" if number is None else f"below {minimum}"
        raise ValueError(
            f"node config {key}={value!r} is {what}; start the SuperNode with "
            f"--node-config \"partition-id=K num-partitions=N\" (0 <= K < N)"
        )
    return number


def client_key(context: Context) -> str:
    """Stable name of this client: its partition if it has one, else its node id.

    The parsed partition id, so ``3``, ``3.0`` and ``"3"`` name one state file, ``client-3``.
    """
    pid = node_int(context, "partition-id")
    return f"client-{pid}" if pid is not None else f"node-{context.node_id}"


def _partition_id(context: Context) -> int:
    pid = node_int(context, "partition-id")
    return pid if pid is not None else -1


def _random_stream(context: Context) -> int:
    """Whose random draws: the partition id, else the node id (nodes without one must not share draws)."""
    pid = _partition_id(context)
    return pid if pid >= 0 else int(context.node_id)


_LINEAR_SEED_CLIENTS = 10_007  # partition ids below it keep the linear seed (every run so far, RESULTS.md's too)


def client_generator_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Seed of a client's random draws in a round: reproducible, distinct per client (``partition_id``: or
    the node id of a node without one). Within ``torch.Generator.manual_seed``'s range.

    For partition ids below 10,007 it is linear, ``((seed·1000003 + round)·10007 + id) mod 2**63``,
    distinct per (round, client). Beyond, the linear form would repeat (round r, client p + 10,007
    is round r + 1, client p), so those ids (and node ids) get a hash of the triple instead.
    """
    seed, server_round, partition_id = int(seed), int(server_round), int(partition_id)
    if 0 <= partition_id < _LINEAR_SEED_CLIENTS:
        return ((seed * 1_000_003 + server_round) * _LINEAR_SEED_CLIENTS + partition_id) % (1 << 63)
    digest = xxhash.xxh3_64_intdigest(f"fl-sparse/{seed}/{server_round}/{partition_id}".encode())
    return digest >> 1


# ====================================================================== sync
def apply_sync(
    state: ClientState, instr: Instruction, content: RecordDict, numel: int, segments: tuple[int, ...] | None = None
) -> None:
    """Bring ``state.model`` to the server's ``model-version`` exactly, or raise SyncError.

    ``segments``: the layout's (:func:`fl_sparse.codec.segments_of`), for a sparse sync
    whose positions use the segmented code. ``state.model`` is replaced, never changed in
    place (the mod loads states shared with the store's cache).
    """
    mode = instr.sync_mode
    if mode == "none":
        if state.model is None or state.model_version != instr.model_version:
            raise SyncError(f"server assumes version {instr.model_version}, client holds {state.model_version}")
        return
    record = protocol.find_array_record(content, protocol.SYNC)
    if record is None:
        raise SyncError(f"sync-mode {mode!r} without a {protocol.SYNC!r} payload")
    if mode == "dense":
        state.model = codec.decode_dense(record, numel).clone()
    else:
        if state.model is None or state.model_version != instr.base_version:
            raise SyncError(f"{mode} sync needs version {instr.base_version}, client holds {state.model_version}")
        if mode == "delta":
            model = state.model.clone()
            codec.decode(record, numel, segments=segments).add_(model, alpha=-1.0)  # w <- w - ĝ, exactly
        elif mode == "set":
            sparse = codec.decode(record, numel, segments=segments)
            model = state.model.clone()
            model[sparse.indices] = sparse.values
        else:  # "values": SSGD-MV's last aggregate, on the last mask this client holds
            if _MASK not in state.extra or int(state.extra[_MASK_ROUND]) != instr.mask_round:
                have = int(state.extra[_MASK_ROUND]) if _MASK_ROUND in state.extra else -1
                raise SyncError(f"values sync on the mask of round {instr.mask_round}, client holds round {have}")
            mask = state.extra[_MASK]
            values = codec.decode_values(record, mask.numel())
            model = state.model.clone()
            SparseTensor(mask, values, numel).add_(model, alpha=-1.0)
        state.model = model
    state.model_version = instr.model_version


def _synced_elsewhere(
    store: ClientStateStore, state: ClientState, instr: Instruction, numel: int
) -> torch.Tensor | None:
    """The model this sync leads to, if another client in this process has already synced to it.

    In a simulation every client of a round syncs to the same version, and the
    model store keeps versions by hash (:meth:`ClientStateStore.shared_model`):
    the second client on a Ray actor need not decode and apply the same payload
    again (about 0.1 ms at MLP size). Only where the sync itself would succeed
    (dense, or from the base version this client holds); the hash check after it
    is unchanged. The tensor is shared: the mod only reads ``state.model`` after
    the sync.
    """
    if instr.sync_mode not in ("dense", "delta", "set"):
        return None
    if instr.sync_mode != "dense" and (state.model is None or state.model_version != instr.base_version):
        return None  # apply_sync raises the SyncError that says why
    return store.shared_model(instr.model_hash, numel)


def restore_unaccepted(state: ClientState, instr: Instruction) -> bool:
    """Put last round's update back into the error if the server did not aggregate it.

    True if that update was this very round's: the server is running the round again (it
    was resumed from a checkpoint taken before the round, after it had died in it), and
    the error is back to ``a = e + Δ`` of this client's first try at the round, whose step
    it must not take twice (the mod then compensates a zero step).
    """
    pending = state.extra.get(_PENDING_INDICES)
    if pending is None:
        return False
    pending_round = int(state.extra[_PENDING_ROUND].item())
    restored = instr.accepted_round != pending_round and state.error is not None
    if restored:
        state.error = state.error.index_add(0, pending, state.extra[_PENDING_VALUES])  # a new tensor: see _open
    for key in (_PENDING_INDICES, _PENDING_VALUES, _PENDING_ROUND):
        state.extra.pop(key, None)
    return restored and pending_round == instr.server_round


def _remember_sent(state: ClientState, sent: SparseTensor, server_round: int) -> None:
    indices, values = sent.indices, sent.values
    # Each torch call skipped saves ~15 us: on a message's path every library call runs cold.
    state.extra[_PENDING_INDICES] = indices if indices.device.type == "cpu" else indices.to("cpu")
    state.extra[_PENDING_VALUES] = (
        values if values.device.type == "cpu" and values.dtype == torch.float32 else values.to("cpu", torch.float32)
    )
    state.extra[_PENDING_ROUND] = _round_tensor(server_round)


@functools.lru_cache(maxsize=16)
def _round_tensor(server_round: int) -> torch.Tensor:
    """``torch.tensor(server_round)``, one per round for all of a process's clients (~35 us each on a
    client's cold message path). Shared: state tensors are replaced, never changed in place."""
    return torch.tensor(server_round)


def _memory(state: ClientState, numel: int, error_feedback: bool) -> ErrorFeedback:
    memory = ErrorFeedback(numel)
    if state.error is not None and error_feedback:
        # Handed over, not copied: state.error is this message's own (the store's load copies),
        # and the mod replaces it with the memory's new tensor after compression.
        memory.load_state_dict({"numel": numel, "error": state.error}, copy=False)
    return memory


# ====================================================================== the mod
# Up to this many entries, the mod's own torch work (sync, step, error feedback, compression,
# encoding) runs on one intra-op thread. torch splits any op above 32,768 entries over its
# pool and joins at a barrier: on a 50,890-entry MLP that saves microseconds at best, and
# when other processes fill the cores (Ray actors, the server) every barrier waits for a
# descheduled pool thread -- measured: torch.isfinite(x).all() at d = 50,890 took 0.13 ms
# on one thread and a 4.9 ms median on two busy cores. Larger models keep every thread
# once the layout is read (the state load before it runs on one); the user's train
# function always runs on the thread count the mod found.
_ONE_THREAD_MAX_NUMEL = 1 << 18
_STORES_KEPT = 8
_COMPRESSORS_KEPT = 16  # AdapTop-K's k changes per round, and with it the spec
_STATELESS_COMPRESSORS = (TopK, RandomK, RTopK, HardThreshold, Identity)
_DETERMINISTIC_COMPRESSORS = (TopK, HardThreshold, Identity)
_SHARED_ARRAYS_MAX_BYTES = 64 << 20


@dataclass
class _Session:
    """One train message's client state and where it is stored."""

    store: ClientStateStore
    key: str
    state: ClientState

    def layout(self, instr: Instruction) -> FlatLayout:
        if instr.layout:
            text = instr.layout
            self.state.extra[_LAYOUT] = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)
        elif _LAYOUT in self.state.extra:
            text = bytes(self.state.extra[_LAYOUT].numpy()).decode()
        else:
            raise SyncError("no model layout: this client needs a dense sync first")
        try:
            return FlatLayout.from_json(text)
        except ValueError as exc:
            raise protocol.ProtocolError(str(exc)) from None

    def join(self, generation: str) -> None:
        """A new run of the strategy (a new ``start``): forget the last run's error, votes and pending update."""
        stored = self.state.extra.get(_GENERATION)
        if stored is not None and stored.numpy().tobytes() == generation.encode():
            return
        if stored is not None or self.state.error is not None:
            self.state.error = None
            for key in [k for k in self.state.extra if k != _LAYOUT]:
                del self.state.extra[key]
        self.state.extra[_GENERATION] = torch.tensor(list(generation.encode()), dtype=torch.uint8)

    def save(self, model_hash: str | None = None) -> None:
        self.store.save(self.key, self.state, model_hash=model_hash)


class SparseMod:
    """Flower client mod: sparse, error-compensated uplink for any train function.

    Parameters
    ----------
    state_dir : str or Path, optional
        Folder for the clients' state files (model copy, error memory). Wins
        over the node config, ``$FL_SPARSE_STATE_DIR`` and the server's hint.
    durable : bool, optional
        fsync every state save (default: yes, except in a folder the server
        says is throw-away, i.e. the simulation's temporary one).
    share_models : bool, optional
        Keep model copies once per model version in the state folder's model
        store (hard links, see :mod:`fl_sparse.clients.state`) instead of one
        per client. Default: yes in the folder the server names (the
        simulation's, shared by all its clients), no in a node's own folder
        (one client per SuperNode: nothing to share).
    error_dtype : str, optional
        Store the error memory as "float32", "float16" or "bfloat16"
        (default: what the server's instruction says, float32 unless set).

    The mod reads everything else (compressor, wire codes, error feedback,
    SSGD-MV phase) from the server's instruction in each message.
    """

    def __init__(
        self,
        *,
        state_dir: str | os.PathLike | None = None,
        durable: bool | None = None,
        share_models: bool | None = None,
        error_dtype: str | None = None,
    ) -> None:
        for name, value in (("durable", durable), ("share_models", share_models)):
            if value is not None and not isinstance(value, bool):  # "false" would switch it on
                raise ValueError(f"SparseMod: {name} must be True, False or None, got {value!r}")
        if state_dir is not None and not isinstance(state_dir, (str, os.PathLike)):
            raise ValueError(f"SparseMod: state_dir must be a folder's path (str or os.PathLike), got {state_dir!r}")
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.durable = durable
        self.share_models = share_models
        self.error_dtype = None if error_dtype is None else error_dtype_name(error_dtype)
        # The stores this mod has opened, by (folder, durable, share_models, error_dtype): one per
        # strategy run in practice. Kept, not rebuilt per message (pathlib and the store's own
        # setup were ~30 us a message); a few runs' worth, the oldest dropped first.
        self._stores: dict[tuple, ClientStateStore] = {}
        self._compressors: dict[str, object] = {}  # by uplink spec (JSON text): see _compressor
        self._model_arrays: dict[tuple, dict] = {}  # the latest model version's Arrays: see _flat_arrays
        self._warned_no_instruction = False  # a train message from a strategy not of fl-sparse: said once

    def __repr__(self) -> str:
        return f"SparseMod(state_dir={self.state_dir!r})"

    # -------------------------------------------------------------- plumbing
    def _open(self, context: Context, instr: Instruction) -> _Session:
        own = self.state_dir or context.node_config.get("state-dir") or os.environ.get(STATE_DIR_VARIABLE)
        root = own or instr.state_dir or default_state_dir()
        durable = self.durable if self.durable is not None else (bool(own) or not instr.state_dir or instr.state_fsync)
        share = self.share_models if self.share_models is not None else (not own and bool(instr.state_dir))
        store = self._store(str(root), state_folder_name(instr, context), durable, share,
                            self.error_dtype or instr.error_memory_dtype)
        key = client_key(context)
        # shared=True: the cached tensors themselves, not copies (two 200 kB copies a message at
        # MLP size). The mod replaces a state's tensors and never changes one in place
        # (apply_sync, restore_unaccepted; the error memory takes its tensor and returns a new one).
        session = _Session(store, key, store.load(key, shared=True))
        reset, lost = session.state.reset_reason, session.state.model_lost
        if (reset is not None or lost is not None) and (
            instr.phase == protocol.PHASE_VALUES or instr.sync_mode != "dense"
        ):
            # The server, dropping this reply, forgets our version and sends the dense model.
            if reset is not None:  # the file was moved aside: the next load finds none
                raise SyncError(
                    f"client state was corrupt and has been reset; the server must send a dense sync ({reset})"
                )
            # Only the model copy is gone: nothing is saved now, so the error memory, the
            # pending update and SSGD-MV's a wait in the state file for the dense sync.
            raise SyncError(
                f"client's model copy was lost (its error memory is kept); the server must send a dense sync ({lost})"
            )
        session.join(instr.generation)
        return session

    def _store(self, root: str, folder: str, durable: bool, share: bool, error_dtype: str) -> ClientStateStore:
        key = (root, folder, durable, share, error_dtype)
        store = self._stores.get(key)
        if store is None:
            if len(self._stores) >= _STORES_KEPT:
                del self._stores[next(iter(self._stores))]
            store = self._stores[key] = ClientStateStore(
                Path(root) / folder, durable=durable, share_models=share, error_dtype=error_dtype
            )
        else:
            store.sweep_if_due()
        return store

    def _flat_arrays(self, session: _Session, layout: FlatLayout, model_hash: str) -> dict:
        """The model (hash ``model_hash``, checked) as the train function's float Arrays.

        In a folder shared by many clients (a simulation's), every client of a round in
        this process trains from the same version: its Arrays' bytes are made once and
        shared (bytes are immutable; each record gets Array objects of its own), which
        saves a 200 kB copy per message at MLP size. Only the latest version is kept, and
        only up to :data:`_SHARED_ARRAYS_MAX_BYTES` (a large model's copy is not worth
        keeping between messages: its training costs far more).
        """
        if not session.store.share_models or 4 * layout.numel > _SHARED_ARRAYS_MAX_BYTES:
            return layout.flat_arrays(session.state.model)
        key = (model_hash, layout.names, layout.shapes, layout.dtypes)
        arrays = self._model_arrays.get(key)
        if arrays is None:
            arrays = layout.flat_arrays(session.state.model)
            self._model_arrays = {key: arrays}
        return arrays

    def _compressor(self, instr: Instruction):
        """The round's uplink compressor: the package's own are kept per spec (~15 us a build).

        They hold no state between calls (random ones draw from the generator the mod
        passes), so one instance serves every message. A user's registered class is built
        per message, as it always was: it may keep state.
        """
        compressor = self._compressors.get(instr.uplink)
        if compressor is None:
            compressor = build_compressor(**instr.uplink_spec())
            if type(compressor) in _STATELESS_COMPRESSORS:
                if len(self._compressors) >= _COMPRESSORS_KEPT:
                    self._compressors.clear()
                self._compressors[instr.uplink] = compressor
        return compressor

    def _report(self, context: Context, instr: Instruction, state: ClientState | None, **extra) -> ConfigRecord:
        return Report(
            server_round=instr.server_round,
            nonce=instr.nonce,
            model_version=state.model_version if state is not None else -1,
            model_hash=extra.pop("model_hash", ""),
            client_key=client_key(context),
            partition_id=_partition_id(context),
            **extra,
        ).to_record()

    # ------------------------------------------------------------------ call
    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
            return call_next(msg, context)
        instr = Instruction.read(msg.content)
        if instr is None:  # not from an fl-sparse strategy
            if not self._warned_no_instruction:
                self._warned_no_instruction = True
                log(WARNING, "SparseMod: a train message with no fl-sparse instruction (the ServerApp's strategy "
                    "is not one of fl_sparse.strategies, e.g. a plain FedAvg): passed to the train function "
                    "as it came, and its reply, the trained model, goes back dense (said once)")
            return call_next(msg, context)
        if instr.phase == protocol.PHASE_IDENTIFY:
            return Message(content=record_dict({protocol.RECORD: self._report(context, instr, None)}), reply_to=msg)
        user_threads = torch.get_num_threads()
        # The mod's own torch work on one thread for a small model (see _ONE_THREAD_MAX_NUMEL),
        # the user's train function on the user's thread count.
        with _torch_threads(1):
            session = self._open(context, instr)
            if instr.phase == protocol.PHASE_VALUES:
                content = self._values_phase(session, instr, msg.content)
                content[protocol.RECORD] = self._report(context, instr, session.state)
                session.save()
                return Message(content=record_dict(content), reply_to=msg)

            state = session.state
            layout = session.layout(instr)
            numel = layout.numel
            with _torch_threads(1 if numel <= _ONE_THREAD_MAX_NUMEL else user_threads):
                segments = codec.segments_of(layout)
                known = _synced_elsewhere(session.store, state, instr, numel)
                if known is not None:
                    state.model, state.model_version = known, instr.model_version
                else:
                    apply_sync(state, instr, msg.content, numel, segments)
                model_hash = vector_hash(state.model)  # once per message
                if model_hash != instr.model_hash:
                    raise SyncError(
                        "model after sync does not match the server's hash "
                        "(or the server and this client run fl-sparse versions that hash models differently)"
                    )
                retry = restore_unaccepted(state, instr)
                if _A in state.extra:  # a vote whose values phase never came: nothing of a was sent
                    retry = retry or int(state.extra[_A_ROUND]) == instr.server_round
                    state.error = state.extra.pop(_A)
                    state.extra.pop(_A_ROUND, None)

                # Built before the user's training, which a bad uplink spec would waste (kept per spec).
                compressor = self._compressor(instr) if instr.phase == protocol.PHASE_TRAIN else None

                # The user's train function sees their own records and the dense model, nothing else.
                user_in = protocol.user_records(msg.content)
                exact = protocol.array_record(msg.content, protocol.EXACT) if layout.exact_names else None
                if exact is not None:
                    layout = layout.with_exact(exact)
                user_in[instr.arrays_key] = layout.record(self._flat_arrays(session, layout, model_hash))
                with _torch_threads(user_threads):
                    user_reply = call_next(Message(content=user_in, metadata=msg.metadata), context)
                if not isinstance(user_reply, Message):
                    raise TypeError(f"the train function must return a Message, got {type(user_reply).__name__}")
                if user_reply.has_error():
                    return user_reply  # nothing saved: the state is as before this message

                trained_key, trained = _trained_arrays(user_reply.content, instr.arrays_key)
                if len(trained) > len(layout.names) + len(layout.exact_names):
                    _warn_extra_arrays(trained, layout)
                try:
                    step = layout.step(state.model, trained)  # w - w'
                    exact_after = layout.exact_record(trained, cast_floats=True)
                except ValueError as exc:
                    raise ValueError(f"the train function's arrays do not match the global model: {exc}") from None
                if not all_finite(step):  # the same test as torch.isfinite(step).all(), in numpy: 15x cheaper
                    # w is the server's model, finite: the first non-finite entry of w - w' is the user's
                    first = int(torch.nonzero(~torch.isfinite(step))[0])
                    raise ValueError(
                        f"the train function returned non-finite values in array {layout.name_at(first)!r}"
                    )
                for name in layout.exact_names:  # sent whole: the server would drop the reply for them
                    nd = array_to_numpy(exact_after[name])
                    if nd.dtype.kind == "f" and not np.isfinite(nd).all():
                        raise ValueError(f"the train function returned non-finite values in array {name!r}")

                # The reply's records, as a plain dict until the Message is built (records.record_dict).
                # Without the trained model: it goes up compressed, never whole (whatever key it came under).
                content = {key: record for key, record in user_reply.content.items() if key != trained_key}
                if retry and instr.error_feedback:
                    # This round's step is in the error already (a = e + Δ of the first try):
                    # Δ again would count the round twice. With a zero step the client sends
                    # exactly what it sent the first time (its compressor is deterministic, or
                    # seeded per round), and a resumed run continues as the uninterrupted one.
                    step.zero_()
                memory = _memory(state, numel, instr.error_feedback)
                if instr.phase == protocol.PHASE_VOTE:
                    extra = self._vote_phase(state, memory, step, instr, content, segments)
                else:
                    self._train_phase(state, memory, step, instr, content, _random_stream(context), segments, compressor)
                    extra = {}
                if layout.exact_names:
                    content[protocol.EXACT] = exact_after
                content[protocol.RECORD] = self._report(context, instr, state, model_hash=model_hash, **extra)
                state.steps_done += 1  # rounds this client has trained
                session.save(model_hash)  # state.model is the tensor hashed above: not hashed again
        return Message(content=record_dict(content), reply_to=msg)

    # ------------------------------------------------------------ phases
    def _train_phase(
        self, state, memory, step, instr: Instruction, content: dict, stream: int, segments: tuple[int, ...],
        compressor,
    ) -> None:
        """[ZDL] Algorithm 1/2, worker side: error-compensated compression of Δ with the round's ``compressor``."""
        # Random compressors (rTop-k, random-k, a user's) draw from (seed, round, client): reproducible.
        # The package's deterministic ones ignore the generator: none is made for them.
        generator = (
            None if type(compressor) in _DETERMINISTIC_COMPRESSORS
            else torch.Generator().manual_seed(client_generator_seed(instr.seed, instr.server_round, stream))
        )
        values, positions = instr.uplink_values, instr.uplink_positions
        # in_place: step is this message's own buffer (FlatLayout.step), so a and then the new e
        # are computed in it, no dense copies; diagnostics send step and a, so they keep them.
        result = algorithms.client_compress(
            step, memory, lambda a: compressor(a, generator=generator),
            quantize=lambda s: codec.lossy_roundtrip(s, values=values), in_place=not instr.diagnostics,
        )
        record = codec.encode(result.compressed, values=values, positions=positions, segments=segments)
        state.error = memory.error.detach()
        _remember_sent(state, result.sent, instr.server_round)
        content[protocol.UPDATE] = record
        content[protocol.METRICS] = UplinkMetrics(
            uplink_bytes=codec.record_bytes(record),  # = wire_size(record).total_bytes, without re-parsing it
            density=result.sent.density,
            error_norm=result.error_norm,  # computed once, in client_compress
            compression_error=result.compression_error,
        ).to_record()
        if instr.diagnostics:
            content[protocol.DIAGNOSTICS] = ArrayRecord({"a": result.compensated, "step": step})

    def _vote_phase(
        self, state, memory, step, instr: Instruction, content: dict, segments: tuple[int, ...]
    ) -> dict:
        """[OOG] Alg. 1 l. 9-10 / Alg. 2 l. 11-15: vote with supp Top_K(a), or its changes; keep a."""
        numel = step.numel()
        a = memory.compensate(step)
        k = instr.vote_k
        top = magnitude_topk_indices(a, k)
        positions = instr.vote_positions
        report = {"vote_kind": "full"}
        if instr.add_drop_k > 0:
            base = _stored_vote(state, instr.vote_round)
            if base is not None and base.numel() == k:
                vote, adds, drops = algorithms.add_drop(a, base, top, instr.add_drop_k)
                wire = dict(positions=positions, segments=segments)
                content[protocol.VOTE_ADD] = codec.encode_positions(adds, numel, **wire)
                content[protocol.VOTE_DROP] = codec.encode_positions(drops, numel, **wire)
                report = {"vote_kind": "add-drop", "vote_base_round": instr.vote_round}
                state.extra[_VOTE], state.extra[_VOTE_ROUND] = base, _round_tensor(instr.vote_round)
            else:
                vote = top
                content[protocol.VOTE] = codec.encode_positions(top, numel, positions=positions, segments=segments)
                state.extra.pop(_VOTE, None)
                state.extra.pop(_VOTE_ROUND, None)
            state.extra[_SENT_VOTE], state.extra[_SENT_VOTE_ROUND] = vote, _round_tensor(instr.server_round)
        else:
            content[protocol.VOTE] = codec.encode_positions(top, numel, positions=positions, segments=segments)
        state.extra[_A] = a.detach().to(torch.float32)
        state.extra[_A_ROUND] = _round_tensor(instr.server_round)
        return report

    def _values_phase(self, session: _Session, instr: Instruction, content_in: RecordDict) -> dict:
        """[OOG] Alg. 1: send a on the common mask M_t; e ← a − Q(a[M_t])."""
        state = session.state
        if _A not in state.extra or int(state.extra[_A_ROUND]) != instr.server_round:
            raise SyncError(f"no vote-phase state for round {instr.server_round}")
        a = state.extra.pop(_A)
        state.extra.pop(_A_ROUND)
        numel = a.numel()
        segments = codec.segments_of(session.layout(instr))  # stored since the vote phase's dense sync
        mask_record = protocol.array_record(content_in, protocol.MASK)
        mask = codec.decode_positions(mask_record, numel, max_nnz=instr.vote_k, segments=segments)
        values = a[mask]
        record = codec.encode_values(values, values=instr.uplink_values)
        sent = codec.lossy_roundtrip(SparseTensor(mask, values, numel), values=instr.uplink_values)
        memory = ErrorFeedback(numel)
        memory.update(a, sent)
        state.error = memory.error
        _remember_sent(state, sent, instr.server_round)
        state.extra[_MASK], state.extra[_MASK_ROUND] = mask, _round_tensor(instr.server_round)
        norm = memory.norm()
        return {
            protocol.UPDATE: record,
            protocol.METRICS: UplinkMetrics(
                uplink_bytes=codec.wire_size(record).total_bytes,
                density=mask.numel() / numel if numel else 0.0,
                error_norm=norm,
                compression_error=norm**2,
            ).to_record(),
        }


def _stored_vote(state: ClientState, vote_round: int) -> torch.Tensor | None:
    """The vote of that round if this client still has it (the last one sent or the one before)."""
    if vote_round < 0:
        return None
    for key, round_key in ((_SENT_VOTE, _SENT_VOTE_ROUND), (_VOTE, _VOTE_ROUND)):
        if key in state.extra and int(state.extra[round_key]) == vote_round:
            return state.extra[key]
    return None


_EXTRA_ARRAYS_WARNED: set[tuple[str, ...]] = set()


def _warn_extra_arrays(trained: ArrayRecord, layout: FlatLayout) -> None:
    """Arrays the global model does not have are not sent (FedAvg would average them): said once per set."""
    known = set(layout.names) | set(layout.exact_names)
    extra = tuple(sorted(k for k in trained.keys() if k not in known))
    if extra and extra not in _EXTRA_ARRAYS_WARNED:
        _EXTRA_ARRAYS_WARNED.add(extra)
        log(WARNING, "the train function returned arrays the global model does not have: %s. They are not sent "
            "(the server's model fixes which arrays there are: add them to the initial arrays to train them)",
            ", ".join(map(repr, extra[:10])) + (" ..." if len(extra) > 10 else ""))


def _trained_arrays(content: RecordDict, key: str) -> tuple[str, ArrayRecord]:
    """(its key, the ArrayRecord the train function returned): under ``key``, or its only ArrayRecord."""
    record = protocol.find_array_record(content, key)
    if record is not None:
        return key, record
    records = content.array_records
    if len(records) == 1:
        return next(iter(records.items()))
    raise ValueError(
        f"the train function must return the trained model as an ArrayRecord under {key!r} "
        f"(found {sorted(records) or 'none'})"
    )

