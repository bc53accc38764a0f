"""Table 1 of the SSGD-MV paper: bit budgets and compression rates for ResNet-18.

d = 11,173,962 (ResNet-18 on CIFAR-10), φ = 1e-2, φ_ad = 1e-3, H ∈ {1, 2, 4, 8},
with and without 4-bit quantization. The numbers come from the payloads of
real rounds at that d: the strategy (vote phase, mask selection, values
phase) against clients running the real client code of
:mod:`fl_sparse.clients.ssgd_mv` (sync, top-K vote, add-drop, values, error
feedback) on synthetic local updates, all encoded by the real codec. No
formula is used for our side of the comparison.

How the table's rows are made from few rounds (the 11M-d rounds dominate
the cost):

* q̄ = Q / (d·H): a round's payloads do not depend on H (K positions, K
  values whatever the number of local steps), so the bits of one round
  divided by d·H give every H. (That the strategy's own metrics divide by
  the configured H is checked in ``test_ssgd_mv.py``.)
* The value code is sent with every round's config, so one run switches
  from fp32 to q4 between rounds: MV round 1 fp32, round 2 q4; AD round 1
  (full vote), round 2 add-drop fp32, round 3 add-drop q4; RS one fp32 round.
* Our ``rice`` position code is measured by encoding the very same vote and
  mask position sets again with the real codec.

Our per-user numbers (N = 4 clients; per-user payloads do not depend on N)
must match the paper within ``TOL`` (relative): the paper rounds the block
code's log2(1/φ) + 2 bits per position up to 9 (φ = 1e-2) and 12 (φ_ad =
1e-3) bits, while our block code picks the shorter of two block sizes and
measures ~8.6 and ~12.1 bits. Where rice beats the paper's block-code
numbers this is asserted and both are reported (``pytest -s`` prints the table).
"""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_sparse import codec
from fl_sparse.clients import ssgd_mv as client_mv
from fl_sparse.clients.state import ClientState
from fl_sparse.strategies import build_strategy

D = 11_173_962
PHI, PHI_AD = 1e-2, 1e-3
N = 4
HS = (1, 2, 4, 8)
TOL_LOC = 0.08  # position bits: paper rounds bits/position up to 9 and 12
TOL_VAL = 0.01  # value bits: 32 or 4 per value (+ 8 float32 means for q4)
TOL_RATE = 0.06  # compression rates (the paper rounds them, e.g. ×2000 for 32/0.01625 = 1969)

# (method, H, quantized) -> uplink (q_loc, q_val), downlink (q_loc, q_val), rate up, rate down.
# Transcribed from Table 1. SSGD-MV-RS-L8's uplink/downlink entries repeat the L4 row in the
# paper (a typo: its rate ×624 is that of 1.125e-2 + 4e-2); we compare with the L8 budget.
PAPER = {
    ("SSGD-MV", 1, False): ((9e-2, 3.2e-1), (9e-2, 3.2e-1), 78, 78),
    ("SSGD-MV", 2, False): ((4.5e-2, 1.6e-1), (4.5e-2, 1.6e-1), 156, 156),
    ("SSGD-MV", 4, False): ((2.25e-2, 8e-2), (2.25e-2, 8e-2), 312, 312),
    ("SSGD-MV", 8, False): ((1.125e-2, 4e-2), (1.125e-2, 4e-2), 624, 624),
    ("SSGD-MV", 8, True): ((1.125e-2, 5e-3), (1.125e-2, 4e-2), 2000, 624),
    ("SSGD-MV-RS", 4, False): ((2.25e-2, 8e-2), (2.25e-2, 8e-2), 312, 312),
    ("SSGD-MV-RS", 8, False): ((1.125e-2, 4e-2), (1.125e-2, 4e-2), 624, 624),
    ("SSGD-MV-AD", 1, False): ((2.4e-2, 3.2e-1), (9e-2, 3.2e-1), 93, 78),
    ("SSGD-MV-AD", 2, False): ((1.2e-2, 1.6e-1), (4.5e-2, 1.6e-1), 186, 156),
    ("SSGD-MV-AD", 4, False): ((6e-3, 8e-2), (2.25e-2, 8e-2), 372, 312),
    ("SSGD-MV-AD", 4, True): ((6e-3, 1e-2), (2.25e-2, 8e-2), 2000, 312),
    ("SSGD-MV-AD", 8, False): ((3e-3, 4e-2), (1.125e-2, 4e-2), 745, 624),
    ("SSGD-MV-AD", 8, True): ((3e-3, 5e-3), (1.125e-2, 4e-2), 4000, 624),
}


