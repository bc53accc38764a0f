r"""Sparse SGD with majority voting: SSGD-MV, SSGD-MV-RS and SSGD-MV-AD.

Ozfatura, Ozfatura and Gündüz, *Distributed sparse SGD with majority
voting* (``shared/papers/ssgd-majority-voting.txt``, Algorithms 1 and 2).
The clients first agree on one sparsity mask by a vote, then all send their
compensated update on that common mask, so the aggregate is as sparse as
each upload (top-K is *linear* on a common mask) and the downlink costs the
same K values as the uplink.

One round ``t`` (project sign convention: ``Δ = w_before − w_after``, the
model moves by ``w ← w − ĝ``)::

    server  configure_train(t):
              sample S_t; send each q the sync payload for w_{t-1} ─ phase 1, "train.vote"
    client q  w ← sync(w);  Δ_q = w − SGD_H(w);  a_q = e_q + Δ_q
              M_q = supp Top_K(a_q)                           (Alg. 1 l. 9-10)
              MV / RS: reply M_q  (K positions)
              AD:      M̃_q = M̃_q' + add − drop, |add| = |drop| ≤ K_ad  (Alg. 2 l. 11-15)
                       reply add, drop  (a full M_q on first participation)
              keep a_q (dense) until phase 2
    server    MV: M_t = Top_K(Σ_q M_q)                        (Alg. 1 l. 14)
              RS: M_t = K distinct positions drawn ∝ Σ_q M_q without replacement (l. 15)
              AD: M_sum += Σ_q (add_q − drop_q); M_t = Top_K(M_sum)   (Alg. 2 l. 20-22)
              send M_t to the voters ─ phase 2, "train.values"
    client q  s_q = a_q[M_t] (quantized: Q(a_q[M_t])); e_q ← a_q − s_q;  reply s_q (values only)
    server  aggregate_train(t):
              g_t = Σ_q p_q s_q on M_t;  w_t = w_{t-1} − g_t
              next round: a client that took part in round t gets g_t as *values only*
              (sync mode "values": it knows M_t), any other client the base's sync.

Why the vote happens inside ``configure_train``
-----------------------------------------------
Flower's :meth:`Strategy.start` sends what ``configure_train`` returns and
hands the replies to ``aggregate_train``. Here ``configure_train`` runs the
whole vote phase itself (``grid.send_and_receive`` of the ``train.vote``
messages, tally, mask selection) and returns the ``train.values`` messages,
which ``start`` sends; ``aggregate_train`` aggregates the value replies.
So both phases use the Grid, and Flower's own round loop (``Result``,
``evaluate_fn``, federated evaluation, logging) is reused unchanged instead
of being copied into an overridden ``start`` (which is overridden only to
remember the ``timeout`` for the vote phase).

Mask selection
--------------
* ``selection="majority"`` (SSGD-MV): the K positions with the most votes.
  Ties at the K-th count are broken by a pseudo-random order seeded by
  (``seed``, round): reproducible, and not biased toward low indices
  (``tie_break="index"`` takes the lowest positions instead). If fewer than
  K positions got a vote, the mask is filled with unvoted positions (random,
  or lowest with ``tie_break="index"``); the mask always has K positions.
* ``selection="weighted"`` (SSGD-MV-RS): K distinct voted positions drawn
  with probability proportional to their vote count, without replacement,
  vectorised as an exponential race: keys ``−log(U_i)/w_i`` (``U_i`` uniform
  from a ``torch.Generator`` seeded by (``seed``, round)), the K smallest
  keys win. This is exactly sequential weighted sampling without
  replacement; no Python loop per draw.

Add-drop votes (SSGD-MV-AD) and partial participation
-----------------------------------------------------
Each client keeps its current vote ``M̃_q`` (exactly K positions). A round
adds the ``n`` largest-``|a|`` positions of ``Top_K(a) \ M̃_q`` and drops the
``n`` smallest-``|a|`` positions of ``M̃_q \ Top_K(a)``, with ``n = min(K_ad,
|Top_K(a) \ M̃_q|)`` (both differences have the same size, so the vote stays
K), and sends only the adds and the drops. A client without a previous vote
(first participation, lost state) sends a full top-K vote.

**Semantics: a client's last vote stands while it is absent.** ``M_sum``
always equals the sum of the current votes of every client the server has
ever accepted a vote from, participating this round or not; ``M_t =
Top_K(M_sum)``. This is Algorithm 2's ``M_sum`` carried over to partial
participation unchanged (with full participation it *is* Algorithm 2).

To keep ``M_sum`` exact when things go wrong the server also keeps each
client's current vote (``votes[node] = (round, positions)``; 4·K bytes per
client known, e.g. 447 kB for ResNet-18 at φ = 0.01), beyond the paper's PS
which keeps only ``M_sum``. It is needed because:

* a client that lost its state sends a full vote, and its stale vote must
  leave ``M_sum`` -- only the server can know what it was;
* a vote reply that is lost or rejected must not desynchronise the two
  sides. Every vote message says which of the client's votes ``M_sum``
  holds (``vote-round``, −1 for none). The client keeps the vote it last
  sent and the one before; it sends add/drop relative to the vote of that
  round if it still has it, a full vote otherwise. The server applies
  add/drop only if the client's base round matches its own record;
* the server checks that drops are in, and adds are not in, the client's
  vote (a malformed or hostile reply cannot make ``M_sum`` negative).

A vote that was applied stays applied even if the client's value reply of
that round then fails (the vote was valid; only the values are lost and go
back into the client's error memory).

Communication accounting
------------------------
Per round, ``state.round_metrics[t]`` holds the base's keys plus
``q_loc_up``, ``q_val_up``, ``q_loc_down``, ``q_val_down``: bits per
parameter per local step, ``Q / (d·H)``, as in Table 1 of the paper, taken
from the payloads actually encoded that round (``codec.wire_size``'s
``position_bits`` / ``value_bits``: the meaningful bits of the position
stream and of the values including quantizer side information; the 72-byte
record header and byte padding are excluded, they are in the byte counts):

* ``q_loc_up``: mean over the clients whose vote was accepted of their vote
  payload (full vote, or adds + drops);
* ``q_val_up``: mean over the accepted value replies;
* ``q_loc_down``: the mask ``M_t`` sent to each voter;
* ``q_val_down``: the aggregate's values on ``M_t``, which every client of
  round ``t`` receives at its next participation (sync mode ``"values"``).

``uplink_bytes`` / ``downlink_bytes`` count every byte of every record sent
this round (votes + values up; sync payloads + masks down).

Client memory
-------------
Between the two phases a client keeps its compensated vector ``a`` (dense,
4·d bytes, in ``ClientState.extra``) next to its model copy and error
memory; plus the last mask (8·K bytes) and, for AD, two votes (16·K bytes).
See :mod:`fl_sparse.clients.ssgd_mv`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fl_sparse import codec
from fl_sparse.compressors import TopK
from fl_sparse.flat import vector_hash
from fl_sparse.sparse import SparseTensor
from fl_sparse.strategies.base import CLIENT_KEY, SparseFedAvg, read_reply_records

__all__ = [
    "SSGDMajorityVote",
    "build_ssgd_mv",
    "vote_counts",
    "select_majority",
    "select_weighted",
    "VOTE_MESSAGE_TYPE",
    "VALUES_MESSAGE_TYPE",
]

VOTE_MESSAGE_TYPE = "train.vote"
VALUES_MESSAGE_TYPE = "train.values"

# record keys (server <-> client)
VOTE_KEY = "vote"  # full vote: K positions
ADD_KEY = "vote-add"  # add-drop vote: positions added ...
DROP_KEY = "vote-drop"  # ... and dropped
MASK_KEY = "mask"  # phase 2 request: the common mask M_t
VALUES_KEY = "update"  # phase 2 reply: a_q on M_t (values only)

SELECTIONS = ("majority", "weighted")
TIE_BREAKS = ("random", "index")


# ====================================================================== mask selection
def vote_counts(votes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, counts) of a list of votes: sorted distinct positions and how many votes each got."""
    if not votes:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty
    positions, counts = torch.unique(torch.cat([v.to(torch.int64) for v in votes]), sorted=True, return_counts=True)
    return positions, counts


