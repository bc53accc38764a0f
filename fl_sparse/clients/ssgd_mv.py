"""Client side of SSGD-MV / -RS / -AD: the ``train.vote`` and ``train.values`` handlers.

Registered on the ClientApp of :mod:`fl_sparse.clients.app` (imported at the
end of that module, so wherever the app is loaded the handlers are too).
The protocol and its semantics are in :mod:`fl_sparse.strategies.ssgd_mv`.

Phase 1, ``train.vote`` (:func:`handle_vote`)::

    w   <- sync(w)                      base sync modes, plus "values": the last
                                        aggregate's values on the last mask
    Δ   =  w − SGD_H(w);  a = e + Δ     (e = 0 without error feedback)
    M   =  supp Top_K(a)
    reply M  (MV / RS), or the adds and drops against the vote the server
    holds (AD; a full M if this client has no such vote)
    keep a (dense) in the state until phase 2

Phase 2, ``train.values`` (:func:`handle_values`)::

    s   =  Q(a[M_t])                    M_t: the server's mask; Q the value code
    e   <- a − s                        via codec.lossy_roundtrip: e sees the quantization
    reply the values of s (no positions: the server knows M_t)

If a vote is never followed by its values phase (the server dropped this
client's vote, or failed), nothing of ``a`` was sent, so the next vote
starts from ``e = a``: nothing is lost.

Memory: between the phases the state holds ``a`` (dense float32, 4·d bytes,
on disk and in the state cache) besides the model copy and the error
memory; it is dropped in phase 2. The last mask (int64, 8·K bytes) stays
for the next round's "values" sync; AD keeps two votes (16·K bytes): the
one last sent and the one before it (the server may hold either).

:func:`prepare_vote`, :func:`vote_step` and :func:`values_step` hold all the
logic and take a :class:`~fl_sparse.clients.state.ClientState` and plain
tensors, so they run without a Flower Context (tests, benchmarks with
synthetic updates).
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fl_sparse import codec
from fl_sparse.clients.app import (
    ClientRound,
    SyncError,
    app,
    apply_sync,
    local_update,
    restore_unaccepted,
)
from fl_sparse.clients.state import ClientState
from fl_sparse.compressors import magnitude_topk_indices
from fl_sparse.flat import vector_hash
from fl_sparse.memory import ErrorFeedback
from fl_sparse.sparse import SparseTensor

__all__ = [
    "handle_vote",
    "handle_values",
    "apply_ssgd_sync",
    "prepare_vote",
    "vote_step",
    "values_step",
    "add_drop",
]

# ClientState.extra keys
A_KEY, A_ROUND_KEY, LOSS_KEY = "ssgd_a", "ssgd_a_round", "ssgd_loss"
MASK_STATE_KEY, MASK_ROUND_KEY = "ssgd_mask", "ssgd_mask_round"
VOTE_STATE_KEY, VOTE_ROUND_KEY = "ssgd_vote", "ssgd_vote_round"  # the vote sent before the last one
SENT_VOTE_KEY, SENT_VOTE_ROUND_KEY = "ssgd_sent_vote", "ssgd_sent_vote_round"  # the last vote sent

# record keys (same as the strategy's)
VOTE_KEY, ADD_KEY, DROP_KEY, MASK_KEY, VALUES_KEY = "vote", "vote-add", "vote-drop", "mask", "update"


# ====================================================================== pure logic
def apply_ssgd_sync(state: ClientState, config: ConfigRecord, content: RecordDict, numel: int) -> None:
    """:func:`~fl_sparse.clients.app.apply_sync`, plus sync mode ``"values"`` (values on the last mask)."""
    if str(config.get("sync-mode", "dense")) != "values":
        apply_sync(state, config, content, numel)
        return
    base = int(config["base-version"])
    mask_round = int(config["mask-round"])
    if state.model is None or state.model_version != base:
        raise SyncError(f"values sync needs version {base}, client holds {state.model_version}")
    if MASK_STATE_KEY not in state.extra or int(state.extra[MASK_ROUND_KEY]) != mask_round:
        have = int(state.extra[MASK_ROUND_KEY]) if MASK_ROUND_KEY in state.extra else -1
        raise SyncError(f"values sync on the mask of round {mask_round}, client holds round {have}")
    if "sync" not in content.array_records:
        raise SyncError("sync-mode 'values' without a 'sync' payload")
    mask = state.extra[MASK_STATE_KEY]
    values = codec.decode_values(content.array_records["sync"], mask.numel())
    SparseTensor(mask, values, numel).add_(state.model, alpha=-1.0)  # w <- w − g, the server's operation
    state.model_version = int(config["model-version"])


def prepare_vote(state: ClientState, config: ConfigRecord, content: RecordDict, numel: int) -> str:
    """Sync the model, check it against the server's hash, settle last round; returns the model hash."""
    apply_ssgd_sync(state, config, content, numel)
    model_hash = vector_hash(state.model)
    if model_hash != str(config.get("model-hash", model_hash)):
        raise SyncError("model after sync does not match the server's hash")
    restore_unaccepted(state, config)
    if A_KEY in state.extra:  # a vote whose values phase never came: nothing of a was sent
        state.error = state.extra.pop(A_KEY)
        state.extra.pop(A_ROUND_KEY, None)
        state.extra.pop(LOSS_KEY, None)
    return model_hash