class Client:
    """Real client code on a synthetic update; state kept in memory (no copies: 11M floats)."""

    def __init__(self, node: int) -> None:
        self.node = node
        self.state = ClientState()

    def handle(self, msg: Message) -> Message:
        cfg = msg.content.config_records["config"]
        if msg.metadata.message_type == "train.vote":
            model_hash = client_mv.prepare_vote(self.state, cfg, msg.content, D)
            gen = torch.Generator().manual_seed(7919 * self.node + int(cfg["server-round"]))
            step = torch.randn(D, generator=gen).mul_(1e-3)
            content = client_mv.vote_step(self.state, step, cfg, model_hash=model_hash, loss=1.0)
        else:
            content = client_mv.values_step(self.state, msg.content, cfg, num_examples=5_000)
        return Message(content=content, reply_to=msg)


class Grid:
    def __init__(self) -> None:
        self.clients = {n: Client(n) for n in range(1, N + 1)}
        self.log: list[tuple[Message, Message]] = []

    def get_node_ids(self):
        return sorted(self.clients)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            if msg.metadata.message_type == "query.identify":
                node = msg.metadata.dst_node_id
                reply = Message(content=RecordDict({"client": ConfigRecord({"partition-id": node})}), reply_to=msg)
            else:
                reply = self.clients[msg.metadata.dst_node_id].handle(msg)
                self.log.append((msg, reply))
            replies.append(reply)
        return replies


def _round(strategy, grid: Grid, server_round: int, arrays: ArrayRecord) -> dict:
    """One round; returns the per-user payload bits measured on the wire records (block and rice)."""
    start = len(grid.log)
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord({"local-steps": 1}), grid))
    strategy.aggregate_train(server_round, grid.send_and_receive(messages))
    rm = strategy.state.round_metrics[server_round]
    assert rm["failures"] == 0 and rm["accepted"] == N
    log = grid.log[start:]
    votes = [r for m, r in log if m.metadata.message_type == "train.vote"]
    values = [r for m, r in log if m.metadata.message_type == "train.values"]
    mask_record = next(m for m, _ in log if m.metadata.message_type == "train.values").content.array_records["mask"]

    def rice_bits(record) -> int:
        return codec.wire_size(codec.encode_positions(codec.decode_positions(record, D), D, positions="rice")).position_bits

    vote_records = [list(r.content.array_records.values()) for r in votes]
    out = {
        "kinds": {r.content.config_records["client"]["vote-kind"] for r in votes},
        "loc_up": sum(codec.wire_size(x).position_bits for recs in vote_records for x in recs) / N,
        "loc_up_rice": sum(rice_bits(x) for recs in vote_records for x in recs) / N,
        "val_up": sum(codec.wire_size(r.content.array_records["update"]).value_bits for r in values) / N,
        "loc_down": codec.wire_size(mask_record).position_bits,
        "loc_down_rice": rice_bits(mask_record),
        "val_down": codec.wire_size(strategy.values_record).value_bits,
        "metrics": dict(rm),
    }
    # the strategy's own metrics are these payload bits per parameter (H = 1 here)
    assert rm["q_loc_up"] == pytest.approx(out["loc_up"] / D, rel=1e-12)
    assert rm["q_val_up"] == pytest.approx(out["val_up"] / D, rel=1e-12)
    assert rm["q_loc_down"] == pytest.approx(out["loc_down"] / D, rel=1e-12)
    assert rm["q_val_down"] == pytest.approx(out["val_down"] / D, rel=1e-12)
    return out


@pytest.fixture(scope="module")
def measured():
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    arrays = ArrayRecord({"w": Array(torch.zeros(D).numpy())})
    runs: dict[tuple[str, bool], dict] = {}
    try:
        for name, plan in (
            ("ssgd-mv", [("fp32", "MV", False), ("q4", "MV", True)]),
            ("ssgd-mv-ad", [("fp32", None, None), ("fp32", "AD", False), ("q4", "AD", True)]),
            ("ssgd-mv-rs", [("fp32", "RS", False)]),
        ):
            strategy = build_strategy(name, ratio=PHI, add_drop_ratio=PHI_AD, value_bits=32, positions="block", seed=0)
            grid = Grid()
            for server_round, (values, tag, quantized) in enumerate(plan, start=1):
                strategy.uplink_values = values  # sent to the clients with this round's config
                result = _round(strategy, grid, server_round, arrays)
                if name == "ssgd-mv-ad":
                    assert result["kinds"] == ({"full"} if server_round == 1 else {"add-drop"})
                    if server_round > 1:
                        assert result["metrics"]["vote_changes"] == strategy.k_ad_for(D)
                        strategy.check_vote_invariants()
                if tag is not None:
                    runs[(tag, quantized)] = result
            del strategy, grid
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    return runs


