"""Table 1 of the SSGD-MV paper: bit budgets and compression rates for ResNet-18.

d = 11,173,962 (ResNet-18 on CIFAR-10), φ = 1e-2, φ_ad = 1e-3, H ∈ {1, 2, 4, 8},
with and without 4-bit quantization. The numbers come from the payloads of
real rounds at that d: the strategy (vote phase, mask selection, values
phase) on an :class:`inprocess.InProcessGrid` whose clients run a real
``ClientApp`` (:class:`~fl_sparse.clients.SparseMod` in front of a plain
train function that takes a synthetic local step), all encoded by the real
codec. No formula is used for our side of the comparison.

How the table's rows are made from few rounds (the 11M-d rounds dominate
the cost):

* q̄ = Q / (d·H): a round's payloads do not depend on H (K positions, K
  values whatever the number of local steps), so the bits of one round
  divided by d·H give every H. (That the strategy's own metrics divide by
  the configured H is checked in ``test_ssgd_mv.py``.)
* The value code is part of every round's instruction, so one run switches
  from fp32 to q4 between rounds: MV round 1 fp32, round 2 q4; AD round 1
  (full vote), round 2 add-drop fp32, round 3 add-drop q4; RS one fp32 round.
* Our ``rice`` position code is measured by encoding the very same vote and
  mask position sets again with the real codec.

Our per-user numbers (N = 4 clients; per-user payloads do not depend on N)
must match the paper within the tolerances below (relative): the paper rounds
the block code's log2(1/φ) + 2 bits per position up to 9 (φ = 1e-2) and 12
(φ_ad = 1e-3) bits, while our block code picks the shorter of two block sizes
and measures ~8.6 and ~12.1 bits. Where rice beats the paper's block-code
numbers this is asserted and both are reported (``pytest -s`` prints the table).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import FLOWER_LOGGER
from inprocess import InProcessGrid

from fl_sparse import codec, protocol
from fl_sparse.clients import SparseMod
from fl_sparse.compressors import TopK
from fl_sparse.protocol import Instruction, Report
from fl_sparse.strategies import build_strategy

FLOWER_LOGGER.setLevel(logging.WARNING)

D = 11_173_962
PHI, PHI_AD = 1e-2, 1e-3
N = 4
TOL_LOC = 0.08  # position bits: the paper rounds bits/position up to 9 and 12
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
# Section 2.1 / 3 of the paper: bits per transmitted position.
PAPER_BITS_PER_POSITION = {"vote": 9, "mask": 9, "add-drop": 12, "add-drop effective": 2.4}


def _client_app() -> ClientApp:
    """SparseMod in front of a train function whose local step is seeded by (partition, round)."""
    app = ClientApp(mods=[SparseMod()])

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        gen = torch.Generator().manual_seed(7919 * (pid + 1) + server_round)
        step = torch.randn(D, generator=gen).mul_(1e-3).numpy()
        w = msg.content["arrays"]["w"].numpy()
        content = RecordDict({"arrays": ArrayRecord({"w": Array(w - step)}), "metrics": MetricRecord({"num-examples": 5_000})})
        return Message(content, reply_to=msg)

    return app


class Recorder:
    """The grid's tamper hook: logs (round, phase, request, reply) of every train reply."""

    def __init__(self) -> None:
        self.grid: InProcessGrid | None = None
        self.log: list[tuple[int, str, Message, Message]] = []

    def __call__(self, node: int, reply: Message) -> Message:
        request = self.grid.sent[-1]
        instr = Instruction.read(request.content)
        if instr.phase in (protocol.PHASE_VOTE, protocol.PHASE_VALUES):
            self.log.append((instr.server_round, instr.phase, request, reply))
        return reply


def _rice_bits(record: ArrayRecord) -> int:
    positions = codec.decode_positions(record, D)
    return codec.wire_size(codec.encode_positions(positions, D, positions="rice")).position_bits


