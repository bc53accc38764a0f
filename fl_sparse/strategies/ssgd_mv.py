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
              sample S_t; send each q the sync payload for w_{t-1} ─ phase 1, "vote"
    client q  w ← sync(w);  Δ_q = w − SGD_H(w);  a_q = e_q + Δ_q
              M_q = supp Top_K(a_q)                           (Alg. 1 l. 9-10)
              MV / RS: reply M_q  (K positions)
              AD:      M̃_q = M̃_q' + add − drop, |add| = |drop| ≤ K_ad  (Alg. 2 l. 11-15)
                       reply add, drop  (a full M_q on first participation)
              keep a_q (dense) until phase 2
    server    MV: M_t = Top_K(Σ_q M_q)                        (Alg. 1 l. 14)
              RS: M_t = K distinct positions drawn ∝ Σ_q M_q without replacement (l. 15)
              AD: M_sum += Σ_q (add_q − drop_q); M_t = Top_K(M_sum)   (Alg. 2 l. 20-22)
              send M_t to the voters ─ phase 2, "values"
    client q  s_q = a_q[M_t] (quantized: Q(a_q[M_t])); e_q ← a_q − s_q;  reply s_q (values only)
    server  aggregate_train(t):
              g_t = Σ_q p_q s_q on M_t;  w_t = w_{t-1} − g_t   (p_q = n_q / Σ n: the mean of eq. (7)/(8);
                                                          the algorithm boxes write the plain sum, an lr factor of N)
              next round: a client that took part in round t gets g_t as *values only*
              (sync mode "values": it knows M_t), any other client the base's sync.

Why the vote happens inside ``configure_train``
-----------------------------------------------
Flower's :meth:`Strategy.start` sends what ``configure_train`` returns and
hands the replies to ``aggregate_train``. Here ``configure_train`` runs the
whole vote phase itself (``grid.send_and_receive`` of the vote messages,
tally, mask selection) and returns the values messages, which ``start``
sends; ``aggregate_train`` (the base's, with its hooks) aggregates the value
replies. Both phases are ordinary ``train`` messages whose
:class:`~fl_sparse.protocol.Instruction` names the phase, so a user's
ClientApp needs nothing but :class:`~fl_sparse.clients.SparseMod`: the vote
phase calls the user's train function once, the values phase answers from
the update kept since. Flower's own round loop (``Result``, ``evaluate_fn``,
federated evaluation, logging) is reused unchanged.

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

``uplink_bytes`` counts the accepted votes and values and the exact arrays
that came with the votes; ``downlink_bytes`` the sync payloads, masks and
exact arrays sent (the small instruction, report and metrics records are
counted by neither).

Client memory
-------------
Between the two phases a client keeps its compensated vector ``a`` (dense,
4·d bytes, in ``ClientState.extra``) next to its model copy and error
memory; plus the last mask (8·K bytes) and, for AD, two votes (16·K bytes).
See :mod:`fl_sparse.clients.mod`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fl_sparse import codec, protocol
from fl_sparse.algorithms import is_member, select_majority, select_weighted, vote_counts
from fl_sparse.compressors import TopK
from fl_sparse.flat import vector_hash
from fl_sparse.protocol import Instruction, Report, UplinkMetrics
from fl_sparse.sparse import SparseTensor
from fl_sparse.strategies.arguments import count_argument, is_number, ratio_argument
from fl_sparse.strategies.base import ClientUpdate, SparseFedAvg, _remap, exception_reason, with_fedavg_signature

__all__ = ["SSGDMajorityVote", "build_ssgd_mv", "vote_counts", "select_majority", "select_weighted"]

SELECTIONS = ("majority", "weighted")
TIE_BREAKS = ("random", "index")


def _round_generator(seed: int, server_round: int, salt: int) -> torch.Generator:
    """The mask selection's generator for (``seed``, round): reproducible, for any ``seed`` >= 0.

    Reduced modulo 2**64, the range ``manual_seed`` takes (a seed of 2**32 or more overflowed it, and
    the server raised after the vote phase); seeds that fit already keep their draws.
    """
    return torch.Generator().manual_seed(((int(seed) * 1_000_003 + int(server_round)) * 7_919 + salt) % (1 << 64))