def _ours(measured, method: str, H: int, quantized: bool, rice: bool = False):
    tag = {"SSGD-MV": "MV", "SSGD-MV-RS": "RS", "SSGD-MV-AD": "AD"}[method]
    r = measured[(tag, quantized)]
    dh = D * H
    up = ((r["loc_up_rice"] if rice else r["loc_up"]) / dh, r["val_up"] / dh)
    down = ((r["loc_down_rice"] if rice else r["loc_down"]) / dh, r["val_down"] / dh)
    return up, down, 32 / sum(up), 32 / sum(down)


def test_budgets_k_and_k_ad():
    from fl_sparse.compressors import TopK

    assert TopK(ratio=PHI).k_for(D) == 111_740 and TopK(ratio=PHI_AD).k_for(D) == 11_174


@pytest.mark.parametrize("row", sorted(PAPER), ids=lambda r: f"{r[0]}-L{r[1]}{'-Q' if r[2] else ''}")
def test_table1_row_from_real_payloads(measured, row):
    (p_up, p_down, p_rate_up, p_rate_down) = PAPER[row]
    up, down, rate_up, rate_down = _ours(measured, *row)
    assert up[0] == pytest.approx(p_up[0], rel=TOL_LOC)
    assert down[0] == pytest.approx(p_down[0], rel=TOL_LOC)
    assert up[1] == pytest.approx(p_up[1], rel=TOL_VAL)
    assert down[1] == pytest.approx(p_down[1], rel=TOL_VAL)
    assert rate_up == pytest.approx(p_rate_up, rel=TOL_RATE)
    assert rate_down == pytest.approx(p_rate_down, rel=TOL_RATE)
    # rice: never worse than block here, and below the paper's block-code budget
    r_up, r_down, r_rate_up, r_rate_down = _ours(measured, *row, rice=True)
    assert r_up[0] < up[0] and r_down[0] < down[0]
    assert r_up[0] < p_up[0] and r_down[0] < p_down[0]
    assert r_rate_up > p_rate_up * (1 - TOL_RATE) and r_rate_down > p_rate_down * (1 - TOL_RATE)


def test_print_table1(measured, capsys):
    """The comparison table (shown with ``pytest -s``)."""
    lines = [
        f"Table 1 at d={D:,}, phi={PHI}, phi_ad={PHI_AD}, N={N}: q = Q/(d H) bits per parameter per local step",
        f"{'method':<16}{'paper up loc/val':>22}{'ours block':>22}{'ours rice':>12}"
        f"{'paper down loc/val':>22}{'ours block':>22}{'rice':>10}{'rate up p/block/rice':>24}{'rate down p/block/rice':>26}",
    ]
    for row in sorted(PAPER, key=lambda r: (r[0], r[2], r[1])):
        p_up, p_down, p_ru, p_rd = PAPER[row]
        up, down, ru, rd = _ours(measured, *row)
        r_up, r_down, r_ru, r_rd = _ours(measured, *row, rice=True)
        name = f"{row[0]}-L{row[1]}{'-Q' if row[2] else ''}"
        lines.append(
            f"{name:<16}{p_up[0]:>11.3e}/{p_up[1]:.2e}{up[0]:>11.3e}/{up[1]:.2e}{r_up[0]:>12.3e}"
            f"{p_down[0]:>11.3e}/{p_down[1]:.2e}{down[0]:>11.3e}/{down[1]:.2e}{r_down[0]:>10.3e}"
            f"{p_ru:>9}/{ru:7.0f}/{r_ru:6.0f}{p_rd:>11}/{rd:7.0f}/{r_rd:6.0f}"
        )
    mv, ad = measured[("MV", False)], measured[("AD", False)]
    k, k_ad = 111_740, 11_174
    lines.append(
        f"bits per position: MV vote block {mv['loc_up'] / k:.3f} rice {mv['loc_up_rice'] / k:.3f}; "
        f"AD add+drop block {ad['loc_up'] / (2 * k_ad):.3f} rice {ad['loc_up_rice'] / (2 * k_ad):.3f}; "
        f"mask block {mv['loc_down'] / k:.3f} rice {mv['loc_down_rice'] / k:.3f}"
    )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert all(math.isfinite(v) for r in measured.values() for v in (r["loc_up"], r["val_up"]))