def _sorted_member(x: torch.Tensor, sorted_set: torch.Tensor) -> torch.Tensor:
    if sorted_set.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    pos = torch.searchsorted(sorted_set, x).clamp_(max=sorted_set.numel() - 1)
    return sorted_set[pos] == x


def add_drop(a: torch.Tensor, previous: torch.Tensor, top: torch.Tensor, k_ad: int):
    """Algorithm 2, lines 11-15: ``(vote, adds, drops)``, all sorted int64.

    ``previous`` is the last vote (K sorted positions), ``top`` = supp
    Top_K(|a|). Adds: the ``n`` positions of ``top \\ previous`` with the
    largest ``|a|``; drops: the ``n`` positions of ``previous \\ top`` with the
    smallest ``|a|``; ``n = min(k_ad, |top \\ previous|)`` (= ``|previous \\ top|``
    when both have K positions), so the new vote has K positions again. Ties
    in ``|a|`` go to the lower position.
    """
    previous = previous.to(torch.int64)
    top = top.to(torch.int64)
    new_candidates = top[~_sorted_member(top, previous)]
    old_candidates = previous[~_sorted_member(previous, top)]
    n = min(int(k_ad), new_candidates.numel(), old_candidates.numel())
    if n == 0:
        empty = torch.empty(0, dtype=torch.int64, device=a.device)
        return previous, empty, empty
    mag_new = a[new_candidates].abs()
    mag_old = a[old_candidates].abs()
    # stable sorts: equal magnitudes keep position order (candidates are sorted)
    adds = new_candidates[torch.sort(mag_new, descending=True, stable=True).indices[:n]].sort().values
    drops = old_candidates[torch.sort(mag_old, stable=True).indices[:n]].sort().values
    keep = previous[~_sorted_member(previous, drops)]
    vote = torch.cat([keep, adds]).sort().values
    return vote, adds, drops


def _stored_vote(state: ClientState, server_round_of_vote: int) -> torch.Tensor | None:
    """The vote of that round if this client still has it (the last one sent or the one before)."""
    if server_round_of_vote < 0:
        return None
    for key, round_key in ((SENT_VOTE_KEY, SENT_VOTE_ROUND_KEY), (VOTE_STATE_KEY, VOTE_ROUND_KEY)):
        if key in state.extra and int(state.extra[round_key]) == server_round_of_vote:
            return state.extra[key]
    return None


def vote_step(
    state: ClientState,
    step: torch.Tensor,
    config: ConfigRecord,
    *,
    model_hash: str,
    loss: float = float("nan"),
) -> RecordDict:
    """Phase 1 after local training: a = e + Δ, the vote, and the reply content.

    Updates ``state.extra`` (a, the votes); does not touch ``state.error``
    (that happens in :func:`values_step`) nor save anything.
    """
    numel = step.numel()
    server_round = int(config["server-round"])
    k = int(config["vote-k"])
    k_ad = int(config.get("add-drop-k", 0))
    positions = str(config.get("vote-positions", "block"))
    memory = ErrorFeedback(numel, device=step.device)
    if state.error is not None and bool(config.get("error-feedback", True)):
        memory.load_state_dict({"numel": numel, "error": state.error.to(step.device)})
    a = memory.compensate(step)
    top = magnitude_topk_indices(a, k)

    client = {"model-hash": model_hash, "model-version": state.model_version, "vote-kind": "full"}
    arrays: dict[str, Any] = {}
    if k_ad > 0:
        server_vote_round = int(config.get("vote-round", -1))
        base = _stored_vote(state, server_vote_round)
        if base is not None and base.numel() == k:
            vote, adds, drops = add_drop(a, base.to(a.device), top, k_ad)
            arrays[ADD_KEY] = codec.encode_positions(adds, numel, positions=positions)
            arrays[DROP_KEY] = codec.encode_positions(drops, numel, positions=positions)
            client.update({"vote-kind": "add-drop", "vote-base-round": server_vote_round})
            state.extra[VOTE_STATE_KEY] = base.to("cpu")
            state.extra[VOTE_ROUND_KEY] = torch.tensor(server_vote_round)
        else:
            vote = top
            arrays[VOTE_KEY] = codec.encode_positions(top, numel, positions=positions)
            for key in (VOTE_STATE_KEY, VOTE_ROUND_KEY):
                state.extra.pop(key, None)
        state.extra[SENT_VOTE_KEY] = vote.to("cpu")
        state.extra[SENT_VOTE_ROUND_KEY] = torch.tensor(server_round)
    else:
        arrays[VOTE_KEY] = codec.encode_positions(top, numel, positions=positions)

    state.extra[A_KEY] = a.detach().to("cpu", torch.float32)
    state.extra[A_ROUND_KEY] = torch.tensor(server_round)
    state.extra[LOSS_KEY] = torch.tensor(float(loss), dtype=torch.float64)
    content = RecordDict({"client": ConfigRecord(client)})
    for key, record in arrays.items():
        content[key] = record
    return content


