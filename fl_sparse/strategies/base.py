"""The base strategy: FedAvg whose uplink and downlink carry compressed sparse updates.

One round of :class:`SparseFedAvg` (sign convention of the seed papers: a
client's update is the *descent step* ``a = w_before - w_after``, so the
model moves by ``w <- w - update``)::

    server, configure_train(t):
        sample clients S_t
        for q in S_t: send sync_q (brings q's model copy to w_{t-1}, exactly)
                      + the uplink compressor spec C_up,t
    client q:
        w <- apply(sync_q);  assert hash(w) == hash(w_{t-1})
        Δ_q = w - SGD_H(w)                 H local steps
        a_q = e_q + Δ_q                    error compensation
        s_q = C_up,t(a_q)                  top-K / rTop-k / threshold / ...
        e_q <- a_q - decode(encode(s_q))   error keeps what was not sent
        reply encode(s_q)
    server, aggregate_train(t):
        g_t = Σ_q p_q s_q,   p_q = n_q / Σ n                    (uplink aggregate)
        ĝ_t = C_down(g_t + δ_{t-1});  δ_t = g_t + δ_{t-1} - ĝ_t   (server error, optional)
        w_t = w_{t-1} - ĝ_t

Without a downlink compressor ``ĝ_t = g_t`` (the sparse union of the uplink
updates): that is the paper's *unidirectional* top-K SGD (Algorithm 1); with
``C_down = TopK`` it is *bidirectional* top-K SGD (Algorithm 2).

**Keeping clients in sync.** Every client keeps its own copy of the model
and the server never sends the dense model after a client's first round.
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

Subclass and override the hooks :meth:`uplink_spec`,
:meth:`aggregate_updates` and :meth:`compress_downlink` to build new
methods; the named strategies in this package are small subclasses. Example,
a strategy that sends top-K with a ratio that halves every 10 rounds::

    from fl_sparse.strategies import SparseFedAvg

    class DecayingTopK(SparseFedAvg):
        def uplink_spec(self, server_round, num_clients):
            ratio = self.ratio * 0.5 ** ((server_round - 1) // 10)
            return {"name": "topk", "ratio": ratio}
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fl_sparse import codec
from fl_sparse.compressors import build_compressor
from fl_sparse.flat import FlatLayout, vector_hash
from fl_sparse.memory import ErrorFeedback
from fl_sparse.sparse import SparseTensor

__all__ = ["SparseFedAvg", "ServerState", "UPDATE_KEY", "SYNC_KEY"]

UPDATE_KEY = "update"  # ArrayRecord in a client's reply: the encoded sparse update
SYNC_KEY = "sync"  # ArrayRecord in a train message: brings the client's model up to date
DIAG_KEY = "diagnostics"  # ArrayRecord in a reply when diagnostics are on (dense a, step)
CLIENT_KEY = "client"  # ConfigRecord in a reply: model hash, version
METRICS_KEY = "metrics"  # MetricRecord in a reply


@dataclass
class ServerState:
    """What the server remembers between rounds (cf. powerSGD_hook's PowerSGDState).

    ``model`` is w_t, ``version`` the round that produced it (0 = initial),
    ``server_error`` is δ_t, ``history`` holds the positions changed by each
    applied update (to build catch-up payloads), ``client_versions`` the
    version each client holds and ``accepted`` the last round whose update
    from that client was aggregated.
    """

    layout: FlatLayout | None = None
    model: torch.Tensor | None = None
    version: int = 0
    server_error: ErrorFeedback = field(default_factory=ErrorFeedback)
    last_update_record: ArrayRecord | None = None
    history: "OrderedDict[int, torch.Tensor]" = field(default_factory=OrderedDict)
    client_versions: dict[int, int] = field(default_factory=dict)
    accepted: dict[int, int] = field(default_factory=dict)
    cumulative_total_error: float = 0.0
    round_metrics: dict[int, dict[str, Any]] = field(default_factory=dict)


class SparseFedAvg(FedAvg):
    """FedAvg with compressed uplink, optional compressed downlink, error feedback.

    Parameters
    ----------
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
    seed : int
        Seeds client sampling (a fixed seed gives the same run).
    diagnostics : bool
        Ask clients for their dense ``a_q`` and step ``Δ_q`` (not counted as
        traffic) to estimate ρ and ρ̂ of the bidirectional paper each round.
    fraction_train, min_train_nodes, min_available_nodes, ... :
        As in :class:`flwr.serverapp.strategy.FedAvg`. Federated evaluation is
        off by default (``fraction_evaluate=0``): evaluate centrally instead.
    """

    def __init__(
        self,
        *,
        uplink: dict[str, Any] | None = None,
        downlink=None,
        uplink_values: str = "fp32",
        uplink_positions: str = "raw",
        downlink_values: str = "fp32",
        downlink_positions: str = "raw",
        server_error_feedback: bool = True,
        client_error_feedback: bool = True,
        seed: int = 0,
        diagnostics: bool = False,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 0.0,
        min_train_nodes: int = 1,
        min_evaluate_nodes: int = 0,
        min_available_nodes: int = 1,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            **fedavg_kwargs,
        )
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction_train must be in (0, 1], got {fraction_train}")
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
        self.server_error_feedback = server_error_feedback
        self.client_error_feedback = client_error_feedback
        self.seed = seed
        self.diagnostics = diagnostics
        self.state = ServerState()
        self._round_compressor = None
        self._sync_cache: dict[int | None, tuple[str, ArrayRecord | None]] = {}
        self._local_steps = 1
        self.node_keys: dict[int, tuple[int, int]] = {}
        self._round_started = 0.0

    # ----------------------------------------------------------------- hooks
    def uplink_spec(self, server_round: int, num_clients: int) -> dict[str, Any]:
        """The uplink compressor spec for this round (override to vary it)."""
        return dict(self.uplink)

    def aggregate_updates(
        self, server_round: int, updates: list[SparseTensor], weights: list[float]
    ) -> SparseTensor:
        """g_t = Σ_q p_q s_q (override for other aggregation rules)."""
        return SparseTensor.sum(updates, weights)

    def compress_downlink(self, server_round: int, aggregate: SparseTensor) -> SparseTensor:
        """ĝ_t from g_t; keeps δ_t when a downlink compressor is set."""
        if self.downlink is None:
            return codec.lossy_roundtrip(aggregate, values=self.downlink_values)
        error = self.state.server_error
        compensated = error.compensate(aggregate.to_dense()) if self.server_error_feedback else aggregate.to_dense()
        sent = codec.lossy_roundtrip(self.downlink(compensated), values=self.downlink_values)
        if self.server_error_feedback:
            error.update(compensated, sent)
        return sent

    # --------------------------------------------------------------- summary
    def summary(self) -> None:
        super().summary()
        log(INFO, "\t├──> Uplink: %s  values=%s positions=%s", self.uplink, self.uplink_values, self.uplink_positions)
        log(
            INFO,
            "\t└──> Downlink: %s  values=%s positions=%s  server error feedback=%s",
            type(self.downlink).__name__ if self.downlink is not None else "aggregate as is",
            self.downlink_values,
            self.downlink_positions,
            self.server_error_feedback,
        )

    # ------------------------------------------------------------- sampling
    def sample(self, server_round: int, grid: Grid) -> list[int]:
        """Seeded sample of connected nodes, reproducible across runs.

        Flower's default sampling uses the global RNG over node ids, and node
        ids are random per run; here nodes are ordered by their stable client
        key (partition id, asked once per node with a ``query.identify``
        message) and drawn with an RNG seeded by (seed, round).
        """
        while len(all_nodes := sorted(grid.get_node_ids())) < self.min_available_nodes:
            log(INFO, "Waiting for nodes: %d connected, %d required", len(all_nodes), self.min_available_nodes)
            time.sleep(0.5)
        self._identify(grid, all_nodes)
        ordered = sorted(all_nodes, key=lambda n: (self.node_keys.get(n, (1 << 62, n)), n))
        size = max(int(len(ordered) * self.fraction_train), self.min_train_nodes)
        size = min(size, len(ordered))
        rng = random.Random(self.seed * 1_000_003 + server_round)
        return rng.sample(ordered, size)

    def _identify(self, grid: Grid, nodes: list[int]) -> None:
        """Learn the stable key of nodes seen for the first time (one small round trip)."""
        unknown = [n for n in nodes if n not in self.node_keys]
        if not unknown:
            return
        queries = [
            Message(content=RecordDict({"config": ConfigRecord()}), message_type="query.identify", dst_node_id=n)
            for n in unknown
        ]
        for reply in grid.send_and_receive(queries, timeout=60):
            node = reply.metadata.src_node_id
            if reply.has_error() or "client" not in reply.content.config_records:
                continue
            pid = reply.content.config_records["client"].get("partition-id", -1)
            if isinstance(pid, int) and pid >= 0:
                self.node_keys[node] = (pid, node)
        for n in unknown:
            self.node_keys.setdefault(n, (1 << 62, n))

    # -------------------------------------------------------- configure_train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients; send each the sync payload it needs and the uplink spec."""
        st = self.state
        if st.model is None:
            self.initialize(arrays)
        node_ids = self.sample(server_round, grid)
        spec = self.prepare_round(server_round, len(node_ids))
        base = ConfigRecord(dict(config))
        self._local_steps = max(1, int(config.get("local-steps", 1)))
        base["server-round"] = server_round
        base["uplink"] = json.dumps(spec, sort_keys=True)
        base["uplink-values"] = self.uplink_values
        base["uplink-positions"] = self.uplink_positions
        base["diagnostics"] = self.diagnostics
        base["error-feedback"] = self.client_error_feedback
        base["model-version"] = st.version
        base["model-hash"] = vector_hash(st.model)

        messages, modes, downlink_bytes = self.messages_with_sync(node_ids, base, MessageType.TRAIN)
        st.round_metrics.setdefault(server_round, {}).update({
            "round": server_round,
            "clients": len(node_ids),
            "downlink_bytes": downlink_bytes,
            "sync_modes": modes,
        })
        log(INFO, "configure_train: %d clients, downlink %s B, sync %s", len(node_ids), downlink_bytes, modes)
        return messages

    def messages_with_sync(
        self, node_ids: list[int], base: ConfigRecord, message_type: str, per_node=None
    ) -> tuple[list[Message], dict[str, int], int]:
        """One message per node: ``base`` config, the node's sync payload and protocol fields.

        ``per_node(node) -> dict`` adds node-specific config entries. Returns the
        messages, how many of each sync mode, and the sync bytes sent.
        """
        st = self.state
        messages, modes, total = [], {}, 0
        for node in node_ids:
            have = st.client_versions.get(node)
            mode, payload = self.sync_for(node)
            cfg = ConfigRecord(dict(base))
            cfg["sync-mode"] = mode
            cfg["base-version"] = -1 if have is None else have
            cfg["accepted-round"] = st.accepted.get(node, -1)
            for key, value in (per_node(node) if per_node else {}).items():
                cfg[key] = value
            content = RecordDict({self.configrecord_key: cfg})
            if payload is not None:
                content[SYNC_KEY] = payload
                total += codec.wire_size(payload).total_bytes
            modes[mode] = modes.get(mode, 0) + 1
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node))
        return messages, modes, total

    def sync_for(self, node: int) -> tuple[str, ArrayRecord | None]:
        """The sync payload for ``node`` (override to add modes); cached per version and round."""
        have = self.state.client_versions.get(node)
        if have not in self._sync_cache:
            self._sync_cache[have] = self.sync_payload(have)
        return self._sync_cache[have]

    def prepare_round(self, server_round: int, num_clients: int) -> dict[str, Any]:
        """Fix this round's uplink spec (validated here, before anything is sent)."""
        self._round_started = time.perf_counter()
        self._sync_cache: dict[int | None, tuple[str, ArrayRecord | None]] = {}
        spec = _with_defaults(self.uplink_spec(server_round, num_clients))
        self._round_compressor = build_compressor(**spec)
        return spec

    def initialize(self, arrays: ArrayRecord) -> None:
        """Take w_0 from the initial ArrayRecord (done by the first configure_train)."""
        st = self.state
        st.layout = FlatLayout.from_arrayrecord(arrays)
        st.model = st.layout.flatten(arrays).clone()
        st.version = 0
        st.server_error = ErrorFeedback(st.model.numel())

    def sync_payload(self, have: int | None) -> tuple[str, ArrayRecord | None]:
        """The cheapest exact way to bring a client from version ``have`` to now."""
        st = self.state
        if have == st.version:
            return "none", None
        if have is None or have < 0:
            return "dense", codec.encode_dense(st.model)
        if have == st.version - 1 and st.last_update_record is not None:
            return "delta", st.last_update_record
        dense = codec.encode_dense(st.model)
        missed = range(have + 1, st.version + 1)
        if all(v in st.history for v in missed):
            positions = torch.unique(torch.cat([st.history[v] for v in missed]))
            overwrite = SparseTensor(positions, st.model[positions].clone(), st.model.numel())
            record = codec.encode(overwrite, values="fp32", positions=self.downlink_positions)
            if codec.wire_size(record).total_bytes < codec.wire_size(dense).total_bytes:
                return "set", record
        return "dense", dense

    # -------------------------------------------------------- aggregate_train
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode, validate, aggregate, compress the downlink, update w."""
        st = self.state
        assert st.model is not None and st.layout is not None, "configure_train runs first"
        numel = st.model.numel()
        updates, weights, metrics, dense_diag = [], [], [], []
        failures, uplink_bytes, uplink_bits = 0, 0, []
        expected_hash = vector_hash(st.model)
        max_nnz = self._max_uplink_nnz(server_round, numel)
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                failures += 1
                self.drop_reply(server_round, "client %d failed: %s", node, msg.error.reason)
                continue
            try:
                update, wire, m, client_cfg = self._read_reply(msg, numel, max_nnz)
            except codec.PayloadError as exc:
                failures += 1
                self.drop_reply(server_round, "rejected reply from client %d: %s", node, exc)
                continue
            st.client_versions[node] = int(client_cfg.get("model-version", -1))
            if client_cfg.get("model-hash") != expected_hash:
                failures += 1
                self.drop_reply(server_round, "client %d trained from a different model; dropped", node)
                continue
            updates.append(update)
            uplink_bytes += wire.total_bytes
            uplink_bits.append((wire.position_bits, wire.value_bits))
            weights.append(float(m["num-examples"]))
            metrics.append(m)
            st.accepted[node] = server_round
            if self.diagnostics and DIAG_KEY in msg.content.array_records:
                dense_diag.append(msg.content.array_records[DIAG_KEY])

        rm = st.round_metrics.setdefault(server_round, {"round": server_round})
        rm["failures"] = failures
        rm["accepted"] = len(updates)
        if not updates:
            log(WARNING, "round %d: no valid update; global model unchanged", server_round)
            rm.update(self._empty_round_metrics())
            return None, MetricRecord({"accepted": 0, "failures": failures})

        total = sum(weights)
        p = [w / total for w in weights]
        aggregate = self.aggregate_updates(server_round, updates, p)
        delta_before = st.server_error.error.clone() if (self.diagnostics and self.downlink is not None) else None
        sent = self.compress_downlink(server_round, aggregate)
        record = codec.encode(sent, values=self.downlink_values, positions=self.downlink_positions)
        # The server applies exactly what the clients will decode.
        sent = codec.decode(record, numel)
        sent.add_(st.model, alpha=-1.0)
        st.version = server_round
        st.last_update_record = record
        st.history[server_round] = sent.indices
        self._prune_history()

        server_error_norm = st.server_error.norm() if self.downlink is not None else 0.0
        # Bits per parameter per local step (Q / (d H)), as in the SSGD-MV paper's Table 1:
        # uplink averaged over the clients, downlink for the update every client receives.
        d_h = numel * self._local_steps
        down = codec.wire_size(record)
        client_sq = sum(float(m["error-norm"]) ** 2 * pq for m, pq in zip(metrics, p))
        st.cumulative_total_error += sum(float(m["compression-error"]) * pq for m, pq in zip(metrics, p))
        rm.update(
            {
                "train_loss": sum(float(m["train-loss"]) * pq for m, pq in zip(metrics, p)),
                "uplink_bytes": uplink_bytes,
                "downlink_update_bytes": codec.wire_size(record).total_bytes,
                "density": sum(float(m["density"]) for m in metrics) / len(metrics),
                "downlink_density": sent.density,
                "aggregate_density": aggregate.density,
                "client_error_norm": math.sqrt(client_sq),
                "server_error_norm": server_error_norm,
                "cumulative_total_error": st.cumulative_total_error,
                "q_loc_up": sum(b[0] for b in uplink_bits) / len(uplink_bits) / d_h,
                "q_val_up": sum(b[1] for b in uplink_bits) / len(uplink_bits) / d_h,
                "q_loc_down": down.position_bits / d_h,
                "q_val_down": down.value_bits / d_h,
                "num_examples": int(total),
                "round_seconds": time.perf_counter() - self._round_started,
            }
        )
        if dense_diag:
            rm.update(self._rho_estimates(dense_diag, p, delta_before, aggregate))
        agg = MetricRecord(
            {k: v for k, v in rm.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        )
        return st.layout.unflatten(st.model), agg

    # ---------------------------------------------------------------- helpers
    def drop_reply(self, server_round: int, why: str, node: int, *args: Any) -> None:
        """Log why ``node``'s reply was not used and forget which model it holds.

        ``why`` is a %-format whose first field is the node. The client's state
        is then unknown, so its next message carries the dense model.
        """
        self.state.client_versions.pop(node, None)
        log(WARNING, "round %d: " + why, server_round, node, *args)

    def _max_uplink_nnz(self, server_round: int, numel: int) -> int:
        """Cap on entries a client may declare (guards allocation on decode)."""
        k_for = getattr(self._round_compressor, "k_for", None)
        return numel if k_for is None else min(numel, int(k_for(numel)))

    def _read_reply(self, msg: Message, numel: int, max_nnz: int):
        record, m, client = read_reply_records(msg.content, UPDATE_KEY)
        if not isinstance(client.get("model-version"), int) or not isinstance(client.get("model-hash"), str):
            raise codec.PayloadError("client record needs an int 'model-version' and a str 'model-hash'")
        update = codec.decode(record, numel, max_nnz=max_nnz)
        # Count what arrived, not what the client says it sent.
        return update, codec.wire_size(record), m, client

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
        with Top_K the downlink compressor (or the uplink one if none) and
        Σ Top_K(p a) = g_t, the aggregate of what was actually sent.
        """
        a = sum(pq * torch.from_numpy(d["a"].numpy()).float() for d, pq in zip(diag, p))
        step = sum(pq * torch.from_numpy(d["step"].numpy()).float() for d, pq in zip(diag, p))
        step_norm = float(step.norm())
        if step_norm == 0.0:
            return {}
        top = self.downlink or build_compressor(**_with_defaults(self.uplink))
        g = aggregate.to_dense()
        rho_hat = float((top(a).to_dense() - g).norm()) / step_norm
        out = {"rho_hat": rho_hat}
        if delta_before is not None:
            rho = float((top(delta_before + a).to_dense() - top(delta_before + g).to_dense()).norm()) / step_norm
            out["rho"] = rho
        return out