def _round(strategy, grid: InProcessGrid, rec: Recorder, server_round: int, arrays: ArrayRecord) -> tuple[dict, ArrayRecord]:
    """One round; returns the per-user payload bits measured on the wire records (block and rice)."""
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord({"local-steps": 1}), grid))
    arrays, _ = strategy.aggregate_train(server_round, grid.send_and_receive(messages))
    rm = strategy.state.round_metrics[server_round]
    assert rm["failures"] == 0 and rm["accepted"] == N
    votes = [rep for t, ph, _, rep in rec.log if t == server_round and ph == protocol.PHASE_VOTE]
    values = [(req, rep) for t, ph, req, rep in rec.log if t == server_round and ph == protocol.PHASE_VALUES]
    assert len(votes) == len(values) == N
    mask_record = values[0][0].content.array_records[protocol.MASK]
    vote_records = [list(rep.content.array_records.values()) for rep in votes]
    out = {
        "kinds": {Report.read(rep.content).vote_kind for rep in votes},
        "loc_up": sum(codec.wire_size(x).position_bits for recs in vote_records for x in recs) / N,
        "loc_up_rice": sum(_rice_bits(x) for recs in vote_records for x in recs) / N,
        "val_up": sum(codec.wire_size(rep.content.array_records[protocol.UPDATE]).value_bits for _, rep in values) / N,
        "loc_down": codec.wire_size(mask_record).position_bits,
        "loc_down_rice": _rice_bits(mask_record),
        "val_down": codec.wire_size(strategy.values_record).value_bits,
        "metrics": dict(rm),
    }
    # the strategy's own metrics are these payload bits per parameter (H = 1 here)
    assert rm["q_loc_up"] == pytest.approx(out["loc_up"] / D, rel=1e-12)
    assert rm["q_val_up"] == pytest.approx(out["val_up"] / D, rel=1e-12)
    assert rm["q_loc_down"] == pytest.approx(out["loc_down"] / D, rel=1e-12)
    assert rm["q_val_down"] == pytest.approx(out["val_down"] / D, rel=1e-12)
    return out, arrays


@pytest.fixture(scope="module")
def measured():
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 4 << 30 else None
    runs: dict[tuple[str, bool], dict] = {}
    for name, plan in (
        ("ssgd-mv", [("fp32", "MV", False), ("q4", "MV", True)]),
        ("ssgd-mv-ad", [("fp32", None, None), ("fp32", "AD", False), ("q4", "AD", True)]),
        ("ssgd-mv-rs", [("fp32", "RS", False)]),
    ):
        with tempfile.TemporaryDirectory(dir=shm, prefix="fl-sparse-table1-") as root:
            strategy = build_strategy(
                name, ratio=PHI, add_drop_ratio=PHI_AD, value_bits=32, positions="block", seed=0, fraction_evaluate=0.0
            )
            rec = Recorder()
            grid = InProcessGrid(_client_app(), N, node_config=lambda i: {"state-dir": root}, tamper=rec)
            rec.grid = grid
            arrays = ArrayRecord({"w": Array(np.zeros(D, dtype=np.float32))})
            strategy.initialize(arrays)
            strategy.identify(grid)
            for server_round, (values, tag, quantized) in enumerate(plan, start=1):
                strategy.uplink_values = values  # goes to the clients with this round's instruction
                result, arrays = _round(strategy, grid, rec, server_round, arrays)
                if name == "ssgd-mv-ad":
                    assert result["kinds"] == ({"full"} if server_round == 1 else {"add-drop"})
                    if server_round > 1:
                        assert result["metrics"]["vote_changes"] == strategy.k_ad_for(D)
                        strategy.check_vote_invariants()
                else:
                    assert result["kinds"] == {"full"}
                if tag is not None:
                    runs[(tag, quantized)] = result
            del strategy, grid, rec, arrays
    return runs


def _ours(measured, method: str, H: int, quantized: bool, rice: bool = False):
    tag = {"SSGD-MV": "MV", "SSGD-MV-RS": "RS", "SSGD-MV-AD": "AD"}[method]
    r = measured[(tag, quantized)]
    dh = D * H
    up = ((r["loc_up_rice"] if rice else r["loc_up"]) / dh, r["val_up"] / dh)
    down = ((r["loc_down_rice"] if rice else r["loc_down"]) / dh, r["val_down"] / dh)
    return up, down, 32 / sum(up), 32 / sum(down)


def _mismatches(row, ours) -> list[str]:
    """The entries of ``row`` where our block-code numbers leave the paper's tolerance."""
    p_up, p_down, p_rate_up, p_rate_down = PAPER[row]
    up, down, rate_up, rate_down = ours
    checks = [
        ("q_loc up", up[0], p_up[0], TOL_LOC), ("q_val up", up[1], p_up[1], TOL_VAL),
        ("q_loc down", down[0], p_down[0], TOL_LOC), ("q_val down", down[1], p_down[1], TOL_VAL),
        ("rate up", rate_up, p_rate_up, TOL_RATE), ("rate down", rate_down, p_rate_down, TOL_RATE),
    ]
    return [f"{name} {ours_v:.4g} vs paper {paper_v:.4g}" for name, ours_v, paper_v, tol in checks
            if ours_v != pytest.approx(paper_v, rel=tol)]