def values_step(state: ClientState, content: RecordDict, config: ConfigRecord, *, num_examples: int) -> RecordDict:
    """Phase 2: send a on the server's mask, e <- a − sent; returns the reply content.

    Raises :class:`SyncError` if this client holds no vote-phase state for
    the round (e.g. its state was lost between the phases).
    """
    server_round = int(config["server-round"])
    if A_KEY not in state.extra or int(state.extra[A_ROUND_KEY]) != server_round:
        raise SyncError(f"no vote-phase state for round {server_round}")
    if MASK_KEY not in content.array_records:
        raise SyncError("values request without a mask")
    a = state.extra.pop(A_KEY)
    state.extra.pop(A_ROUND_KEY)
    loss = float(state.extra.pop(LOSS_KEY, torch.tensor(float("nan"))))
    numel = a.numel()
    k = int(config.get("vote-k", numel))
    values_code = str(config.get("uplink-values", "fp32"))
    mask = codec.decode_positions(content.array_records[MASK_KEY], numel, max_nnz=k)
    values = a[mask]
    record = codec.encode_values(values, values=values_code)
    sent = codec.lossy_roundtrip(SparseTensor(mask, values, numel), values=values_code)
    memory = ErrorFeedback(numel)
    memory.update(a, sent)
    error_norm = memory.norm()

    state.error = memory.error
    state.extra["pending_indices"] = sent.indices
    state.extra["pending_values"] = sent.values.to(torch.float32)
    state.extra["pending_round"] = torch.tensor(server_round)
    state.extra[MASK_STATE_KEY] = mask
    state.extra[MASK_ROUND_KEY] = torch.tensor(server_round)
    size = codec.wire_size(record)
    return RecordDict(
        {
            VALUES_KEY: record,
            "metrics": MetricRecord(
                {
                    "num-examples": int(num_examples),
                    "train-loss": loss,
                    "uplink-bytes": size.total_bytes,
                    "density": mask.numel() / numel if numel else 0.0,
                    "error-norm": error_norm,
                    "compression-error": error_norm**2,
                    "local-steps": int(config.get("local-steps", 1)),
                }
            ),
            "client": ConfigRecord({"model-version": state.model_version, "server-round": server_round}),
        }
    )


# ====================================================================== Flower handlers
def handle_vote(msg: Message, context: Context) -> Message:
    """``train.vote``: sync, H local steps, vote."""
    rnd = ClientRound.open(msg, context)
    config, state = rnd.config, rnd.state
    model_hash = prepare_vote(state, config, msg.content, rnd.task.layout.numel)
    step, loss = local_update(rnd.task, state.model, config, state.steps_done, rnd.device)
    content = vote_step(state, step, config, model_hash=model_hash, loss=loss)
    state.steps_done += int(config.get("local-steps", 1))
    rnd.save()
    return Message(content=content, reply_to=msg)


def handle_values(msg: Message, context: Context) -> Message:
    """``train.values``: the compensated update on the common mask."""
    rnd = ClientRound.open(msg, context)
    content = values_step(rnd.state, msg.content, rnd.config, num_examples=rnd.task.num_examples)
    rnd.save()
    return Message(content=content, reply_to=msg)


@app.train("vote")
def _train_vote(msg: Message, context: Context) -> Message:
    return handle_vote(msg, context)


@app.train("values")
def _train_values(msg: Message, context: Context) -> Message:
    return handle_values(msg, context)