def _round_generator(seed: int, server_round: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(server_round)) * 7_919 + salt)


def _fill(chosen: torch.Tensor, voted: torch.Tensor, k: int, numel: int, generator: torch.Generator | None) -> torch.Tensor:
    """``chosen`` plus ``k − len(chosen)`` positions that got no vote (random, or lowest without a generator)."""
    need = k - chosen.numel()
    if need <= 0:
        return chosen.sort().values
    free = torch.ones(numel, dtype=torch.bool)
    free[voted] = False
    candidates = torch.nonzero(free).flatten()
    if generator is not None:
        keys = torch.rand(candidates.numel(), generator=generator)
        candidates = candidates[torch.topk(keys, need, largest=False).indices]
    else:
        candidates = candidates[:need]
    return torch.cat([chosen, candidates]).sort().values


def select_majority(
    positions: torch.Tensor,
    counts: torch.Tensor,
    k: int,
    numel: int,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sorted int64 mask: the ``k`` positions with the most votes (Alg. 1 l. 14 / Alg. 2 l. 22).

    ``positions`` are the voted positions (sorted, distinct), ``counts`` their
    vote counts (> 0). Ties at the k-th count: a random subset drawn with
    ``generator`` (seeded by the caller: reproducible), or the lowest
    positions if ``generator`` is None. Fewer than ``k`` voted positions:
    filled up with unvoted ones the same way.
    """
    k = max(0, min(int(k), numel))
    n = positions.numel()
    if n <= k:
        return _fill(positions.to(torch.int64), positions, k, numel, generator)
    counts = counts.to(torch.int64)
    kth = torch.kthvalue(counts, n - k + 1).values
    above = positions[counts > kth]
    tied = positions[counts == kth]
    need = k - above.numel()
    if generator is not None:
        tied = tied[torch.randperm(tied.numel(), generator=generator)[:need]]
    else:
        tied = tied[:need]
    return torch.cat([above, tied]).to(torch.int64).sort().values


def select_weighted(
    positions: torch.Tensor,
    counts: torch.Tensor,
    k: int,
    numel: int,
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """Sorted int64 mask of ``k`` distinct positions drawn ∝ votes without replacement (Alg. 1 l. 15).

    Exponential race: position ``i`` gets the key ``E_i = −log(U_i) / w_i``
    (``E_i ~ Exp(w_i)``); the ``k`` smallest keys are the first ``k`` draws of
    sequential sampling without replacement with probabilities ∝ ``w``.
    """
    k = max(0, min(int(k), numel))
    n = positions.numel()
    if n <= k:
        return _fill(positions.to(torch.int64), positions, k, numel, generator)
    w = counts.to(torch.float64)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    keys = -torch.log(u) / w  # u == 0 gives +inf: never drawn (probability 2**-53)
    chosen = positions[torch.topk(keys, k, largest=False, sorted=False).indices]
    return chosen.to(torch.int64).sort().values


# ====================================================================== strategy
class SSGDMajorityVote(SparseFedAvg):
    """SSGD-MV (Algorithm 1), SSGD-MV-RS and SSGD-MV-AD (Algorithm 2) on Flower's Grid.

    Parameters
    ----------
    ratio, k : float, int
        Vote / mask size K = ceil(ratio·d) (or ``k``).
    selection : "majority" | "weighted"
        Top-K of the vote counts (SSGD-MV) or vote-weighted random selection (SSGD-MV-RS).
    add_drop_ratio, add_drop_k : float, int, optional
        Enable add-drop votes (SSGD-MV-AD) with K_ad = ceil(add_drop_ratio·d)
        (or ``add_drop_k``) changes per round; ``None`` for full votes.
    uplink_values : str
        Value code of the clients' values ("fp32", "fp16", "q4", ...).
    downlink_values : str
        Value code of the aggregate sent back (the paper keeps fp32). With a
        lossy code the server keeps its error δ on the mask (``server_error_feedback``).
    positions : str
        Position code of votes and mask: "block" (the paper's), "rice" or "raw".
    tie_break : "random" | "index"
        How ties at the K-th vote count are broken (seeded random, or lowest positions).
    seed : int
        Seeds client sampling, tie-breaking and RS draws.
    **kwargs :
        As :class:`~fl_sparse.strategies.base.SparseFedAvg` (``fraction_train``, ...).
        ``diagnostics`` (ρ estimates) is not supported here and is ignored.
    """

    def __init__(
        self,
        *,
        ratio: float | None = 0.01,
        k: int | None = None,
        selection: str = "majority",
        add_drop_ratio: float | None = None,
        add_drop_k: int | None = None,
        uplink_values: str = "fp32",
        downlink_values: str = "fp32",
        positions: str = "block",
        tie_break: str = "random",
        **kwargs: Any,
    ) -> None:
        if k is not None:
            ratio = None
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")
        budget = {"k": int(k)} if k is not None else {"ratio": float(ratio)}
        self.vote_compressor = TopK(**budget)
        self.add_drop = add_drop_ratio is not None or add_drop_k is not None
        self.add_drop_compressor = None
        if self.add_drop:
            if add_drop_k is not None:
                self.add_drop_compressor = TopK(int(add_drop_k))
            else:
                if not 0.0 < float(add_drop_ratio) <= (1.0 if ratio is None else float(ratio)):
                    raise ValueError(f"add_drop_ratio must be in (0, ratio], got {add_drop_ratio}")
                self.add_drop_compressor = TopK(ratio=float(add_drop_ratio))
        if kwargs.pop("diagnostics", False):
            log(WARNING, "SSGDMajorityVote: diagnostics (rho estimates) are not supported; ignored")
        super().__init__(
            uplink={"name": "topk", **budget},
            downlink=None,
            uplink_values=uplink_values,
            downlink_values=downlink_values,
            uplink_positions=positions,
            downlink_positions=positions,
            diagnostics=False,
            **kwargs,
        )
        self.selection = selection
        self.tie_break = tie_break
        self.positions = positions
        # add-drop bookkeeping: M_sum and each client's current vote (see module docstring)
        self.m_sum: torch.Tensor | None = None
        self.votes: dict[int, tuple[int, torch.Tensor]] = {}
        # the last round's mask and the values-only record of its aggregate
        self.mask: torch.Tensor | None = None
        self.mask_round: int = -1
        self.values_record: ArrayRecord | None = None
        self._voters: dict[int, int] = {}  # node -> round, voters of the current round
        self._round: dict[str, Any] = {}
        self._round_mask: torch.Tensor | None = None
        self._timeout: float = 3600.0

    # ------------------------------------------------------------------ budget
    def k_for(self, numel: int) -> int:
        return self.vote_compressor.k_for(numel)

    def k_ad_for(self, numel: int) -> int:
        return 0 if self.add_drop_compressor is None else min(self.add_drop_compressor.k_for(numel), self.k_for(numel))

    # ------------------------------------------------------------------ Flower loop
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600, *args, **kwargs):
        """Flower's round loop, unchanged; only remembers ``timeout`` for the vote phase."""
        self._timeout = float(timeout)
        return super().start(grid, initial_arrays, num_rounds, timeout, *args, **kwargs)

    def summary(self) -> None:
        super().summary()
        log(
            INFO,
            "\t└──> SSGD-MV: selection=%s add-drop=%s tie-break=%s",
            self.selection,
            self.add_drop_compressor if self.add_drop else "off",
            self.tie_break,
        )

    def initialize(self, arrays: ArrayRecord) -> None:
        super().initialize(arrays)
        self.m_sum = torch.zeros(self.state.model.numel(), dtype=torch.int32) if self.add_drop else None
        self.votes.clear()
        self.mask, self.mask_round, self.values_record = None, -1, None

    # ------------------------------------------------------------------ phase 1: vote
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Phase 1 (vote) on the grid, then return the phase-2 (values) messages."""
        st = self.state
        if st.model is None:
            self.initialize(arrays)
        numel = st.model.numel()
        node_ids = self.sample(server_round, grid)
        self.prepare_round(server_round, len(node_ids))
        k, k_ad = self.k_for(numel), self.k_ad_for(numel)
        local_steps = max(1, int(config.get("local-steps", 1)))
        self._round = {"round": server_round, "k": k, "k_ad": k_ad, "local_steps": local_steps, "numel": numel}

        vote_msgs, modes, sync_bytes = self.vote_messages(server_round, node_ids, config)
        replies = grid.send_and_receive(vote_msgs, timeout=self._timeout) if vote_msgs else []
        tally = self.tally_votes(server_round, replies)
        mask = self.select_mask(server_round, tally["votes"])
        mask_record = codec.encode_positions(mask, numel, positions=self.positions)
        mask_size = codec.wire_size(mask_record)
        self._voters = {node: server_round for node in tally["nodes"]}
        self._round_mask = mask

        values_cfg = ConfigRecord(dict(config))
        values_cfg["server-round"] = server_round
        values_cfg["vote-k"] = k
        values_cfg["uplink-values"] = self.uplink_values
        values_cfg["error-feedback"] = self.client_error_feedback
        messages = []
        for node in tally["nodes"]:
            content = RecordDict({self.configrecord_key: ConfigRecord(dict(values_cfg)), MASK_KEY: mask_record})
            messages.append(Message(content=content, message_type=VALUES_MESSAGE_TYPE, dst_node_id=node))

        d_h = numel * local_steps
        rm = st.round_metrics.setdefault(server_round, {"round": server_round})
        rm.update(
            {
                "round": server_round,
                "clients": len(node_ids),
                "sync_modes": modes,
                "vote_accepted": len(tally["nodes"]),
                "vote_failures": tally["failures"],
                "vote_uplink_bytes": tally["bytes"],
                "mask_bytes": mask_size.total_bytes,
                "downlink_bytes": sync_bytes + mask_size.total_bytes * len(messages),
                "q_loc_up": (sum(tally["bits"]) / len(tally["bits"]) / d_h) if tally["bits"] else float("nan"),
                "q_loc_down": mask_size.position_bits / d_h,
                "vote_changes": (sum(tally["changes"]) / len(tally["changes"])) if tally["changes"] else 0.0,
                "mask_vote_share": self._round.get("mask_vote_share", float("nan")),
            }
        )
        log(
            INFO,
            "configure_train: %d clients, %d votes accepted, mask K=%d, downlink %s B, sync %s",
            len(node_ids), len(tally["nodes"]), k, rm["downlink_bytes"], modes,
        )
        return messages

    def vote_messages(
        self, server_round: int, node_ids: list[int], config: ConfigRecord
    ) -> tuple[list[Message], dict[str, int], int]:
        """Phase-1 messages: the sync payload each client needs, and the vote spec."""
        st = self.state
        numel = st.model.numel()
        base = ConfigRecord(dict(config))
        base["server-round"] = server_round
        base["vote-k"] = self.k_for(numel)
        base["add-drop-k"] = self.k_ad_for(numel)
        base["vote-positions"] = self.positions
        base["uplink-values"] = self.uplink_values
        base["error-feedback"] = self.client_error_feedback
        base["model-version"] = st.version
        base["model-hash"] = vector_hash(st.model)
        base["mask-round"] = self.mask_round

        def vote_round(node: int) -> dict[str, int]:
            return {"vote-round": self.votes[node][0] if node in self.votes else -1}

        return self.messages_with_sync(node_ids, base, VOTE_MESSAGE_TYPE, per_node=vote_round)

    def sync_for(self, node: int) -> tuple[str, ArrayRecord | None]:
        """``"values"`` (the last aggregate's values on the last mask) for a client of the last round, else the base's sync."""
        st = self.state
        have = st.client_versions.get(node)
        if (
            have is not None
            and have == st.version - 1
            and st.accepted.get(node) == st.version
            and self.mask_round == st.version
            and self.values_record is not None
        ):
            return "values", self.values_record
        return super().sync_for(node)

    def tally_votes(self, server_round: int, replies: Iterable[Message]) -> dict[str, Any]:
        """Validate the vote replies; for AD update ``M_sum`` and the clients' votes.

        Returns the accepted nodes, this round's votes (MV/RS), the bits and
        bytes of each accepted vote, the number of add-drop changes and the failures.
        """
        st = self.state
        numel = st.model.numel()
        k, k_ad = self.k_for(numel), self.k_ad_for(numel)
        expected_hash = vector_hash(st.model)
        nodes, votes, bits, changes = [], [], [], []
        failures, nbytes = 0, 0
        for msg in sorted(replies, key=lambda m: self._order(m.metadata.src_node_id)):
            node = msg.metadata.src_node_id
            if msg.has_error():
                failures += 1
                self.drop_reply(server_round, "client %d failed to vote: %s", node, msg.error.reason)
                continue
            try:
                parsed = self._read_vote(msg, numel, k, k_ad, node)
            except codec.PayloadError as exc:
                failures += 1
                self.drop_reply(server_round, "rejected vote from client %d: %s", node, exc)
                continue
            client_cfg = parsed["client"]
            st.client_versions[node] = int(client_cfg.get("model-version", -1))
            if client_cfg.get("model-hash") != expected_hash:
                failures += 1
                self.drop_reply(server_round, "client %d trained from a different model; vote dropped", node)
                continue
            if self.add_drop:
                self._apply_vote(node, server_round, parsed)
                changes.append(parsed["changes"])
            else:
                votes.append(parsed["vote"])
            nodes.append(node)
            bits.append(parsed["bits"])
            nbytes += parsed["bytes"]
        return {"nodes": nodes, "votes": votes, "bits": bits, "bytes": nbytes, "changes": changes, "failures": failures}

    def _read_vote(self, msg: Message, numel: int, k: int, k_ad: int, node: int) -> dict[str, Any]:
        content = msg.content
        if CLIENT_KEY not in content.config_records:
            raise codec.PayloadError(f"vote reply has no '{CLIENT_KEY}' ConfigRecord")
        client_cfg = content.config_records[CLIENT_KEY]
        kind = client_cfg.get("vote-kind", "full")
        arrays = content.array_records
        if kind == "full":
            if VOTE_KEY not in arrays:
                raise codec.PayloadError(f"full vote without a '{VOTE_KEY}' record")
            vote = codec.decode_positions(arrays[VOTE_KEY], numel, max_nnz=k)
            if vote.numel() != k:
                raise codec.PayloadError(f"a vote must have exactly K={k} positions, got {vote.numel()}")
            sizes = [codec.wire_size(arrays[VOTE_KEY])]
            out = {"kind": "full", "vote": vote, "changes": k}
        elif kind == "add-drop":
            if not self.add_drop:
                raise codec.PayloadError("add-drop vote, but this strategy takes full votes")
            if ADD_KEY not in arrays or DROP_KEY not in arrays:
                raise codec.PayloadError(f"add-drop vote needs '{ADD_KEY}' and '{DROP_KEY}' records")
            adds = codec.decode_positions(arrays[ADD_KEY], numel, max_nnz=k_ad)
            drops = codec.decode_positions(arrays[DROP_KEY], numel, max_nnz=k_ad)
            if adds.numel() != drops.numel():
                raise codec.PayloadError(f"{adds.numel()} adds but {drops.numel()} drops")
            base_round = client_cfg.get("vote-base-round", -2)
            if node not in self.votes or self.votes[node][0] != base_round:
                raise codec.PayloadError(f"add-drop relative to vote of round {base_round}, which the server does not hold")
            prev = self.votes[node][1].to(torch.int64)
            if adds.numel() and bool(_member(adds, prev).any()):
                raise codec.PayloadError("an added position is already in the client's vote")
            if drops.numel() and not bool(_member(drops, prev).all()):
                raise codec.PayloadError("a dropped position is not in the client's vote")
            sizes = [codec.wire_size(arrays[ADD_KEY]), codec.wire_size(arrays[DROP_KEY])]
            out = {"kind": "add-drop", "adds": adds, "drops": drops, "changes": int(adds.numel())}
        else:
            raise codec.PayloadError(f"unknown vote-kind {kind!r}")
        out["client"] = client_cfg
        out["bits"] = sum(s.position_bits for s in sizes)
        out["bytes"] = sum(s.total_bytes for s in sizes)
        return out

    def _apply_vote(self, node: int, server_round: int, parsed: dict[str, Any]) -> None:
        """M_sum += new vote − old vote (Alg. 2 l. 20); remember the client's new vote."""
        m_sum = self.m_sum
        assert m_sum is not None
        if parsed["kind"] == "full":
            if node in self.votes:  # a stale vote (lost client state): take it out first
                m_sum.index_add_(0, self.votes[node][1].to(torch.int64), _ones(self.votes[node][1].numel(), -1))
            new = parsed["vote"]
            m_sum.index_add_(0, new, _ones(new.numel(), 1))
        else:
            adds, drops = parsed["adds"], parsed["drops"]
            prev = self.votes[node][1].to(torch.int64)
            m_sum.index_add_(0, adds, _ones(adds.numel(), 1))
            m_sum.index_add_(0, drops, _ones(drops.numel(), -1))
            keep = prev[~_member(prev, drops)] if drops.numel() else prev
            new = torch.cat([keep, adds]).sort().values
        self.votes[node] = (server_round, new.to(torch.int32 if m_sum.numel() <= 2**31 - 1 else torch.int64))

    def select_mask(self, server_round: int, votes: list[torch.Tensor]) -> torch.Tensor:
        """M_t from this round's votes (MV, RS) or from M_sum (AD)."""
        numel = self.state.model.numel()
        k = self.k_for(numel)
        if self.add_drop:
            positions = torch.nonzero(self.m_sum).flatten()
            counts = self.m_sum[positions]
        else:
            positions, counts = vote_counts(votes)
        if self.selection == "weighted":
            mask = select_weighted(positions, counts, k, numel, generator=_round_generator(self.seed, server_round, 2))
        else:
            gen = _round_generator(self.seed, server_round, 1) if self.tie_break == "random" else None
            mask = select_majority(positions, counts, k, numel, generator=gen)
        # share of all votes that landed on the mask (1.0: the mask holds every vote)
        total = int(counts.sum())
        self._round["mask_vote_share"] = (
            int(counts[_member(positions, mask)].sum()) / total if total else float("nan")
        )
        return mask

    # ------------------------------------------------------------------ phase 2: values
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the values on the common mask; update w; keep the downlink records."""
        st = self.state
        assert st.model is not None and st.layout is not None, "configure_train runs first"
        numel = st.model.numel()
        mask = self._round_mask
        rm = st.round_metrics.setdefault(server_round, {"round": server_round})
        local_steps = self._round.get("local_steps", 1)
        d_h = numel * local_steps
        updates, weights, metrics, value_bits = [], [], [], []
        failures, uplink_bytes = 0, 0
        for msg in sorted(replies, key=lambda m: self._order(m.metadata.src_node_id)):
            node = msg.metadata.src_node_id
            if msg.has_error():
                failures += 1
                self.drop_reply(server_round, "client %d failed in the values phase: %s", node, msg.error.reason)
                continue
            try:
                if mask is None or self._voters.get(node) != server_round:
                    raise codec.PayloadError("values from a client that was not asked for them this round")
                values, size, m = self._read_values(msg, server_round, mask.numel())
            except codec.PayloadError as exc:
                failures += 1
                self.drop_reply(server_round, "rejected values from client %d: %s", node, exc)
                continue
            updates.append(values)
            weights.append(float(m["num-examples"]))
            metrics.append(m)
            value_bits.append(size.value_bits)
            uplink_bytes += size.total_bytes
            st.accepted[node] = server_round
        self._voters = {}

        rm["failures"] = rm.get("vote_failures", 0) + failures
        rm["accepted"] = len(updates)
        rm["uplink_bytes"] = rm.get("vote_uplink_bytes", 0) + uplink_bytes
        if not updates:
            log(WARNING, "round %d: no valid update; global model unchanged", server_round)
            rm.update(self._empty_round_metrics())
            rm["uplink_bytes"] = rm.get("vote_uplink_bytes", 0)
            rm.update({"q_val_up": float("nan"), "q_val_down": float("nan")})
            return None, MetricRecord({"accepted": 0, "failures": rm["failures"]})

        total = sum(weights)
        p = [w / total for w in weights]
        aggregate = torch.zeros(mask.numel(), dtype=torch.float32)
        for v, pq in zip(updates, p):
            aggregate.add_(v, alpha=pq)
        raw = self.downlink_values_for(aggregate, mask)
        values_record = codec.encode_values(raw, values=self.downlink_values)
        sent = SparseTensor(mask, codec.decode_values(values_record, mask.numel()), numel)
        # Non-participants of this round may get it as a classic "delta" sync: same values, with positions.
        sparse_record = codec.encode(SparseTensor(mask, raw, numel), values=self.downlink_values, positions=self.positions)
        sent.add_(st.model, alpha=-1.0)  # w_t = w_{t-1} − g_t, exactly what the clients will apply
        st.version = server_round
        st.last_update_record = sparse_record
        st.history[server_round] = mask
        self._prune_history()
        self.mask, self.mask_round, self.values_record = mask, server_round, values_record

        vsize = codec.wire_size(values_record)
        server_error_norm = st.server_error.norm() if self._lossy_downlink() else 0.0
        client_sq = sum(float(m["error-norm"]) ** 2 * pq for m, pq in zip(metrics, p))
        st.cumulative_total_error += sum(float(m["compression-error"]) * pq for m, pq in zip(metrics, p))
        rm.update(
            {
                "train_loss": sum(float(m["train-loss"]) * pq for m, pq in zip(metrics, p)),
                "downlink_update_bytes": vsize.total_bytes,
                "density": mask.numel() / numel,
                "downlink_density": mask.numel() / numel,
                "aggregate_density": mask.numel() / numel,
                "client_error_norm": math.sqrt(client_sq),
                "server_error_norm": server_error_norm,
                "cumulative_total_error": st.cumulative_total_error,
                "num_examples": int(total),
                "q_val_up": sum(value_bits) / len(value_bits) / d_h,
                "q_val_down": vsize.value_bits / d_h,
                "round_seconds": time.perf_counter() - self._round_started,
            }
        )
        agg = MetricRecord(
            {k: v for k, v in rm.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        )
        return st.layout.unflatten(st.model), agg

    def _lossy_downlink(self) -> bool:
        return self.downlink_values != "fp32" and self.server_error_feedback

    def downlink_values_for(self, aggregate: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The values to encode for the downlink: g_t on M_t, plus the server error δ if the code is lossy."""
        if not self._lossy_downlink():
            return aggregate
        error = self.state.server_error
        numel = self.state.model.numel()
        dense = torch.zeros(numel, dtype=torch.float32)
        dense[mask] = aggregate
        compensated = error.compensate(dense)
        raw = compensated[mask]
        error.update(compensated, codec.lossy_roundtrip(SparseTensor(mask, raw, numel), values=self.downlink_values))
        return raw

    def _read_values(self, msg: Message, server_round: int, k: int):
        record, m, client = read_reply_records(msg.content, VALUES_KEY)
        if client.get("server-round") != server_round:
            raise codec.PayloadError("values reply for another round")
        values = codec.decode_values(record, k)
        return values, codec.wire_size(record), m

    # ------------------------------------------------------------------ helpers
    def _order(self, node: int) -> tuple[int, int]:
        """Replies in a fixed order (by stable client key): reproducible float sums."""
        return self.node_keys.get(node, (1 << 62, node))

    def check_vote_invariants(self) -> None:
        """Raise AssertionError unless M_sum is the sum of the stored votes and each has K positions (AD)."""
        if not self.add_drop:
            return
        numel = self.state.model.numel()
        k = self.k_for(numel)
        expected = torch.zeros(numel, dtype=torch.int32)
        for node, (_, vote) in self.votes.items():
            assert vote.numel() == k, f"client {node}: vote of {vote.numel()} != K={k} positions"
            assert torch.unique(vote).numel() == k, f"client {node}: duplicate positions in its vote"
            expected.index_add_(0, vote.to(torch.int64), _ones(k, 1))
        assert torch.equal(expected, self.m_sum), "M_sum differs from the sum of the clients' votes"


def _ones(n: int, sign: int) -> torch.Tensor:
    return torch.full((n,), sign, dtype=torch.int32)


def _member(x: torch.Tensor, sorted_set: torch.Tensor) -> torch.Tensor:
    """``x[i] in sorted_set`` for a sorted 1-D ``sorted_set`` (binary search; faster than isin)."""
    if sorted_set.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.bool)
    s = sorted_set.to(torch.int64)
    pos = torch.searchsorted(s, x.to(torch.int64)).clamp_(max=s.numel() - 1)
    return s[pos] == x


# ====================================================================== factory
def build_ssgd_mv(
    name: str,
    *,
    ratio: float,
    add_drop_ratio: float = 0.001,
    value_bits: int = 32,
    positions: str = "block",
    **common: Any,
) -> SSGDMajorityVote:
    """``"ssgd-mv"`` (top-K of votes), ``"ssgd-mv-rs"`` (vote-weighted random), ``"ssgd-mv-ad"`` (add-drop).

    ``value_bits`` < 32 quantizes the clients' values with the fractional
    scheme (``"q<bits>"``); the downlink keeps fp32 values as in the paper's
    Table 1. ``common`` goes to :class:`SSGDMajorityVote` (``fraction_train``, ``seed``, ...).
    """
    values = "fp32" if value_bits >= 32 else f"q{int(value_bits)}"
    if name == "ssgd-mv":
        return SSGDMajorityVote(ratio=ratio, selection="majority", uplink_values=values, positions=positions, **common)
    if name == "ssgd-mv-rs":
        return SSGDMajorityVote(ratio=ratio, selection="weighted", uplink_values=values, positions=positions, **common)
    if name == "ssgd-mv-ad":
        return SSGDMajorityVote(
            ratio=ratio, selection="majority", add_drop_ratio=add_drop_ratio,
            uplink_values=values, positions=positions, **common,
        )
    raise ValueError(f"unknown SSGD-MV variant {name!r}; choose ssgd-mv, ssgd-mv-ad or ssgd-mv-rs")