def test_budgets_k_and_k_ad():
    assert TopK(ratio=PHI).k_for(D) == 111_740 and TopK(ratio=PHI_AD).k_for(D) == 11_174


@pytest.mark.parametrize("row", sorted(PAPER), ids=lambda r: f"{r[0]}-L{r[1]}{'-Q' if r[2] else ''}")
def test_table1_row_from_real_payloads(measured, row):
    p_up, p_down, p_rate_up, p_rate_down = PAPER[row]
    ours = _ours(measured, *row)
    assert _mismatches(row, ours) == []
    up, down, _, _ = ours
    # rice: never worse than block here, and below the paper's block-code budget
    r_up, r_down, r_rate_up, r_rate_down = _ours(measured, *row, rice=True)
    assert r_up[0] < up[0] and r_down[0] < down[0]
    assert r_up[0] < p_up[0] and r_down[0] < p_down[0]
    assert r_rate_up > p_rate_up * (1 - TOL_RATE) and r_rate_down > p_rate_down * (1 - TOL_RATE)


def test_print_table1(measured, capsys):
    """The comparison table (shown with ``pytest -s``); every printed number is checked against the paper."""
    lines = [
        f"Table 1 at d={D:,}, phi={PHI}, phi_ad={PHI_AD}, N={N}: q = Q/(d H) bits per parameter per local step; "
        f"tolerances q_loc {TOL_LOC:.0%}, q_val {TOL_VAL:.0%}, rates {TOL_RATE:.0%}",
        f"{'method':<16}{'paper up loc/val':>22}{'ours block':>22}{'ours rice':>12}"
        f"{'paper down loc/val':>22}{'ours block':>22}{'rice':>10}{'rate up p/block/rice':>24}"
        f"{'rate down p/block/rice':>26}  check",
    ]
    failures = []
    for row in sorted(PAPER, key=lambda r: (r[0], r[2], r[1])):
        p_up, p_down, p_ru, p_rd = PAPER[row]
        ours = _ours(measured, *row)
        up, down, ru, rd = ours
        r_up, r_down, r_ru, r_rd = _ours(measured, *row, rice=True)
        name = f"{row[0]}-L{row[1]}{'-Q' if row[2] else ''}"
        bad = _mismatches(row, ours)
        failures += [f"{name}: {b}" for b in bad]
        lines.append(
            f"{name:<16}{p_up[0]:>11.3e}/{p_up[1]:.2e}{up[0]:>11.3e}/{up[1]:.2e}{r_up[0]:>12.3e}"
            f"{p_down[0]:>11.3e}/{p_down[1]:.2e}{down[0]:>11.3e}/{down[1]:.2e}{r_down[0]:>10.3e}"
            f"{p_ru:>9}/{ru:7.0f}/{r_ru:6.0f}{p_rd:>11}/{rd:7.0f}/{r_rd:6.0f}  {'ok' if not bad else 'MISMATCH'}"
        )
    mv, ad = measured[("MV", False)], measured[("AD", False)]
    k, k_ad = 111_740, 11_174
    per_position = {
        "vote": mv["loc_up"] / k,
        "mask": mv["loc_down"] / k,
        "add-drop": ad["loc_up"] / (2 * k_ad),
        "add-drop effective": ad["loc_up"] / k,  # bits per position of the K-position vote it stands for
    }
    lines.append(
        f"bits per position (paper: vote and mask 9, add/drop 12, add-drop effective 2.4): "
        f"MV vote block {per_position['vote']:.3f} rice {mv['loc_up_rice'] / k:.3f}; "
        f"AD add+drop block {per_position['add-drop']:.3f} rice {ad['loc_up_rice'] / (2 * k_ad):.3f} "
        f"(effective {per_position['add-drop effective']:.3f}); "
        f"mask block {per_position['mask']:.3f} rice {mv['loc_down_rice'] / k:.3f}"
    )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert failures == []
    for what, paper in PAPER_BITS_PER_POSITION.items():
        assert per_position[what] == pytest.approx(paper, rel=TOL_LOC), what