@with_fedavg_signature
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
    *args, **kwargs :
        As :class:`~fl_sparse.strategies.base.SparseFedAvg` (FedAvg's options,
        ``seed``, ...). ``diagnostics`` (ρ estimates) is not supported here and is ignored.
    """

    fixed_options = {"uplink_positions": "positions= (one code for votes, masks and catch-ups)",
                     "downlink_positions": "positions= (one code for votes, masks and catch-ups)"}

    def __init__(
        self,
        *args: Any,
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
        budget = {"k": count_argument("k", k)} if k is not None else {"ratio": ratio_argument("ratio", ratio)}
        self.vote_compressor = TopK(**budget)
        self.add_drop = add_drop_ratio is not None or add_drop_k is not None
        self.add_drop_compressor = None
        if self.add_drop:
            if add_drop_k is not None:
                add_drop_k = count_argument("add_drop_k", add_drop_k)
                if k is not None and add_drop_k > budget["k"]:
                    raise ValueError(f"add_drop_k must be <= k ({budget['k']}), got {add_drop_k}")
                self.add_drop_compressor = TopK(add_drop_k)
            else:
                if not (is_number(add_drop_ratio) and 0.0 < add_drop_ratio <= (1.0 if ratio is None else budget["ratio"])):
                    raise ValueError(f"add_drop_ratio must be in (0, ratio], got {add_drop_ratio!r}")
                self.add_drop_compressor = TopK(ratio=float(add_drop_ratio))
        if kwargs.pop("diagnostics", False):
            log(WARNING, "SSGDMajorityVote: diagnostics (rho estimates) are not supported; ignored")
        super().__init__(
            *args,
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
        self._voters: dict[int, RecordDict] = {}  # this round's accepted voters -> their user records
        self._vote_exact: dict[int, ArrayRecord | None] = {}  # ... and their exact arrays
        self._round_mask: torch.Tensor | None = None

    # ------------------------------------------------------------------ budget
    def k_for(self, numel: int) -> int:
        return self.vote_compressor.k_for(numel)

    def k_ad_for(self, numel: int) -> int:
        return 0 if self.add_drop_compressor is None else min(self.add_drop_compressor.k_for(numel), self.k_for(numel))

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

    # ------------------------------------------------------------------ checkpoint
    def options(self) -> dict[str, Any]:
        return {
            **super().options(),
            "selection": self.selection,
            "tie_break": self.tie_break,
            "positions": self.positions,
            "add_drop": repr(self.add_drop_compressor),
        }

    def state_dict(self) -> dict[str, Any]:
        """The base's state plus M_sum, each client's stored vote, the last mask and its values record."""
        from fl_sparse.checkpoint import record_to_state

        return {
            **super().state_dict(),
            "ssgd_mv": {
                "m_sum": None if self.m_sum is None else self.m_sum.clone(),
                "votes": {int(n): (int(r), v.clone()) for n, (r, v) in self.votes.items()},
                "mask": None if self.mask is None else self.mask.clone(),
                "mask_round": int(self.mask_round),
                "values_record": record_to_state(self.values_record),
            },
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        """The base's, then SSGD-MV's own (checked: ``M_sum`` is the sum of the stored votes)."""
        from fl_sparse.checkpoint import record_from_state

        super()._load_state(state)
        try:
            extra = state["ssgd_mv"]
            m_sum = extra["m_sum"]
            self.m_sum = None if m_sum is None else m_sum.to(torch.int32).clone()
            self.votes = {int(n): (int(r), v.clone()) for n, (r, v) in extra["votes"].items()}
            self.mask = None if extra["mask"] is None else extra["mask"].clone()
            self.mask_round = int(extra["mask_round"])
            self.values_record = record_from_state(extra["values_record"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a complete SSGD-MV state: {type(exc).__name__}: {exc}") from None
        numel = self.state.model.numel()
        if self.add_drop != (self.m_sum is not None) or (self.m_sum is not None and self.m_sum.numel() != numel):
            raise ValueError("the saved SSGD-MV state does not match this strategy's add-drop setting or model size")
        if self.mask is not None and not _within(self.mask, numel):
            raise ValueError(f"inconsistent SSGD-MV state: mask positions outside [0, {numel})")
        try:
            self.check_vote_invariants()
        except AssertionError as exc:
            raise ValueError(f"inconsistent SSGD-MV state: {exc}") from None

    def move_clients(self, mapping: dict[int, int]) -> None:
        """The base's, and the stored votes (a vote dropped for a reused node id leaves M_sum)."""
        super().move_clients(mapping)
        moved = _remap(self.votes, mapping)
        if self.m_sum is not None:
            for node, (_, vote) in self.votes.items():
                if node not in mapping and node in set(mapping.values()):
                    self.m_sum.index_add_(0, vote.to(torch.int64), _ones(vote.numel(), -1))
        self.votes = moved

    # ------------------------------------------------------------------ phase 1: vote
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Phase 1 (vote) on the grid, then return the phase-2 (values) messages."""
        if self.fraction_train == 0.0:
            return []
        self.adopt(arrays)
        st = self.state
        numel = st.model.numel()
        node_ids = self.sample(server_round, grid)
        self.prepare_round(server_round, len(node_ids), config)
        config["server-round"] = server_round
        k, k_ad = self.k_for(numel), self.k_ad_for(numel)

        instr = self.instruction(
            server_round, phase=protocol.PHASE_VOTE, vote_k=k, add_drop_k=k_ad,
            vote_positions=self.positions, mask_round=self.mask_round,
        )
        vote_msgs, modes, sync_bytes = self.messages_with_sync(
            node_ids, config, instr, per_node=lambda n: {"vote_round": self.votes[n][0] if n in self.votes else -1}
        )
        replies = grid.send_and_receive(vote_msgs, timeout=self._timeout) if vote_msgs else []
        tally = self.tally_votes(server_round, replies)
        mask = self.select_mask(server_round, tally["votes"], tally)
        mask_record = codec.encode_positions(mask, numel, positions=self.positions, segments=codec.segments_of(st.layout))
        mask_size = codec.wire_size(mask_record)
        self._round_mask = mask

        values_instr = self.instruction(server_round, phase=protocol.PHASE_VALUES, vote_k=k)
        messages = []
        for node in self._voters:
            self._nonces[node] = secrets.token_hex(8)  # the values reply answers this message, not the vote
            instr = Instruction(**{**values_instr.__dict__, "nonce": self._nonces[node]})
            content = RecordDict({protocol.RECORD: instr.to_record(), protocol.MASK: mask_record})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        self._sent.extend(m.metadata for m in messages)  # a dead node's error reply names its node by it
        d_h = numel * self._local_steps
        rm = st.round_metrics.setdefault(server_round, {"round": server_round})
        rm.update(
            {
                "round": server_round,
                "clients": len(node_ids),
                "sync_modes": modes,
                "vote_accepted": len(self._voters),
                "vote_failures": tally["failures"],
                "vote_uplink_bytes": tally["bytes"],
                "mask_bytes": mask_size.total_bytes,
                "downlink_bytes": sync_bytes + mask_size.total_bytes * len(messages),
                # the sync part of the vote messages (the mask goes to every voter alike)
                **{f"downlink_{kind}_bytes": n for kind, n in self.last_downlink_split.items()},
                "q_loc_up": (sum(tally["bits"]) / len(tally["bits"]) / d_h) if tally["bits"] else float("nan"),
                "q_loc_down": mask_size.position_bits / d_h,
                "vote_changes": (sum(tally["changes"]) / len(tally["changes"])) if tally["changes"] else 0.0,
            }
        )
        log(
            INFO,
            "configure_train: %d clients, %d votes accepted, mask K=%d, downlink %s B, sync %s",
            len(node_ids), len(self._voters), k, rm["downlink_bytes"], modes,
        )
        return messages

    def sync_for(self, node: int) -> tuple[str, ArrayRecord | None]:
        """``"values"`` (the last aggregate's values on the last mask) for a client of the last round, else the base's sync.

        A client of the last round holds the version that round voted on, the one the last
        update was applied to (``state.update_base``: not ``version - 1`` after a round without
        an update, versions are rounds).
        """
        st = self.state
        have = st.client_versions.get(node)
        if (
            have is not None
            and have == st.update_base
            and st.accepted.get(node) == st.version
            and self.mask_round == st.version
            and self.values_record is not None
        ):
            return "values", self.values_record
        return super().sync_for(node)

    def tally_votes(self, server_round: int, replies: Iterable[Message]) -> dict[str, Any]:
        """Validate the vote replies; for AD update ``M_sum`` and the clients' votes.

        Remembers the accepted voters (and their metrics, for the weights of
        phase 2). Returns this round's votes (MV/RS), the bits and bytes of
        each accepted vote, the number of add-drop changes and the failures.
        """
        st = self.state
        numel = st.model.numel()
        k, k_ad = self.k_for(numel), self.k_ad_for(numel)
        expected_hash = vector_hash(st.model)
        self._voters, self._vote_exact = {}, {}
        votes, bits, changes = [], [], []
        failures, nbytes, seen = 0, 0, set()
        for node, msg in self.replies_by_node(replies):
            if msg.has_error():
                failures += 1
                self.drop_reply(server_round, "client %d failed to vote: %s", node, msg.error.reason)
                continue
            try:
                report = self.read_report(server_round, node, msg, seen)
                if report.model_hash != expected_hash or report.model_version != st.version:
                    raise protocol.ProtocolError("the client trained from a different model")
                st.client_versions[node] = report.model_version
                user = protocol.user_records(msg.content)
                self.weight_of(user)  # checked now: phase 2 uses it
                parsed = self._read_vote(msg.content, report, numel, k, k_ad, node)
                exact = self._read_exact(msg.content)
            except Exception as exc:  # noqa: BLE001 - a reply is untrusted input: it never crashes the server
                failures += 1
                self.drop_reply(server_round, "rejected vote from client %d: %s", node, exception_reason(exc))
                continue
            if self.add_drop:
                self._apply_vote(node, server_round, parsed)
                changes.append(parsed["changes"])
            else:
                votes.append(parsed["vote"])
            self._voters[node] = user
            self._vote_exact[node] = exact
            bits.append(parsed["bits"])
            nbytes += parsed["bytes"] + self.exact_bytes(msg.content, exact)
        for node in self._nonces.keys() - seen:
            # Asked, no vote: it may have applied this round's sync, so its version is unknown.
            st.client_versions.pop(node, None)
        return {"votes": votes, "bits": bits, "bytes": nbytes, "changes": changes, "failures": failures}

    def _read_vote(self, content: RecordDict, report: Report, numel: int, k: int, k_ad: int, node: int) -> dict[str, Any]:
        arrays = content.array_records
        segments = codec.segments_of(self.state.layout)
        if report.vote_kind == "full":
            record = protocol.array_record(content, protocol.VOTE, what="full vote")
            vote = codec.decode_positions(record, numel, max_nnz=k, segments=segments)
            if vote.numel() != k:
                raise protocol.ProtocolError(f"a vote must have exactly K={k} positions, got {vote.numel()}")
            sizes = [codec.wire_size(record)]
            out = {"kind": "full", "vote": vote, "changes": k}
        elif report.vote_kind == "add-drop":
            if not self.add_drop:
                raise protocol.ProtocolError("add-drop vote, but this strategy takes full votes")
            if protocol.VOTE_ADD not in arrays or protocol.VOTE_DROP not in arrays:
                raise protocol.ProtocolError(f"add-drop vote needs {protocol.VOTE_ADD!r} and {protocol.VOTE_DROP!r} records")
            adds = codec.decode_positions(arrays[protocol.VOTE_ADD], numel, max_nnz=k_ad, segments=segments)
            drops = codec.decode_positions(arrays[protocol.VOTE_DROP], numel, max_nnz=k_ad, segments=segments)
            if adds.numel() != drops.numel():
                raise protocol.ProtocolError(f"{adds.numel()} adds but {drops.numel()} drops")
            base_round = report.vote_base_round
            if node not in self.votes or self.votes[node][0] != base_round:
                raise protocol.ProtocolError(f"add-drop relative to vote of round {base_round}, which the server does not hold")
            prev = self.votes[node][1].to(torch.int64)
            if adds.numel() and bool(is_member(adds, prev).any()):
                raise protocol.ProtocolError("an added position is already in the client's vote")
            if drops.numel() and not bool(is_member(drops, prev).all()):
                raise protocol.ProtocolError("a dropped position is not in the client's vote")
            sizes = [codec.wire_size(arrays[protocol.VOTE_ADD]), codec.wire_size(arrays[protocol.VOTE_DROP])]
            out = {"kind": "add-drop", "adds": adds, "drops": drops, "changes": int(adds.numel())}
        else:
            raise protocol.ProtocolError(f"unknown vote-kind {report.vote_kind!r}")
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
            keep = prev[~is_member(prev, drops)] if drops.numel() else prev
            new = torch.cat([keep, adds]).sort().values
        self.votes[node] = (server_round, new.to(torch.int32 if m_sum.numel() <= 2**31 - 1 else torch.int64))

    def select_mask(self, server_round: int, votes: list[torch.Tensor], tally: dict[str, Any] | None = None) -> torch.Tensor:
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
        share = int(counts[is_member(positions, mask)].sum()) / total if total else float("nan")
        self.state.round_metrics.setdefault(server_round, {"round": server_round})["mask_vote_share"] = share
        return mask

    # ------------------------------------------------------------------ phase 2: values
    def read_update(
        self, server_round: int, node: int, msg: Message, report: Report, expected_hash: str
    ) -> ClientUpdate:
        """A client's values on this round's mask M_t (no positions: the server knows M_t)."""
        mask = self._round_mask
        if mask is None or node not in self._voters:
            raise protocol.ProtocolError("values from a client that was not asked for them this round")
        record = protocol.array_record(msg.content, protocol.UPDATE, what="values reply")
        values = codec.decode_values(record, mask.numel())
        size = codec.wire_size(record)
        user = self._voters[node]
        return ClientUpdate(
            node=node,
            update=SparseTensor(mask, values, self.state.model.numel()),
            weight=self.weight_of(user),
            user_content=user,
            uplink=UplinkMetrics.read(msg.content),
            position_bits=0,
            value_bits=size.value_bits,
            total_bytes=size.total_bytes,
            exact=self._vote_exact.get(node),
        )

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """The base's aggregation of the values replies; then the voters of this round are forgotten.

        A round without an update (no value reply accepted, or the aggregate rejected) skips
        :meth:`round_metrics`: its failures and uplink bytes still count the vote phase's.
        """
        try:
            arrays, metrics = super().aggregate_train(server_round, replies)
            if arrays is None:
                rm = self.state.round_metrics.setdefault(server_round, {"round": server_round})
                rm["failures"] = rm.get("vote_failures", 0) + rm.get("failures", 0)
                rm["uplink_bytes"] = rm.get("uplink_bytes", 0) + rm.get("vote_uplink_bytes", 0)
            return arrays, metrics
        finally:
            self._voters, self._vote_exact = {}, {}

    def compress_downlink(self, server_round: int, aggregate: SparseTensor) -> SparseTensor:
        """g_t on M_t; with a lossy value code the server error δ keeps what quantization lost."""
        mask = self._round_mask
        numel = self.state.model.numel()
        raw = aggregate.to_dense()[mask]
        if self.downlink_values != "fp32" and self.server_error_feedback:
            error = self.state.server_error
            dense = torch.zeros(numel, dtype=torch.float32)
            dense[mask] = raw
            compensated = error.compensate(dense)
            raw = compensated[mask]
            error.update(compensated, codec.lossy_roundtrip(SparseTensor(mask, raw, numel), values=self.downlink_values))
        return SparseTensor(mask, raw, numel)

    def apply_update(self, server_round: int, sent: SparseTensor) -> ArrayRecord:
        """The base's update, and the values-only record that clients of this round get as their sync."""
        record = super().apply_update(server_round, sent)
        self.mask, self.mask_round = sent.indices, server_round
        self.values_record = codec.encode_values(sent.values, values=self.downlink_values)
        return record

    def round_metrics(self, server_round, updates, p, aggregate, record) -> dict[str, Any]:
        """The base's numbers, with SSGD-MV's accounting: votes up, mask and values down."""
        out = super().round_metrics(server_round, updates, p, aggregate, record)
        rm = self.state.round_metrics[server_round]
        numel = self.state.model.numel()
        vsize = codec.wire_size(self.values_record)
        out.update(
            {
                "uplink_bytes": out["uplink_bytes"] + rm.get("vote_uplink_bytes", 0),
                "downlink_update_bytes": vsize.total_bytes,
                "density": self._round_mask.numel() / numel,
                "q_loc_up": rm.get("q_loc_up", float("nan")),
                "q_loc_down": rm.get("q_loc_down", float("nan")),
                "q_val_down": vsize.value_bits / (numel * self._local_steps),
                "server_error_norm": self.state.server_error.norm()
                if self.downlink_values != "fp32" and self.server_error_feedback
                else 0.0,
            }
        )
        rm["failures"] = rm.get("vote_failures", 0) + rm.get("failures", 0)
        return out

    # ------------------------------------------------------------------ helpers
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
            assert _within(vote, numel), f"client {node}: vote positions outside [0, {numel})"
            expected.index_add_(0, vote.to(torch.int64), _ones(k, 1))
        assert torch.equal(expected, self.m_sum), "M_sum differs from the sum of the clients' votes"


def _within(positions: torch.Tensor, numel: int) -> bool:
    """Every position in ``[0, numel)`` (a stored vote or mask read back from a checkpoint)."""
    return positions.numel() == 0 or (0 <= int(positions.min()) and int(positions.max()) < numel)


def _ones(n: int, sign: int) -> torch.Tensor:
    return torch.full((n,), sign, dtype=torch.int32)


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