CLIENT_METRICS = ("num-examples", "train-loss", "density", "error-norm", "compression-error")


def read_reply_records(content: RecordDict, payload_key: str) -> tuple[ArrayRecord, MetricRecord, ConfigRecord]:
    """The payload, metrics and client records of a train reply, checked.

    Raises :class:`fl_sparse.codec.PayloadError` naming what is missing or
    wrong: a record, a metric, a non-finite or negative number, no examples.
    """
    if payload_key not in content.array_records:
        raise codec.PayloadError(f"reply has no '{payload_key}' ArrayRecord")
    if METRICS_KEY not in content.metric_records:
        raise codec.PayloadError(f"reply has no '{METRICS_KEY}' MetricRecord")
    if CLIENT_KEY not in content.config_records:
        raise codec.PayloadError(f"reply has no '{CLIENT_KEY}' ConfigRecord")
    m = content.metric_records[METRICS_KEY]
    for key in CLIENT_METRICS:
        if key not in m:
            raise codec.PayloadError(f"reply metrics lack '{key}'")
        v = m[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise codec.PayloadError(f"metric {key!r} must be a finite number, got {v!r}")
        if key != "train-loss" and float(v) < 0:
            raise codec.PayloadError(f"metric {key!r} must be >= 0, got {v!r}")
    if float(m["num-examples"]) <= 0:
        raise codec.PayloadError(f"num-examples must be positive, got {m['num-examples']!r}")
    return content.array_records[payload_key], m, content.config_records[CLIENT_KEY]


def _with_defaults(spec: dict[str, Any]) -> dict[str, Any]:
    spec = dict(spec)
    spec.setdefault("name", "none")
    return spec
