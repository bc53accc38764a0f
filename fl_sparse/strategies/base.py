"""The base strategy: FedAvg whose uplink and downlink carry compressed sparse updates.

One round of :class:`SparseFedAvg` (sign convention of the seed papers: a
client's update is the *descent step* ``a = w_before - w_after``, so the
model moves by ``w <- w - update``)::

    server, configure_train(t):
        sample clients S_t
        for q in S_t: send sync_q (brings q's model copy to w_{t-1}, exactly)
                      + the uplink compressor spec C_up,t + the user's train config
    client q (SparseMod around the user's train function):
        w <- apply(sync_q);  assert hash(w) == hash(w_{t-1})
        Δ_q = w - train(w)                 the user's H local steps
        a_q = e_q + Δ_q                    error compensation
        s_q = C_up,t(a_q)                  top-K / rTop-k / threshold / ...
        e_q <- a_q - decode(encode(s_q))   error keeps what was not sent
        reply encode(s_q), the user's metrics
    server, aggregate_train(t):                                  hooks, in order
        read and validate the replies                            read_replies
        g_t = Σ_q p_q s_q,   p_q = n_q / Σ n                     aggregate_updates
        ĝ_t = C_down(g_t + δ_{t-1});  δ_t = g_t + δ_{t-1} - ĝ_t  compress_downlink
        w_t = w_{t-1} - ĝ_t                                      apply_update
        metrics of the round                                     round_metrics

Without a downlink compressor ``ĝ_t = g_t`` (the sparse union of the uplink
updates): that is the paper's *unidirectional* top-K SGD (Algorithm 1); with
``C_down = TopK`` it is *bidirectional* top-K SGD (Algorithm 2). The math is
in :mod:`fl_sparse.algorithms`; the messages in :mod:`fl_sparse.protocol`.

**Keeping clients in sync.** Every client keeps its own copy of the model
and the server sends the dense model only where nothing cheaper brings a
client up to date (first contact, a lost or failed client, a long absence).
The server remembers which model version each client holds and sends

* nothing, if the client already holds ``w_{t-1}``;
* ``ĝ_{t-1}`` itself (``sync-mode = "delta"``), if it holds ``w_{t-2}``;
* the current values of ``w_{t-1}`` on the union of positions changed since
  the client's version (``"set"``), if that is smaller than the dense model:
  overwriting values rather than summing deltas keeps the client's copy
  bit-for-bit equal to the server's;
* the dense model (``"dense"``) otherwise, and to any client it knows
  nothing about (first contact, a failed reply, a lost state).

The client checks the version it holds against the one the sync assumes
and refuses (error reply) instead of training on a wrong model; it reports
the hash of the model it trained from, which the server checks.

**Nothing lost on failure.** A reply that fails to decode, has NaN, the
wrong size, or is missing never touches the global model: it is dropped and
logged, and the client is told next round that its update was not
accepted, so it puts the update back into its error memory.

**FedAvg's contract, and what differs by design.** Every option of
:class:`flwr.serverapp.strategy.FedAvg` is honoured, with FedAvg's defaults
and positional order: sampling (``fraction_train`` — 0 skips training —,
``min_train_nodes``, ``min_available_nodes``: sampling waits for them),
``weighted_by_key`` (the weight of each client's update and of its
metrics), ``arrayrecord_key`` (where the client's train function finds the
model and puts the trained one), ``configrecord_key`` (the user's
``train_config``, passed through untouched; its ``"local-steps"``, when a
whole number, only scales the ``q_*`` bits-per-step metrics, and
:class:`~fl_sparse.strategies.HardThresholdSGD` reads its ``"lr"``), ``train_metrics_aggr_fn`` and
federated evaluation. By design: a train message carries the sync payload
instead of the dense model, a reply carries the encoded update instead of
the trained model (the client needs :class:`~fl_sparse.clients.SparseMod`),
and a bad reply is dropped and logged instead of raising. ``start`` asks
every connected node once for its stable key (a small ``identify`` train
message the mod answers) so that sampling with a fixed ``seed`` is
reproducible; ``configure_train`` itself does no network I/O (but in a
continued run, or once a known client's node is gone, to identify a node that
connected after ``start`` before its message is built, and in the first round
when no node was connected at ``start``, as in Flower's simulation, whose
SuperNodes register after the ServerApp starts; see :meth:`sample`). A round with
no valid reply returns ``(None, None)``, as FedAvg does. The train
MetricRecord of each round (``Result.train_metrics_clientapp``) holds the
aggregated client metrics plus ``uplink_bytes``, ``downlink_bytes`` and the
other numbers of :attr:`ServerState.round_metrics`.

**Checkpoints.** :meth:`SparseFedAvg.state_dict` returns everything the
strategy needs to continue a run (plain values and tensors, for ``torch.save``;
subclasses add their own state and extend ``_load_state``) and
:meth:`SparseFedAvg.load_state_dict` restores it, all or nothing, refusing the
state of another strategy, other settings or another version.
``start(..., first_round=k+1)`` then continues with the same generation
(clients keep their error memory); per-client state follows each client's
partition id to its node id in the new run. See :mod:`fl_sparse.checkpoint`
and :func:`fl_sparse.server_app.resume_config`.

Subclass and override the hooks :meth:`uplink_spec`,
:meth:`aggregate_updates` and :meth:`compress_downlink` to build new
methods; the named strategies in this package are small subclasses. Example,
a strategy that sends top-K with a ratio that halves every 10 rounds::

    from fl_sparse.strategies import SparseFedAvg

    class DecayingTopK(SparseFedAvg):
        def uplink_spec(self, server_round, num_clients):
            return {"name": "topk", "ratio": 0.01 * 0.5 ** ((server_round - 1) // 10)}
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import math
import random
import secrets
import statistics
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
import xxhash
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fl_sparse import algorithms, codec, protocol
from fl_sparse.compressors import build_compressor
from fl_sparse.flat import FlatLayout, vector_hash
from fl_sparse.memory import ErrorFeedback
from fl_sparse.protocol import Instruction, Report, UplinkMetrics
from fl_sparse.sparse import SparseTensor
from fl_sparse.strategies.arguments import count_argument, flag_argument, is_number, names_argument

__all__ = ["SparseFedAvg", "ServerState", "ClientUpdate", "with_fedavg_signature"]

_UNKNOWN_KEY = 1 << 62  # orders nodes without a known partition id after those with one
# BatchNorm's running statistics (PyTorch's state_dict names): sent exactly by default (exact_running_stats).
RUNNING_STATS = ("*running_mean", "*running_var")
MAX_WEIGHT = float(2**53)  # the largest weight a reply may claim: exact in float64, sums cannot overflow


# Kinds of downlink sync, counted per round as ``downlink_<kind>_bytes`` (see messages_with_sync).
DOWNLINK_KINDS = ("last_update", "catch_up", "first_contact")
# The sync modes that send a known client the last update (or nothing); any other is a catch-up.
_LAST_UPDATE_MODES = ("none", "delta", "values")


# Error replies the SuperLink writes itself (the node is gone, a message or its reply expired): the
# node's ClientApp never answered, so these say nothing about the app (see identify).
_SUPERLINK_ERRORS = frozenset({ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE,
                               ErrorCode.REPLY_MESSAGE_UNAVAILABLE})


@dataclass
class ServerState:
    """What the server remembers between rounds (cf. powerSGD_hook's PowerSGDState).

    ``model`` is w_t, ``version`` the round that produced it (0 = initial),
    ``server_error`` is δ_t, ``generation`` a random name of this run of
    the strategy (a new ``start`` is a new generation: clients drop what they
    remember of the last one), ``exact`` the current values of the arrays sent
    exactly, ``last_update_record`` the last applied update as sent and
    ``update_base`` the version it was applied to (versions are the rounds
    that made them: after a round without an update it is not ``version - 1``),
    ``history`` holds the positions changed by each applied update
    (to build catch-up payloads), ``client_versions`` the version each client
    holds and ``accepted`` the last round whose update from that client was
    aggregated. ``round_metrics[t]`` holds the numbers of round t; ``round``
    is the last round aggregated (the round a checkpoint was taken after).
    """

    layout: FlatLayout | None = None
    model: torch.Tensor | None = None
    version: int = 0
    round: int = 0
    generation: str = ""
    server_error: ErrorFeedback = field(default_factory=ErrorFeedback)
    exact: ArrayRecord | None = None
    last_update_record: ArrayRecord | None = None
    update_base: int = -1
    history: "OrderedDict[int, torch.Tensor]" = field(default_factory=OrderedDict)
    client_versions: dict[int, int] = field(default_factory=dict)
    accepted: dict[int, int] = field(default_factory=dict)
    cumulative_total_error: float = 0.0
    round_metrics: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass
class ClientUpdate:
    """One accepted reply: the decoded update and everything that came with it."""

    node: int
    update: SparseTensor
    weight: float
    user_content: RecordDict  # the user's own records (metrics), protocol records removed
    uplink: UplinkMetrics
    position_bits: int
    value_bits: int
    total_bytes: int
    exact: ArrayRecord | None = None
    diagnostics: ArrayRecord | None = None


class SparseFedAvg(FedAvg):
    """FedAvg with compressed uplink, optional compressed downlink, error feedback.

    Parameters
    ----------
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes,
    min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key,
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn :
        As in :class:`flwr.serverapp.strategy.FedAvg`, same defaults and order.
    uplink : dict
        Uplink compressor spec, built on every client with
        :func:`fl_sparse.compressors.build_compressor`, e.g.
        ``{"name": "topk", "ratio": 0.001}``.
    downlink : callable, optional
        Downlink compressor (any compressor of :mod:`fl_sparse.compressors`),
        applied to the aggregate plus the server error. ``None`` sends the
        aggregate as it is (still sparse: a union of uplink supports).
    uplink_values, uplink_positions, downlink_values, downlink_positions : str
        Wire codes (:mod:`fl_sparse.codec`): values "fp32" | "fp16" | "q<bits>",
        positions "raw" | "block" | "rice".
    server_error_feedback : bool
        Keep the server error δ (Algorithm 2). Only used with a downlink
        compressor.
    client_error_feedback : bool
        Clients keep their error memory e between rounds (default). ``False``
        drops what was not sent (e.g. AdapTop-K without error compensation).
    exact_arrays : iterable of str
        Names (fnmatch patterns) of float arrays to send exactly, never
        compressed (integer arrays always are).
    exact_running_stats : bool
        Send BatchNorm's running statistics (arrays named ``*running_mean``
        and ``*running_var``) exactly too (default). Local training replaces
        them rather than adding to them, so a client's update of a statistic
        is the same difference round after round until it is sent; error
        feedback would pile those copies up and, once sent, overshoot (a
        running variance can turn negative: NaN in eval mode). They are a few
        numbers per channel. ``False`` compresses them with the weights.
    seed : int
        Seeds client sampling and random compressors (a fixed seed gives the same run).
    diagnostics : bool
        Ask clients for their dense ``a_q`` and step ``Δ_q`` (not counted as
        traffic) to estimate ρ and ρ̂ of the bidirectional paper each round.
    client_state_dir, client_state_fsync :
        A hint for where clients without a state folder of their own keep
        their state, and whether they need to fsync it (the simulation's
        temporary folder: no). A node's own setting wins.
    error_memory_dtype : str
        The dtype clients store their error memory in between rounds:
        "float32" (default), "float16" or "bfloat16" (half the bytes; computed
        in float32, rounded when stored; float16 clamps beyond ±65504).
    max_weight_ratio : float, optional
        Bounded influence: a client's weight (its ``weighted_by_key`` metric)
        counts at most this many times the round's median weight. Without it a
        client that claims a huge ``num-examples`` takes the whole average
        (weights are always finite, > 0 and at most 2**53).
    update_norm_bound, update_norm_bound_ratio : float, optional
        Bounded influence: each decoded update is scaled down to at most this
        L2 norm (absolute), or this many times the round's median update norm.
        The client does not learn of the clipping, so what was cut off is not in
        its error memory: it is lost, as with DP clipping. Honest clients
        rarely reach a bound set well above the typical norm.

    Threat model: a reply is untrusted input. Whatever a client sends, the
    server does not raise and the model stays finite: every field is checked
    by type and range, a reply must echo the nonce of the message it answers
    (this round, this node; replays are dropped), a round whose aggregate
    would not be finite is rejected whole. Within those rules a malicious
    client can still send any finite update and claim any weight; the two
    bounds above limit what that can do to the average.
    """

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        *,
        uplink: dict[str, Any] | None = None,
        downlink=None,
        uplink_values: str = "fp32",
        uplink_positions: str = "raw",
        downlink_values: str = "fp32",
        downlink_positions: str = "raw",
        server_error_feedback: bool = True,
        client_error_feedback: bool = True,
        exact_arrays: Iterable[str] = (),
        exact_running_stats: bool = True,
        seed: int = 0,
        diagnostics: bool = False,
        client_state_dir: str | None = None,
        client_state_fsync: bool = True,
        error_memory_dtype: str = "float32",
        max_weight_ratio: float | None = None,
        update_norm_bound: float | None = None,
        update_norm_bound_ratio: float | None = None,
    ) -> None:
        if not 0.0 <= fraction_train <= 1.0:
            raise ValueError(f"fraction_train must be in [0, 1], got {fraction_train}")
        if not 0.0 <= fraction_evaluate <= 1.0:
            raise ValueError(f"fraction_evaluate must be in [0, 1], got {fraction_evaluate}")
        for name, value in (
            ("min_train_nodes", min_train_nodes),
            ("min_evaluate_nodes", min_evaluate_nodes),
            ("min_available_nodes", min_available_nodes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        for name, value in (("weighted_by_key", weighted_by_key), ("arrayrecord_key", arrayrecord_key),
                            ("configrecord_key", configrecord_key)):
            if not isinstance(value, str) or not value or protocol.is_protocol_key(value):
                raise ValueError(f"{name} must be a non-empty str not starting with {protocol.PREFIX!r}, got {value!r}")
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.uplink = dict(uplink or {"name": "none"})
        # Fail at construction, not on the clients, if the spec is wrong.
        build_compressor(**_with_defaults(self.uplink))
        self.downlink = downlink
        for code in (uplink_values, downlink_values):
            if code not in codec.VALUE_CODES:
                raise ValueError(f"unknown value code {code!r}; expected one of {codec.VALUE_CODES}")
        for code in (uplink_positions, downlink_positions):
            if code not in codec.POSITION_CODES:
                raise ValueError(f"unknown position code {code!r}; expected one of {codec.POSITION_CODES}")
        self.uplink_values = uplink_values
        self.uplink_positions = uplink_positions
        self.downlink_values = downlink_values
        self.downlink_positions = downlink_positions
        self.server_error_feedback = flag_argument("server_error_feedback", server_error_feedback)
        self.client_error_feedback = flag_argument("client_error_feedback", client_error_feedback)
        self.exact_arrays = names_argument("exact_arrays", exact_arrays)
        self.exact_running_stats = flag_argument("exact_running_stats", exact_running_stats)
        self.seed = count_argument("seed", seed, minimum=0)
        self.diagnostics = flag_argument("diagnostics", diagnostics)
        self.client_state_dir = client_state_dir or ""
        self.client_state_fsync = flag_argument("client_state_fsync", client_state_fsync)
        if error_memory_dtype not in protocol.ERROR_MEMORY_DTYPES:
            raise ValueError(f"error_memory_dtype must be one of {protocol.ERROR_MEMORY_DTYPES}, got {error_memory_dtype!r}")
        self.error_memory_dtype = error_memory_dtype
        for name, value in (("max_weight_ratio", max_weight_ratio), ("update_norm_bound", update_norm_bound),
                            ("update_norm_bound_ratio", update_norm_bound_ratio)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0 or None, got {value!r}")
        self.max_weight_ratio = max_weight_ratio
        self.update_norm_bound = update_norm_bound
        self.update_norm_bound_ratio = update_norm_bound_ratio
        self._nonces: dict[int, str] = {}  # node -> nonce of the message it was sent this round
        self._sent: list[Metadata] = []  # the metadata of this round's messages (see reply_node)
        self.last_downlink_split: dict[str, int] = dict.fromkeys(DOWNLINK_KINDS, 0)
        self.first_error: str | None = None  # why the first dropped reply was dropped (for a run's summary)
        self.state = ServerState()
        self.node_keys: dict[int, tuple[int, int]] = {}
        self._pending_keys: dict[int, int] = {}  # partition id -> node id of an absent client (_await_gone_clients)
        self._keyless: set[int] = set()  # nodes that answered without a partition id: not asked again
        # start() found no node connected (Flower's simulation starts the ServerApp before its
        # SuperNodes register): the first sample() identifies them once they are (identify).
        self._identify_when_connected = False
        self._round_compressor = None
        self._sync_cache: dict[int | None, tuple[str, ArrayRecord | None]] = {}
        self._returned: ArrayRecord | None = None  # the arrays aggregate_train last returned
        self._local_steps = 1
        self._round_started = 0.0
        self._timeout = 3600.0

    # ----------------------------------------------------------------- hooks
    def uplink_spec(self, server_round: int, num_clients: int) -> dict[str, Any]:
        """The uplink compressor spec for this round (override to vary it)."""
        return dict(self.uplink)

    def aggregate_updates(
        self, server_round: int, updates: list[SparseTensor], weights: list[float]
    ) -> SparseTensor:
        """g_t = Σ_q p_q s_q (override for other aggregation rules)."""
        return algorithms.weighted_sum(updates, weights)

    def compress_downlink(self, server_round: int, aggregate: SparseTensor) -> SparseTensor:
        """ĝ_t from g_t; keeps δ_t when a downlink compressor is set."""
        memory = self.state.server_error if self.server_error_feedback else None
        return algorithms.server_compress(
            aggregate, memory, self.downlink, quantize=lambda s: codec.lossy_roundtrip(s, values=self.downlink_values)
        )

    # --------------------------------------------------------------- summary
    def summary(self) -> None:
        super().summary()
        log(INFO, "\t├──> Uplink: %s (each round's: uplink_spec)  values=%s positions=%s", self.uplink,
            self.uplink_values, self.uplink_positions)
        log(
            INFO,
            "\t└──> Downlink: %s  values=%s positions=%s  server error feedback=%s",
            type(self.downlink).__name__ if self.downlink is not None else "aggregate as is",
            self.downlink_values,
            self.downlink_positions,
            self.server_error_feedback,
        )

    # ------------------------------------------------------------------ start
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn=None,
        *,
        first_round: int = 1,
    ):
        """Flower's round loop over rounds ``first_round`` .. ``num_rounds``.

        ``first_round=1`` (a new run): takes ``initial_arrays`` as w_0 (a new
        generation) and identifies the nodes. ``first_round=k+1`` continues a
        run from the state of round ``k`` (:meth:`load_state_dict` first;
        ``initial_arrays`` must be that state's model, :meth:`current_arrays`):
        same generation, so the clients keep their error memory; nodes are
        identified again and the per-client state follows each client's
        stable key (partition id) to its node id in this run. ``num_rounds``
        is the last round, so the loop runs ``num_rounds - first_round + 1``
        rounds.

        Flower's :meth:`Strategy.start` counts rounds from 1; it runs here
        unchanged on a view of this strategy (:class:`_RoundOffset`) that
        adds ``first_round - 1`` to every round it passes to
        ``configure_train``, ``aggregate_train``, ``configure_evaluate``,
        ``aggregate_evaluate`` and ``evaluate_fn`` (which Flower calls with
        round ``first_round - 1`` for the starting model, as with 0 for w_0).
        The returned :class:`Result` is keyed by those rounds too.
        """
        if isinstance(first_round, bool) or not isinstance(first_round, int) or first_round < 1:
            raise ValueError(f"first_round must be an int >= 1, got {first_round!r}")
        if num_rounds < first_round - 1:
            raise ValueError(f"num_rounds ({num_rounds}) is the last round; it is before first_round - 1 ({first_round - 1})")
        self._timeout = float(timeout)
        if first_round == 1:
            self.initialize(initial_arrays)
            self.identify(grid)
        else:
            st = self.state
            if st.model is None or st.round != first_round - 1:
                have = "no state" if st.model is None else f"the state of round {st.round}"
                raise RuntimeError(f"first_round={first_round} needs the state of round {first_round - 1} "
                                   f"(load_state_dict); the strategy holds {have}")
            if not self._holds(initial_arrays):
                raise ValueError("initial_arrays must be the model the strategy holds (current_arrays()) to continue a run")
            self._returned = initial_arrays
            self.reidentify(grid)
        offset = first_round - 1
        view = _RoundOffset(self, offset)
        if evaluate_fn is not None:
            user_evaluate_fn = evaluate_fn

            def evaluate_fn(server_round: int, arrays: ArrayRecord):
                return user_evaluate_fn(server_round + offset, arrays)

        result = FedAvg.start(view, grid, initial_arrays, num_rounds - offset, timeout, train_config,
                              evaluate_config, evaluate_fn)
        if not len(result.arrays):
            # FedAvg's Result holds arrays only once a round aggregated some: a run in which no
            # update was accepted returns the model it started from, not an empty record.
            result.arrays = self.current_arrays()
        if offset:
            for name in ("train_metrics_clientapp", "evaluate_metrics_clientapp", "evaluate_metrics_serverapp"):
                history = getattr(result, name, None)
                if isinstance(history, dict):
                    setattr(result, name, {r + offset: v for r, v in history.items()})
        return result

    # ------------------------------------------------------------ checkpoint
    STATE_VERSION = 1

    def options(self) -> dict[str, Any]:
        """The settings a saved state must have been made with (:meth:`load_state_dict` checks them).

        Not the number of rounds (a continued run may run longer) nor where
        clients keep their state. Subclasses add their own.
        """
        return {
            "uplink": json.dumps(self.uplink, sort_keys=True),
            "downlink": repr(self.downlink),
            "uplink_values": self.uplink_values,
            "uplink_positions": self.uplink_positions,
            "downlink_values": self.downlink_values,
            "downlink_positions": self.downlink_positions,
            "server_error_feedback": bool(self.server_error_feedback),
            "client_error_feedback": bool(self.client_error_feedback),
            "exact_arrays": list(self.exact_arrays),
            "seed": self.seed,
            "fraction_train": float(self.fraction_train),
            "weighted_by_key": self.weighted_by_key,
            # Only when off: a checkpoint written before this option compares equal to the default.
            **({} if self.exact_running_stats else {"exact_running_stats": False}),
        }

    @property
    def exact_patterns(self) -> tuple[str, ...]:
        """The names of the float arrays sent exactly: ``exact_arrays`` and, by default, BatchNorm's statistics."""
        return tuple(self.exact_arrays) + (RUNNING_STATS if self.exact_running_stats else ())

    def state_dict(self) -> dict[str, Any]:
        """Everything this strategy needs to continue the run: plain values and tensors (copies).

        Save it with ``torch.save`` and read it back with ``torch.load(...,
        weights_only=True)``; :func:`fl_sparse.checkpoint.save` does that
        atomically. Per-client entries are keyed by node id; ``node_keys``
        holds each node's stable key so :meth:`start` can move them to the
        node ids of a later run.
        """
        from fl_sparse.checkpoint import record_to_state

        st = self.state
        if st.model is None:
            raise RuntimeError("state_dict() before the strategy has a model (start a run first)")
        error = st.server_error.state_dict()
        return {
            "strategy": f"{type(self).__module__}.{type(self).__qualname__}",
            "state_version": self.STATE_VERSION,
            "options": self.options(),
            "layout": st.layout.to_json(),
            "model": st.model.clone(),
            "version": st.version,
            "round": st.round,
            "generation": st.generation,
            "server_error": {"numel": error["numel"], "error": None if error["error"] is None else error["error"].clone()},
            "exact": record_to_state(st.exact),
            "last_update_record": record_to_state(st.last_update_record),
            "update_base": st.update_base,
            "history": [(int(v), idx.clone()) for v, idx in st.history.items()],
            "client_versions": dict(st.client_versions),
            "accepted": dict(st.accepted),
            "cumulative_total_error": float(st.cumulative_total_error),
            "round_metrics": copy.deepcopy(st.round_metrics),
            "node_keys": {int(n): tuple(k) for n, k in self.node_keys.items()},
            "nonces": dict(self._nonces),
            "first_error": self.first_error,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; raises ValueError for another strategy, version or settings.

        All or nothing: a state refused by any check, the base's or a subclass's (subclasses
        extend :meth:`_load_state`), leaves the strategy as it was.
        """
        before = dict(vars(self))  # loading replaces attributes, never changes one in place
        try:
            self._load_state(state)
        except BaseException:
            vars(self).clear()
            vars(self).update(before)
            raise

    def _load_state(self, state: dict[str, Any]) -> None:
        from fl_sparse.checkpoint import record_from_state

        if not isinstance(state, dict):
            raise ValueError("a strategy state must be a dict (from state_dict())")
        mine = f"{type(self).__module__}.{type(self).__qualname__}"
        if state.get("strategy") != mine:
            raise ValueError(f"the saved state is of strategy {state.get('strategy')!r}, this strategy is {mine!r}")
        if state.get("state_version") != self.STATE_VERSION:
            raise ValueError(f"the saved state has version {state.get('state_version')!r}; "
                             f"{type(self).__name__} reads version {self.STATE_VERSION}")
        saved, now = state.get("options", {}), self.options()
        differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if differ:
            detail = ", ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in differ)
            raise ValueError(f"the saved state was made with other settings ({detail})")
        try:
            layout = FlatLayout.from_json(state["layout"])
            exact = record_from_state(state["exact"])
            if layout.exact_names:
                layout = layout.with_exact(exact)
            model = state["model"]
            if not isinstance(model, torch.Tensor) or model.dim() != 1 or model.numel() != layout.numel:
                raise ValueError(f"the saved model is not a vector of {layout.numel} entries")
            if not model.is_floating_point() or not bool(torch.isfinite(model).all()):
                raise ValueError("the saved model is not finite")
            server_error = ErrorFeedback(layout.numel)
            server_error.load_state_dict(state["server_error"])
            history = OrderedDict((int(v), idx.clone()) for v, idx in state["history"])
            client_versions = {int(n): int(v) for n, v in state["client_versions"].items()}
            accepted = {int(n): int(r) for n, r in state["accepted"].items()}
            node_keys = {int(n): (int(k[0]), int(k[1])) for n, k in state["node_keys"].items()}
            st = ServerState(
                layout=layout,
                model=model.detach().to(torch.float32).clone(),
                version=int(state["version"]),
                round=int(state["round"]),
                generation=str(state["generation"]),
                server_error=server_error,
                exact=exact,
                last_update_record=record_from_state(state["last_update_record"]),
                # a checkpoint written before this field: the base its delta sync assumed
                update_base=int(state.get("update_base", int(state["version"]) - 1)),
                history=history,
                client_versions=client_versions,
                accepted=accepted,
                cumulative_total_error=float(state["cumulative_total_error"]),
                round_metrics=copy.deepcopy(dict(state["round_metrics"])),
            )
        except (KeyError, TypeError, IndexError, AttributeError) as exc:
            raise ValueError(f"not a complete strategy state: {type(exc).__name__}: {exc}") from None
        self.state = st
        self.node_keys = node_keys
        self._nonces = {int(n): str(v) for n, v in state.get("nonces", {}).items()}
        self.first_error = state.get("first_error")
        self._returned = None
        self._sync_cache = {}

    def current_arrays(self) -> ArrayRecord:
        """The global model the strategy holds (w_t with its exact arrays), as an ArrayRecord."""
        st = self.state
        if st.model is None:
            raise RuntimeError("no model yet")
        return st.layout.with_exact(st.exact).unflatten(st.model)

    def resync_clients(self) -> None:
        """Forget which model each client holds: its next message carries the dense model.

        For a run continued from a checkpoint its clients may have moved past
        (the process died after the checkpoint). Their error memory stays.
        """
        self.state.client_versions.clear()
        self._sync_cache = {}

    def move_clients(self, mapping: dict[int, int]) -> None:
        """Per-client state of node ``old`` now belongs to node ``mapping[old]`` (the same client).

        Entries of other nodes whose id is now taken by one of the new ids are
        dropped. Subclasses that keep per-client state move theirs too.
        """
        st = self.state
        st.client_versions = _remap(st.client_versions, mapping)
        st.accepted = _remap(st.accepted, mapping)
        self._nonces = _remap(self._nonces, mapping)
        self._sync_cache = {}

    def reidentify(self, grid: Grid) -> None:
        """Identify every connected node again; per-client state follows each client's stable key.

        Node ids change from run to run (a new simulation, restarted
        SuperNodes); partition ids do not. A saved client whose key no
        connected node has yet keeps its old entry until a node reports that
        key (:meth:`_learn_key`).
        """
        saved = self.node_keys
        self.node_keys, self._keyless = {}, set()
        self.identify(grid)
        claims: dict[int, list[int]] = {}
        for node, key in self.node_keys.items():
            claims.setdefault(key[0], []).append(node)
        # Partition ids are the clients' own word. Two nodes claiming one id (a
        # misconfigured or hostile node) inherit nothing: the saved client's
        # state stays where it is, and both claimers start from the dense model.
        disputed = {pid: nodes for pid, nodes in claims.items() if len(nodes) > 1}
        for pid, nodes in sorted(disputed.items()):
            log(WARNING, "nodes %s all claim partition id %d: none inherits its saved state", sorted(nodes), pid)
        now = {pid: nodes[0] for pid, nodes in claims.items() if len(nodes) == 1}
        mapping, pending = {}, {}
        for old, key in saved.items():
            new = now.get(key[0])
            if new is None:
                if key[0] not in disputed:
                    pending[key[0]] = old
                self.node_keys.setdefault(old, key)
            elif new != old:
                mapping[old] = new
        if mapping:
            self.move_clients(mapping)
        self._pending_keys = pending

    def identify(self, grid: Grid) -> None:
        """Learn the stable key (partition id) of connected nodes seen for the first time.

        One small ``identify`` train message per new node, answered by
        :class:`~fl_sparse.clients.SparseMod` without training. Nodes that
        join later are learned from their first reply; when no node at all is
        connected (``start`` in Flower's simulation), :meth:`sample` calls this
        again once they are.
        """
        connected = sorted(grid.get_node_ids())
        # No node yet (run_simulation's ServerApp starts before its nodes register): sample() asks
        # them once FedAvg's wait for nodes is over, so that a ClientApp without the mod is named and
        # sampling orders nodes by partition id from round 1 (not by the simulation's random node ids).
        self._identify_when_connected = not connected
        unknown = [n for n in connected if n not in self.node_keys and n not in self._keyless]
        if not unknown:
            return
        instr = Instruction(server_round=0, phase=protocol.PHASE_IDENTIFY).to_record()
        queries = [
            Message(content=RecordDict({protocol.RECORD: instr}), message_type=MessageType.TRAIN, dst_node_id=n)
            for n in unknown
        ]
        unanswered: dict[int, str] = {}
        unavailable: dict[int, str] = {}  # Flower's own errors (written by the SuperLink): no mod is missing there
        replies = grid.send_and_receive(queries, timeout=self._timeout)
        sent_to = self._sent_to(q.metadata for q in queries)
        for reply in replies:
            node = self.reply_node(reply, sent_to)
            if reply.has_error():
                reason = f"error {reply.error.code}: {reply.error.reason}"
                (unavailable if reply.error.code in _SUPERLINK_ERRORS else unanswered)[node] = reason
                continue
            try:
                self._learn_key(node, Report.read(reply.content))
            except protocol.ProtocolError as exc:
                unanswered[node] = str(exc)
        if unavailable:
            node, reason = next(iter(unavailable.items()))
            log(WARNING, "%d of %d nodes were unavailable for fl-sparse's identify message or did not reply in "
                "time (node %d: %s): stopped or unreachable SuperNodes (Flower drops them after 2 heartbeat "
                "intervals) or a slow ClientApp; each is asked again by its first train message",
                len(unavailable), len(unknown), node, reason[:300])
        if unanswered:
            # Nothing is wrong with the run yet (such a node is asked again by its first train
            # message); but the usual cause, a ClientApp without the mod, fails every round after.
            node, reason = next(iter(unanswered.items()))
            log(WARNING, "%d of %d nodes did not answer fl-sparse's identify message (node %d: %s). "
                "Is SparseMod in their ClientApp's mods? (ClientApp(mods=[SparseMod()]))",
                len(unanswered), len(unknown), node, reason[:300])

    def _learn_key(self, node: int, report: Report) -> None:
        if report.partition_id >= 0:
            old = self._pending_keys.get(report.partition_id)
            # Another node already claims this id: the saved state goes to neither (see reidentify).
            # Scanned only while a saved client waits for its id: every reply comes through here.
            if old is not None and any(
                k[0] == report.partition_id and n not in (node, old) for n, k in self.node_keys.items()
            ):
                old = None
            elif old is not None:
                del self._pending_keys[report.partition_id]
            if old is not None and old != node:  # a client of a continued run, back under a new node id
                self.node_keys.pop(old, None)
                self.move_clients({old: node})
            self.node_keys[node] = (report.partition_id, node)
        else:
            self._keyless.add(node)

    def _await_gone_clients(self, connected: list[int]) -> None:
        """Known clients whose node is no longer connected wait for their partition id, as a
        continued run's saved clients do (:meth:`reidentify`): a node that reports it inherits
        their state (:meth:`_learn_key`). Not where a connected node already claims the id."""
        online = set(connected)
        for pid, old in list(self._pending_keys.items()):
            if old in online and self.node_keys.get(old, (None,))[0] == pid:
                del self._pending_keys[pid]  # back under its own node id: nobody else inherits its state
        claimed = {self.node_keys[n][0] for n in online if n in self.node_keys}
        for old in sorted(set(self.node_keys) - online):
            pid = self.node_keys[old][0]
            if pid >= 0 and pid not in claimed:
                self._pending_keys.setdefault(pid, old)

    def _order(self, node: int) -> tuple[int, int]:
        """Nodes in a fixed order (by stable client key): reproducible sampling and float sums."""
        return self.node_keys.get(node, (_UNKNOWN_KEY, node))

    # ------------------------------------------------------------- sampling
    def sample(self, server_round: int, grid: Grid) -> list[int]:
        """FedAvg's sample size and waiting, drawn reproducibly.

        Waits, as FedAvg does, until ``max(min_available_nodes, sample
        size)`` nodes are connected, then samples ``fraction_train`` of the
        nodes connected by then; nodes are ordered by their stable key and
        drawn with an RNG seeded by (seed, round). Where a known client's node
        is gone, a node not yet identified is asked for its key first: it may
        be that client back under a new node id, and inherits its state.
        """
        size = max(int(len(list(grid.get_node_ids())) * self.fraction_train), self.min_train_nodes)
        need = max(self.min_available_nodes, size)
        while len(nodes := list(grid.get_node_ids())) < need:
            log(INFO, "Waiting for nodes to connect: %d connected (minimum required: %d).", len(nodes), need)
            time.sleep(1)
        if self._identify_when_connected:
            self.identify(grid)  # start() found no node connected: its identify message, now
        if any(n not in self.node_keys and n not in self._keyless for n in nodes):
            self._await_gone_clients(nodes)
            if self._pending_keys:
                # A client whose node is gone (a continued run's saved client, or a SuperNode that
                # restarted mid-run: without fixed keys it registers anew) may be back under a new
                # node id. Identified now, before its message is built, it gets that client's state
                # (model version, accepted round: told "nothing accepted", the client would put an
                # update the server took back into its error memory and send it a second time).
                self.identify(grid)
        # The fraction applies to the nodes connected once the wait is over (FedAvg takes it
        # from the count before waiting, which samples too few when nodes are still joining).
        size = max(int(len(nodes) * self.fraction_train), self.min_train_nodes)
        ordered = sorted(nodes, key=self._order)
        rng = random.Random(self.seed * 1_000_003 + server_round)
        return rng.sample(ordered, min(size, len(ordered)))

    # -------------------------------------------------------- configure_train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients; send each the sync payload it needs, the uplink spec and the user's config."""
        if self.fraction_train == 0.0:
            return []
        self.adopt(arrays)
        node_ids = self.sample(server_round, grid)
        spec = self.prepare_round(server_round, len(node_ids), config)
        config["server-round"] = server_round  # as FedAvg does
        instr = self.instruction(server_round, phase=protocol.PHASE_TRAIN, uplink=json.dumps(spec, sort_keys=True))
        messages, modes, downlink_bytes = self.messages_with_sync(node_ids, config, instr)
        self.state.round_metrics.setdefault(server_round, {}).update(
            {
                "round": server_round, "clients": len(node_ids), "downlink_bytes": downlink_bytes, "sync_modes": modes,
                **{f"downlink_{kind}_bytes": n for kind, n in self.last_downlink_split.items()},
            }
        )
        log(INFO, "configure_train: %d clients, downlink %s B, sync %s", len(node_ids), downlink_bytes, modes)
        return messages

    def instruction(self, server_round: int, **fields: Any) -> Instruction:
        """The round's instruction common to every client (sync fields are added per node)."""
        st = self.state
        return Instruction(
            server_round=server_round,
            model_version=st.version,
            model_hash=vector_hash(st.model),
            generation=st.generation,
            arrays_key=self.arrayrecord_key,
            uplink_values=self.uplink_values,
            uplink_positions=self.uplink_positions,
            error_feedback=self.client_error_feedback,
            error_memory_dtype=self.error_memory_dtype,
            seed=self.seed,
            diagnostics=self.diagnostics,
            state_dir=self.client_state_dir,
            state_fsync=self.client_state_fsync,
            **fields,
        )

    def messages_with_sync(
        self, node_ids: list[int], config: ConfigRecord, instr: Instruction, per_node=None
    ) -> tuple[list[Message], dict[str, int], int]:
        """One message per node: the user's config, the instruction, the node's sync payload.

        ``per_node(node) -> dict`` adds node-specific instruction fields.
        Returns the messages, how many of each sync mode, and the bytes sent
        (sync payloads and exact arrays).
        """
        st = self.state
        messages, modes, total = [], {}, 0
        # Where the downlink goes: the last update to clients one version behind, catch-ups
        # to clients further behind, the dense model to clients seen for the first time (or
        # whose model is unknown). At low participation nearly every sampled client is new or
        # far behind, and the last kind, bidirectional compression's saving, shrinks.
        split = dict.fromkeys(DOWNLINK_KINDS, 0)
        exact_bytes = _record_bytes(st.exact) if st.layout.exact_names else 0
        layout_json = st.layout.to_json()
        for node in node_ids:
            have = st.client_versions.get(node)
            mode, payload = self.sync_for(node)
            # by the payload, not by version arithmetic: versions skip rounds without an update
            kind = "first_contact" if have is None else "last_update" if mode in _LAST_UPDATE_MODES else "catch_up"
            self._nonces[node] = secrets.token_hex(8)
            node_instr = Instruction(
                **{
                    **instr.__dict__,
                    "nonce": self._nonces[node],
                    "sync_mode": mode,
                    "base_version": -1 if have is None else have,
                    "accepted_round": st.accepted.get(node, -1),
                    "layout": layout_json if mode == "dense" else "",
                    **(per_node(node) if per_node else {}),
                }
            )
            content = RecordDict({self.configrecord_key: config, protocol.RECORD: node_instr.to_record()})
            sent = 0
            if payload is not None:
                content[protocol.SYNC] = payload
                sent += codec.wire_size(payload).total_bytes
            if exact_bytes:
                content[protocol.EXACT] = st.exact
                sent += exact_bytes
            total += sent
            split[kind] += sent
            modes[mode] = modes.get(mode, 0) + 1
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        self._sent.extend(m.metadata for m in messages)
        self.last_downlink_split = split
        return messages, modes, total

    def sync_for(self, node: int) -> tuple[str, ArrayRecord | None]:
        """The sync payload for ``node`` (override to add modes); cached per version and round."""
        have = self.state.client_versions.get(node)
        if have not in self._sync_cache:
            self._sync_cache[have] = self.sync_payload(have)
        return self._sync_cache[have]

    def prepare_round(self, server_round: int, num_clients: int, config: ConfigRecord) -> dict[str, Any]:
        """Fix this round's uplink spec (validated here, before anything is sent)."""
        self._round_started = time.perf_counter()
        self._nonces = {}
        self._sent = []
        self._sync_cache = {}
        self._local_steps = _local_steps(config.get("local-steps"))
        spec = _with_defaults(self.uplink_spec(server_round, num_clients))
        self._round_compressor = build_compressor(**spec)
        return spec

    def initialize(self, arrays: ArrayRecord) -> None:
        """Take w_0 from ``arrays``: a new run (every client gets a dense sync first)."""
        st = self.state
        st.layout = FlatLayout.from_arrayrecord(arrays, exact=self.exact_patterns)
        wide = [(n, d) for n, d in zip(st.layout.names, st.layout.dtypes) if np.dtype(d).itemsize > 4]
        if wide:
            log(WARNING, "arrays %s are %s: fl-sparse keeps, sends and aggregates the model in float32 (about 7 "
                "significant digits), so their values are rounded to float32 and changes below float32's "
                "resolution of a weight are lost",
                ", ".join(repr(n) for n, _ in wide[:5]) + (" ..." if len(wide) > 5 else ""), wide[0][1])
        st.model = st.layout.flatten(arrays).clone()
        _warn_tied_arrays(st.layout, st.model)
        st.exact = st.layout.exact_record(arrays)
        st.version = 0
        st.round = 0
        st.generation = secrets.token_hex(8)
        st.server_error = ErrorFeedback(st.model.numel())
        st.last_update_record, st.update_base = None, -1
        st.history.clear()
        st.client_versions.clear()
        st.accepted.clear()
        self._returned = None

    def adopt(self, arrays: ArrayRecord) -> None:
        """Start from ``arrays``: a no-op when they are the model this strategy holds."""
        st = self.state
        if st.model is not None and (arrays is self._returned or self._holds(arrays)):
            return
        if st.model is not None and st.round > 0:
            # E.g. Flower's DifferentialPrivacyClientSideFixedClipping adds noise to the model between
            # rounds: each round is then a new run, dense and without error memory, and said so.
            log(WARNING, "the arrays given for this round are not the model this strategy returned after round %d "
                "(did a wrapper or the caller change them?): starting a new run from them, so every client gets "
                "the dense model and client and server error memories start empty", st.round)
        self.initialize(arrays)

    def _holds(self, arrays: ArrayRecord) -> bool:
        """True if ``arrays`` are w_t: its float32 values, or w_t as the strategy hands it out (each array
        in its own dtype: a float16 array holds w_t rounded), with the current exact arrays."""
        st = self.state
        try:
            flat = st.layout.flatten(arrays)
            same = torch.equal(flat, st.model) or (
                any(np.dtype(d).itemsize < 4 for d in st.layout.dtypes)
                and torch.equal(flat, st.layout.flatten(st.layout.unflatten(st.model)))
            )
            return same and all(np.array_equal(arrays[n].numpy(), st.exact[n].numpy()) for n in st.layout.exact_names)
        except (ValueError, KeyError):
            return False

    def sync_payload(self, have: int | None) -> tuple[str, ArrayRecord | None]:
        """The cheapest exact way to bring a client from version ``have`` to now.

        Versions are the rounds that made them, so a round without an update leaves a gap:
        the last update goes to a client at ``update_base`` (not ``version - 1``), and what
        a client further behind lacks is every update in ``history`` after ``have``, not the
        versions ``have + 1 .. version``. ``history`` keeps the newest updates (pruned from
        the oldest), so it holds all of them when ``have`` is at least the version its oldest
        entry was applied to; no version lies between that one and the entry's own, so
        ``have >= oldest - 1`` says so for any version a client can hold (and errs only
        towards the dense model).
        """
        st = self.state
        if have == st.version:
            return "none", None
        if have is None or not 0 <= have < st.version:
            return "dense", codec.encode_dense(st.model)
        if have == st.update_base and st.last_update_record is not None:
            return "delta", st.last_update_record
        dense = codec.encode_dense(st.model)
        if st.history and have >= next(iter(st.history)) - 1:
            missed = [v for v in st.history if v > have]
            positions = torch.unique(torch.cat([st.history[v] for v in missed]))
            overwrite = SparseTensor(positions, st.model[positions].clone(), st.model.numel())
            record = codec.encode(
                overwrite, values="fp32", positions=self.downlink_positions, segments=codec.segments_of(st.layout)
            )
            if codec.wire_size(record).total_bytes < codec.wire_size(dense).total_bytes:
                return "set", record
        return "dense", dense

    # -------------------------------------------------------- aggregate_train
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Read the replies, aggregate, compress the downlink, update w (the hooks, in order)."""
        st = self.state
        if st.model is None:
            raise RuntimeError("aggregate_train before configure_train: no global model yet")
        st.round = server_round
        updates = self.read_replies(server_round, replies)
        rm = st.round_metrics.setdefault(server_round, {"round": server_round})
        rm["accepted"] = len(updates)
        if not updates:
            if self.fraction_train != 0.0:  # fraction_train = 0 sends nothing by design: no warning, as FedAvg
                log(WARNING, "round %d: no valid update; global model unchanged", server_round)
            rm.update(self._empty_round_metrics())
            return None, None
        total = math.fsum(u.weight for u in updates)
        p = [u.weight / total for u in updates]
        aggregate = self.aggregate_updates(server_round, [u.update for u in updates], p)
        server_error = st.server_error.state_dict()["error"]
        delta_before = None if server_error is None else server_error.clone()  # to undo a rejected round
        try:
            sent = self.compress_downlink(server_round, aggregate)
            finite = self._finite_step(sent)
        except ValueError:  # e.g. an fp16 downlink cannot hold the aggregate (|v| >= 65520)
            finite = False
        if not finite:
            # Finite updates can still sum to inf (3e38 + 3e38), or beyond what the downlink's
            # value code holds: the round is rejected whole.
            st.server_error.load_state_dict({"numel": st.model.numel(), "error": delta_before})
            for u in updates:
                st.accepted.pop(u.node, None)
            log(WARNING, "round %d: the aggregate is not finite (or not representable in the downlink "
                "value code %s); round rejected, global model unchanged", server_round, self.downlink_values)
            rm.update(self._empty_round_metrics())
            rm.update({"accepted": 0, "rejected_round": 1})
            return None, None
        record = self.apply_update(server_round, sent)
        self.aggregate_exact(updates, p)
        rm.update(self.round_metrics(server_round, updates, p, aggregate, record))
        diag = [u.diagnostics for u in updates if u.diagnostics is not None]
        if self.diagnostics and len(diag) == len(updates):
            delta = (delta_before if delta_before is not None else torch.zeros_like(st.model)) if self.downlink is not None else None
            rm.update(self._rho_estimates(diag, p, delta, aggregate))
        self._returned = st.layout.with_exact(st.exact).unflatten(st.model)
        return self._returned, self.train_metrics(server_round, updates)

    def read_replies(self, server_round: int, replies: Iterable[Message]) -> list[ClientUpdate]:
        """The valid replies as :class:`ClientUpdate`, in stable client order; the rest dropped and logged."""
        st = self.state
        expected_hash = vector_hash(st.model)
        updates, failures, seen = [], 0, set()
        for node, msg in self.replies_by_node(replies):
            if msg.has_error():
                failures += 1
                self.drop_reply(server_round, "client %d failed: %s", node, msg.error.reason)
                continue
            try:
                report = self.read_report(server_round, node, msg, seen)
                update = self.read_update(server_round, node, msg, report, expected_hash)
            except Exception as exc:  # noqa: BLE001 - a reply is untrusted input: it never crashes the server
                failures += 1
                self.drop_reply(server_round, "rejected reply from client %d: %s", node, exception_reason(exc))
                continue
            updates.append(update)
            st.accepted[node] = server_round
        for node in self._nonces.keys() - seen:
            # Asked, no reply: it may have applied this round's sync, so its version is unknown.
            st.client_versions.pop(node, None)
        st.round_metrics.setdefault(server_round, {"round": server_round})["failures"] = failures
        return self.bound_influence(server_round, updates)

    def read_report(self, server_round: int, node: int, msg: Message, seen: set[int]) -> Report:
        """The reply's :class:`Report`, bound to the message it answers: this round, this node, its nonce."""
        if node in seen:
            raise protocol.ProtocolError("a second reply from the same client this round")
        seen.add(node)
        report = Report.read(msg.content)
        if report.server_round != server_round:
            raise protocol.ProtocolError(f"reply for round {report.server_round}")
        if node not in self._nonces or report.nonce != self._nonces[node]:
            raise protocol.ProtocolError("reply does not echo the nonce of this round's message (replayed or not asked)")
        self._learn_key(node, report)
        return report

    def bound_influence(self, server_round: int, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        """Apply the weight cap and the update norm bound (see the class docstring)."""
        if not updates:
            return updates
        if self.max_weight_ratio is not None:
            cap = self.max_weight_ratio * statistics.median(u.weight for u in updates)
            for u in updates:
                u.weight = min(u.weight, cap)
        bound = self.update_norm_bound
        if self.update_norm_bound_ratio is not None:
            median = statistics.median(float(torch.linalg.vector_norm(u.update.values.double())) for u in updates)
            relative = self.update_norm_bound_ratio * median
            bound = relative if bound is None else min(bound, relative)
        clipped = 0
        if bound is not None:
            for u in updates:
                norm = float(torch.linalg.vector_norm(u.update.values.double()))
                if norm > bound:
                    u.update = u.update.with_values(u.update.values * (bound / norm))
                    clipped += 1
        self.state.round_metrics.setdefault(server_round, {"round": server_round})["clipped"] = clipped
        return updates

    def read_update(
        self, server_round: int, node: int, msg: Message, report: Report, expected_hash: str
    ) -> ClientUpdate:
        """One reply's update, checked; raises :class:`fl_sparse.codec.PayloadError` naming the problem."""
        st = self.state
        if report.model_hash != expected_hash or report.model_version != st.version:
            st.client_versions.pop(node, None)
            raise protocol.ProtocolError("the client trained from a different model")
        st.client_versions[node] = report.model_version
        numel = st.model.numel()
        record = protocol.array_record(msg.content, protocol.UPDATE, what="reply")
        update = codec.decode(record, numel, max_nnz=self._max_uplink_nnz(numel), segments=codec.segments_of(st.layout))
        size = codec.wire_size(record)  # count what arrived, not what the client says it sent
        exact = self._read_exact(msg.content)
        user_content = self.user_content(server_round, node, msg)
        return ClientUpdate(
            node=node,
            update=update,
            weight=self.weight_of(user_content),
            user_content=user_content,
            uplink=UplinkMetrics.read(msg.content),
            position_bits=size.position_bits,
            value_bits=size.value_bits,
            total_bytes=size.total_bytes + self.exact_bytes(msg.content, exact),
            exact=exact,
            diagnostics=msg.content.array_records.get(protocol.DIAGNOSTICS) if self.diagnostics else None,
        )

    def user_content(self, server_round: int, node: int, msg: Message) -> RecordDict:
        """The user's own records of a reply (override where they came in an earlier message)."""
        return protocol.user_records(msg.content)

    def weight_of(self, user_content: RecordDict) -> float:
        """The reply's weight: its ``weighted_by_key`` metric, a finite number > 0."""
        for record in user_content.metric_records.values():
            if self.weighted_by_key in record:
                value = record[self.weighted_by_key]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_WEIGHT:
                    raise protocol.ProtocolError(
                        f"weight {self.weighted_by_key!r} must be a number in (0, 2**53], got {value!r}"
                    )
                return float(value)
        raise protocol.ProtocolError(f"reply metrics lack the weight {self.weighted_by_key!r}")

    @staticmethod
    def exact_bytes(content: RecordDict, exact: ArrayRecord | None) -> int:
        """Bytes of a reply's exact arrays as they arrived (uplink bytes count them, as downlink bytes do)."""
        return 0 if exact is None else _record_bytes(content.array_records[protocol.EXACT])

    def _read_exact(self, content: RecordDict) -> ArrayRecord | None:
        layout = self.state.layout
        if not layout.exact_names:
            return None
        record = protocol.array_record(content, protocol.EXACT, what="reply")
        try:
            exact = layout.with_exact(self.state.exact).exact_record(record)
        except ValueError as exc:
            raise protocol.ProtocolError(str(exc)) from None
        for name in layout.exact_names:
            nd = exact[name].numpy()
            if np.issubdtype(nd.dtype, np.floating) and not np.isfinite(nd).all():
                raise protocol.ProtocolError(f"exact array {name!r} is not finite")
        return exact

    def _finite_step(self, sent: SparseTensor) -> bool:
        """ĝ_t and w_t − ĝ_t are finite once encoded (q-bit codes and fp16 can overflow too)."""
        st = self.state
        if not bool(torch.isfinite(sent.values).all()):
            return False
        try:
            decoded = codec.decode(codec.encode(sent, values=self.downlink_values, positions="raw"), st.model.numel())
        except ValueError:  # PayloadError, and values a 16-bit code cannot hold
            return False
        return bool(torch.isfinite(st.model[decoded.indices] - decoded.values).all())

    def apply_update(self, server_round: int, sent: SparseTensor) -> ArrayRecord:
        """w_t = w_{t−1} − ĝ_t with ĝ_t exactly as the clients will decode it; returns its record."""
        st = self.state
        segments = codec.segments_of(st.layout)
        record = codec.encode(sent, values=self.downlink_values, positions=self.downlink_positions, segments=segments)
        decoded = codec.decode(record, st.model.numel(), segments=segments)
        decoded.add_(st.model, alpha=-1.0)
        st.version, st.update_base = server_round, st.version
        st.last_update_record = record
        st.history[server_round] = decoded.indices
        self._prune_history()
        st.round_metrics.setdefault(server_round, {})["downlink_density"] = decoded.density
        return record

    def aggregate_exact(self, updates: list[ClientUpdate], p: list[float]) -> None:
        """The exact arrays: their weighted average, as FedAvg takes it (rounded for integer arrays)."""
        st = self.state
        if not st.layout.exact_names:
            return
        out = ArrayRecord()
        for name in st.layout.exact_names:
            dtype = st.exact[name].numpy().dtype
            acc = sum(pq * u.exact[name].numpy().astype(np.float64) for u, pq in zip(updates, p))
            if not np.issubdtype(dtype, np.floating):
                acc = np.rint(acc)
            out[name] = Array(np.asarray(acc).astype(dtype))
        st.exact = out

    def round_metrics(
        self, server_round: int, updates: list[ClientUpdate], p: list[float], aggregate: SparseTensor, record: ArrayRecord
    ) -> dict[str, Any]:
        """The round's numbers for :attr:`ServerState.round_metrics` (bytes, densities, errors, bits)."""
        st = self.state
        numel = st.model.numel()
        # Bits per parameter per local step (Q / (d H)), as in the SSGD-MV paper's Table 1:
        # uplink averaged over the clients, downlink for the update every client receives.
        d_h = numel * self._local_steps
        down = codec.wire_size(record)
        # Clients' own numbers are untrusted: capped so that squares and sums stay finite.
        client_sq = sum(min(u.uplink.error_norm, 1e150) ** 2 * pq for u, pq in zip(updates, p))
        st.cumulative_total_error += sum(min(u.uplink.compression_error, 1e300) * pq for u, pq in zip(updates, p))
        return {
            "uplink_bytes": sum(u.total_bytes for u in updates),
            "downlink_update_bytes": down.total_bytes,
            "density": sum(u.uplink.density for u in updates) / len(updates),
            "aggregate_density": aggregate.density,
            "client_error_norm": math.sqrt(client_sq),
            "server_error_norm": st.server_error.norm() if self.downlink is not None else 0.0,
            "cumulative_total_error": st.cumulative_total_error,
            "q_loc_up": sum(u.position_bits for u in updates) / len(updates) / d_h,
            "q_val_up": sum(u.value_bits for u in updates) / len(updates) / d_h,
            "q_loc_down": down.position_bits / d_h,
            "q_val_down": down.value_bits / d_h,
            "num_examples": int(sum(u.weight for u in updates)) if self.weighted_by_key == "num-examples" else None,
            "train_loss": _weighted_metric(updates, p, TRAIN_LOSS_KEYS),
            "round_seconds": time.perf_counter() - self._round_started,
        }

    def _weighed_content(self, update: ClientUpdate) -> RecordDict:
        """The user's records with the weight the aggregate used: a weight capped by ``max_weight_ratio``
        counts as capped in the clients' metrics too, not as the number the client claimed."""
        content = update.user_content
        for name, record in content.metric_records.items():
            if self.weighted_by_key in record:
                if float(record[self.weighted_by_key]) == update.weight:
                    return content
                weighed = RecordDict(dict(content.items()))
                weighed[name] = MetricRecord(dict(record, **{self.weighted_by_key: update.weight}))
                return weighed
        return content

    def train_metrics(self, server_round: int, updates: list[ClientUpdate]) -> MetricRecord:
        """The clients' metrics aggregated by ``train_metrics_aggr_fn``, plus this round's numbers."""
        try:
            user = self.train_metrics_aggr_fn([self._weighed_content(u) for u in updates], self.weighted_by_key)
        except Exception as exc:  # noqa: BLE001 - clients' metrics are untrusted input too
            log(WARNING, "round %d: client metrics not aggregated: %s", server_round, exception_reason(exc))
            user = MetricRecord()
        if user is None:  # FedAvg passes it on (a round without client metrics): here our numbers remain
            user = MetricRecord()
        _warn_non_finite_metrics(server_round, user, updates)
        ours = {
            k: v
            for k, v in self.state.round_metrics[server_round].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in user
        }
        merged = MetricRecord(dict(user))
        for k, v in ours.items():
            merged[k] = v
        return merged

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """FedAvg's, except that a malformed reply is dropped and logged, naming the node (FedAvg raises,
        which ended the run: a reply is untrusted input here).

        Kept, as FedAvg requires of every reply: one MetricRecord holding a weight (a number, 0 allowed
        as in FedAvg); of those, the ones whose record name, metric names and list lengths are the most
        common (FedAvg refuses a round whose replies differ in them).
        """
        kept: list[Message] = []
        for msg in replies:
            if not msg.has_error():
                try:
                    records = list(msg.content.metric_records.values())
                    if len(records) != 1:
                        raise protocol.ProtocolError("an evaluate reply must carry exactly one MetricRecord")
                    weight = records[0].get(self.weighted_by_key)
                    # 0 too, unlike a train reply's: FedAvg takes a client with an empty test set
                    number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
                    if not (number and 0 <= weight <= MAX_WEIGHT):
                        raise protocol.ProtocolError(
                            f"weight {self.weighted_by_key!r} must be a number in [0, 2**53], got {weight!r}"
                        )
                except protocol.ProtocolError as exc:
                    log(WARNING, "round %d: rejected evaluate reply from client %d: %s", server_round,
                        msg.metadata.src_node_id, exc)
                    continue
            kept.append(msg)

        def names(msg: Message) -> tuple[str, frozenset]:
            name, record = next(iter(msg.content.metric_records.items()))
            return name, frozenset((k, len(v) if isinstance(v, list) else None) for k, v in record.items())

        shapes = {id(m): names(m) for m in kept if not m.has_error()}
        if shapes:
            counts = Counter(shapes.values())
            common = max(counts, key=counts.__getitem__)  # the first most common, as max over the list gave
            for msg in kept:
                if shapes.get(id(msg), common) != common:
                    log(WARNING, "round %d: rejected evaluate reply from client %d: its metrics %s differ from "
                        "the other clients' %s", server_round, msg.metadata.src_node_id,
                        _metric_names(shapes[id(msg)]), _metric_names(common))
            kept = [m for m in kept if shapes.get(id(m), common) == common]
        try:
            return super().aggregate_evaluate(server_round, kept)
        except Exception as exc:  # noqa: BLE001 - clients' metrics are untrusted input (see train_metrics)
            log(WARNING, "round %d: evaluate metrics not aggregated: %s", server_round, exception_reason(exc))
            return None

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _sent_to(sent: Iterable[Metadata]) -> dict[str, int]:
        """Message id -> destination node of the messages sent. Read once the replies are in: the
        grid gives a message its id when it pushes it, after the strategy built it."""
        return {md.message_id: md.dst_node_id for md in sent if md.message_id}

    @staticmethod
    def reply_node(msg: Message, sent_to: dict[str, int]) -> int:
        """The node a reply answers for (``sent_to``: from :meth:`_sent_to`): its sender.

        Except in an error reply, which Flower's SuperLink may have written itself for the
        node (``NODE_UNAVAILABLE`` for a dead node, an expired reply): its sender is then the
        SuperLink's own id (1), not the node's, so the node is the one the answered message
        went to. Where that message is unknown (a grid that sets no message ids), the sender.
        """
        if msg.has_error():
            return sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        return msg.metadata.src_node_id

    def replies_by_node(self, replies: Iterable[Message]) -> list[tuple[int, Message]]:
        """``(node, reply)`` for this round's replies, in stable client order (see :meth:`reply_node`)."""
        sent_to = self._sent_to(self._sent)
        return sorted(((self.reply_node(m, sent_to), m) for m in replies), key=lambda pair: self._order(pair[0]))

    def drop_reply(self, server_round: int, why: str, node: int, *args: Any) -> None:
        """Log why ``node``'s reply was not used and forget which model it holds.

        ``why`` is a %-format whose first field is the node. The client's state
        is then unknown, so its next message carries the dense model.
        """
        self.state.client_versions.pop(node, None)
        if self.first_error is None:
            self.first_error = ("round %d: " + why) % (server_round, node, *args)
        log(WARNING, "round %d: " + why, server_round, node, *args)

    def _max_uplink_nnz(self, numel: int) -> int:
        """Cap on entries a client may declare (guards allocation on decode)."""
        k_for = getattr(self._round_compressor, "k_for", None)
        k = None if k_for is None else k_for(numel)
        return numel if k is None else min(numel, int(k))  # None: unbounded (the Compressor protocol allows it)

    def _prune_history(self) -> None:
        """Forget positions older than any client could use cheaply.

        Once the union of changed positions covers the model, a catch-up is no
        smaller than the dense model, so older entries can go.
        """
        st = self.state
        numel = st.model.numel()
        total = 0
        keep_from = None
        for v in reversed(st.history):
            total += st.history[v].numel()
            if total > numel:
                keep_from = v
                break
        if keep_from is not None:
            for v in list(st.history):
                if v <= keep_from:
                    del st.history[v]

    def _empty_round_metrics(self) -> dict[str, Any]:
        st = self.state
        return {
            "train_loss": float("nan"),
            "uplink_bytes": 0,
            "downlink_update_bytes": 0,
            "density": 0.0,
            "client_error_norm": float("nan"),
            "server_error_norm": st.server_error.norm() if self.downlink is not None else 0.0,
            "cumulative_total_error": st.cumulative_total_error,
        }

    def _rho_estimates(self, diag: list[ArrayRecord], p, delta_before, aggregate) -> dict[str, float]:
        """ρ (Assumption 3.5) and ρ̂ (Assumption 3.6) of the bidirectional paper.

        ρ  = ‖Top_K(δ + Σ p a) − Top_K(δ + Σ Top_K(p a))‖ / ‖Σ p α g‖
        ρ̂ = ‖Top_K(Σ p a) − Σ Top_K(p a)‖ / ‖Σ p α g‖
        with Top_K the downlink compressor (or this round's uplink one if none) and
        Σ Top_K(p a) = g_t, the aggregate of what was actually sent.
        """
        numel = self.state.model.numel()
        try:
            a = sum(pq * _dense(d, "a", numel) for d, pq in zip(diag, p))
            step = sum(pq * _dense(d, "step", numel) for d, pq in zip(diag, p))
        except ValueError as exc:
            log(WARNING, "diagnostics ignored: %s", exc)
            return {}
        step_norm = float(step.norm())
        if step_norm == 0.0 or not math.isfinite(step_norm):
            return {}
        # The round's own uplink compressor: its k or λ may differ from the constructor's spec (AdapTop-K's k_t,
        # hard threshold's lr·λ, rTop-k's r for the round's clients).
        top = self.downlink or self._round_compressor or build_compressor(**_with_defaults(self.uplink))
        g = aggregate.to_dense()
        out = {"rho_hat": float((top(a).to_dense() - g).norm()) / step_norm}
        if delta_before is not None:
            out["rho"] = float((top(delta_before + a).to_dense() - top(delta_before + g).to_dense()).norm()) / step_norm
        return out


class _RoundOffset:
    """The strategy as Flower's round loop sees it when a run continues at round ``offset + 1``.

    :meth:`flwr.serverapp.strategy.Strategy.start` counts rounds from 1. This
    view forwards everything to the strategy and adds ``offset`` to the round
    of the four per-round calls, the one place where a continued run's rounds
    are translated.
    """

    def __init__(self, strategy: SparseFedAvg, offset: int) -> None:
        self._strategy = strategy
        self._offset = offset

    @property
    def __class__(self):  # Flower logs the strategy's class name
        return type(self._strategy)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._strategy, name)

    def configure_train(self, server_round: int, *args: Any, **kwargs: Any):
        return self._strategy.configure_train(server_round + self._offset, *args, **kwargs)

    def aggregate_train(self, server_round: int, *args: Any, **kwargs: Any):
        return self._strategy.aggregate_train(server_round + self._offset, *args, **kwargs)

    def configure_evaluate(self, server_round: int, *args: Any, **kwargs: Any):
        return self._strategy.configure_evaluate(server_round + self._offset, *args, **kwargs)

    def aggregate_evaluate(self, server_round: int, *args: Any, **kwargs: Any):
        return self._strategy.aggregate_evaluate(server_round + self._offset, *args, **kwargs)


def _remap(entries: dict[int, Any], mapping: dict[int, int]) -> dict[int, Any]:
    """``entries`` with the keys of ``mapping`` renamed; other entries whose key is a new id are dropped."""
    taken = set(mapping.values())
    out = {n: v for n, v in entries.items() if n not in mapping and n not in taken}
    out.update({mapping[n]: v for n, v in entries.items() if n in mapping})
    return out


def with_fedavg_signature(cls):
    """Class decorator: ``inspect.signature`` of a subclass shows FedAvg's parameters too.

    The named strategies take ``*args`` (FedAvg's ten parameters, in FedAvg's
    order) and ``**kwargs`` (the base's keyword-only options) and pass them on;
    this writes the full signature out for ``help()``, IDEs and tools.
    """
    init = cls.__init__
    own = inspect.signature(init).parameters.values()
    base = list(inspect.signature(SparseFedAvg.__init__).parameters.values())
    # Base options the subclass sets itself (``fixed_options``: option -> what to use instead), not passed on.
    fixed = {"uplink": "the strategy's own arguments", "downlink": "the strategy's own arguments",
             **getattr(cls, "fixed_options", {})}
    keyword = [p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY]
    names = {p.name for p in keyword}
    keyword += [p for p in base if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in names | fixed.keys()]
    positional = [p for p in base if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        given = [name for name in fixed if name in kwargs and name not in names]
        if given:  # else Python's "got multiple values for keyword argument", naming SparseFedAvg
            raise TypeError(f"{cls.__name__} sets {given[0]} itself: use {fixed[given[0]]}")
        init(self, *args, **kwargs)

    __init__.__signature__ = inspect.Signature(positional + keyword)
    cls.__init__ = __init__
    return cls


def _dense(record: ArrayRecord, key: str, numel: int) -> torch.Tensor:
    if key not in record:
        raise ValueError(f"no {key!r}")
    x = torch.from_numpy(np.asarray(record[key].numpy(), dtype=np.float32)).reshape(-1)
    if x.numel() != numel:
        raise ValueError(f"{key!r} has {x.numel()} entries, expected {numel}")
    return x


def _local_steps(value: Any) -> int:
    """H from the user's train config, for the q_* metrics only: a whole number >= 1, else 1 (the
    config is the user's, passed through: a value such as ``"auto"`` must not stop the server)."""
    if not is_number(value) or not math.isfinite(value):
        return 1
    return max(1, int(value)) if float(value).is_integer() else 1


# The train-loss metric's names: the built-in client's, and Flower's examples' (and the README's).
TRAIN_LOSS_KEYS = ("train-loss", "train_loss")


def _weighted_metric(updates: list[ClientUpdate], p: list[float], keys: tuple[str, ...]) -> float:
    """Σ p_q m_q over the replies whose user metrics have a finite number under one of ``keys``
    (the first found; NaN if no reply has one)."""
    total, mass = 0.0, 0.0
    for u, pq in zip(updates, p):
        value = None
        for record in u.user_content.metric_records.values():
            for key in keys:
                v = record.get(key)
                if is_number(v) and math.isfinite(v):
                    value = float(v)
                    break
            if value is not None:
                break
        if value is not None:
            total += pq * value
            mass += pq
    return total / mass if mass > 0 else float("nan")


def _warn_tied_arrays(layout: FlatLayout, model: torch.Tensor) -> None:
    """Name arrays of w_0 that are equal and not constant: likely one tensor under two keys (tied
    weights), which fl-sparse compresses as two arrays whose copies then drift apart. Constant ones
    (zero-initialised biases) are alike by chance and not named."""
    flat, offset, by_shape = model.detach().cpu().numpy(), 0, {}
    for name, shape in zip(layout.names, layout.shapes):
        size = math.prod(shape)
        by_shape.setdefault(shape, []).append((name, flat[offset:offset + size]))
        offset += size
    seen: dict[tuple, tuple[str, np.ndarray]] = {}
    tied = []
    for shape, group in by_shape.items():
        if len(group) < 2:
            continue
        for name, values in group:
            if values.size < 2 or values.min() == values.max():
                continue
            key = (shape, xxhash.xxh3_64_intdigest(memoryview(values).cast("B")))  # one pass, not pairwise
            if key in seen and np.array_equal(seen[key][1], values):
                tied.append((seen[key][0], name))
            seen.setdefault(key, (name, values))
    if tied:
        log(WARNING, "arrays %s hold the same values: if they are one tensor under two keys (tied weights), "
            "fl-sparse compresses them as two arrays and their copies drift apart; return one key per tensor "
            "and tie them again after loading", "; ".join(f"{a!r} and {b!r}" for a, b in tied[:5]))


def _warn_non_finite_metrics(server_round: int, aggregated: MetricRecord, updates: list[ClientUpdate]) -> None:
    """Say which nodes made an aggregated metric NaN or infinite (it stays as aggregated: the
    update itself was checked and taken; a diverged loss is worth seeing, not worth a round)."""
    bad = [k for k, v in aggregated.items() if is_number(v) and not math.isfinite(v)]
    if not bad:
        return
    nodes = sorted({
        u.node for u in updates for record in u.user_content.metric_records.values() for k in bad
        if is_number(record.get(k)) and not math.isfinite(record.get(k))
    })
    log(WARNING, "round %d: the clients' %s aggregated to a non-finite value; reported by node(s) %s",
        server_round, ", ".join(map(repr, bad[:5])), ", ".join(map(str, nodes[:10])) or "none (the aggregation)")


def _metric_names(shape: tuple[str, frozenset]) -> str:
    """A reply's MetricRecord as aggregate_evaluate compares them: its name and metrics (list lengths)."""
    items = sorted(shape[1], key=lambda kv: kv[0])
    return f"{shape[0]!r}: " + ", ".join(k if n is None else f"{k}[{n}]" for k, n in items)


def exception_reason(exc: BaseException) -> str:
    """An exception as a log reason: the message, with the type when it is not a protocol error."""
    return str(exc) if isinstance(exc, codec.PayloadError) else f"{type(exc).__name__}: {exc}"


def _record_bytes(record: ArrayRecord) -> int:
    return int(sum(len(array.data) for array in record.values()))


def _with_defaults(spec: dict[str, Any]) -> dict[str, Any]:
    spec = dict(spec)
    spec.setdefault("name", "none")
    return spec
