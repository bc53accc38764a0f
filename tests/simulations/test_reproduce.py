"""``fl-sparse reproduce``: presets expand to valid runs, runs continue where they stopped, the report.

The fast tests run the plan through :func:`run_server` on an in-process grid
(the real ClientApp, no Ray); the one ``slow`` test runs the ``tiny`` preset
through the command line and Flower's Ray simulation, as CI does.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import struct
import zlib
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from flwr.common.logger import FLOWER_LOGGER
from inprocess import InProcessGrid

from fl_sparse import cli, protocol
from fl_sparse.clients.app import app as client_app
from fl_sparse.server_app import RunConfig, RunFailed, RunInterrupted, preflight, run_server, stop_requested
from fl_sparse.simulations import reproduce
from fl_sparse.simulations.reproduce import (
    BUDGETS,
    NON_IID,
    expand,
    load_preset,
    parse_preset,
    preset_names,
    run_plan,
    run_status,
)

FLOWER_LOGGER.setLevel(logging.WARNING)

PAPERS = ["bidirectional-topk", "hard-threshold", "rtopk", "adaptive-topk", "majority-voting"]


def in_process(cfg: RunConfig):
    """One run on an in-process grid: the real ClientApp and server, no Ray (milliseconds a round)."""
    preflight(cfg)
    return run_server(InProcessGrid(client_app, cfg.clients), cfg)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    reproduce.add_arguments(parser)
    return parser.parse_args(argv)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, after checking its signature and IHDR chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16:29]
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(kind + body)
    assert data.rstrip(b"\0").endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", body[:8])


def results_rows(report: Path) -> dict[str, list[str]]:
    """The ## Results table of results.md: setting name -> its cells."""
    text = report.read_text()
    section = text.split("## Results", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


# ------------------------------------------------------------------ presets
def test_the_five_papers_tiny_and_participation_are_shipped():
    assert set(preset_names()) == {*PAPERS, "tiny", "participation"}


@pytest.mark.parametrize("non_iid", [False, True], ids=["iid", "non-iid"])
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", [*PAPERS, "tiny", "participation"])
def test_every_preset_expands_to_valid_run_configs(name, budget, non_iid, tmp_path):
    preset = load_preset(name)
    plan = expand(preset, budget=budget, non_iid=non_iid, out=tmp_path)
    seeds = preset.budgets.get(budget, {}).get("seeds", preset.seeds)
    settings = list(dict.fromkeys(p.setting for p in plan))
    assert len(plan) == len(settings) * seeds
    folder = tmp_path / (name + ("-full" if budget == "full" else "") + ("-non-iid" if non_iid else ""))
    for p in plan:
        assert isinstance(p.config, RunConfig)
        p.config.validate()
        assert p.path == folder / f"{p.setting}-seed{p.seed}"
        assert p.config.seed == p.seed
        if non_iid and name not in ("tiny", "participation"):  # those two set their own sampling
            for key, value in NON_IID.items():
                assert getattr(p.config, key) == value, (p.label, key)
    # Settings differ in something that is not how they run: compare would merge them otherwise.
    configs = {json.dumps({k: v for k, v in asdict(p.config).items() if k not in ("out", "seed")}, sort_keys=True)
               for p in plan}
    assert len(configs) == len(settings)


def test_the_participation_preset_samples_1_10_and_100_percent_in_both_variants():
    for non_iid in (False, True):
        plan = {p.setting: p.config for p in expand("participation", non_iid=non_iid)}
        for strategy in ("bidirectional-topk", "topk"):
            fractions = sorted(c.fraction for c in plan.values() if c.strategy == strategy)
            assert fractions == [0.01, 0.1, 1.0], (non_iid, strategy)
        assert {c.clients for c in plan.values()} == {100}
        assert {c.partition for c in plan.values()} == {"dirichlet" if non_iid else "iid"}
    preset = load_preset("participation")
    assert {"downlink_first_contact_bytes", "downlink_catch_up_bytes", "downlink_last_update_bytes"} <= set(preset.columns)


def test_the_small_budget_is_small_and_the_full_one_is_the_papers():
    small = {n: expand(n, budget="small") for n in PAPERS}
    rounds = sum(p.config.rounds for plan in small.values() for p in plan)
    assert sum(len(plan) for plan in small.values()) <= 130 and rounds <= 8000  # about two hours on 2 cores (README of the presets)
    for plan in small.values():
        assert all(p.config.rounds <= 150 and p.config.clients <= 100 for p in plan)
    full = {p.setting: p.config for p in expand("bidirectional-topk", budget="full")}
    # Table 2 learning rates, K = 0.1 % of d, batch 10, the paper's MLP, 100 epochs.
    assert (full["topk-w100"].lr, full["bidirectional-w50"].lr, full["sgd-w20"].lr) == (0.22, 0.12, 0.06)
    assert {c.model for c in full.values()} == {"mlp-784-256-128-64-10"}
    assert {(c.ratio, c.batch_size, c.local_steps) for c in full.values()} == {(0.001, 10, 1)}
    assert full["topk-w20"].rounds == 100 * 60000 // (20 * 10) and full["topk-w20"].diagnostics
    adaptive = {p.setting: p.config for p in expand("adaptive-topk", budget="full")}
    assert adaptive["adaptive-512"].ratio == 1 / 512 and adaptive["adaptive-512"].rounds == 3000
    assert adaptive["topk-128-no-ec"].error_feedback is False and adaptive["topk-128"].error_feedback is True
    assert adaptive["adaptive-128-no-ec"].strategy == "adaptive-topk-no-ec"
    rtopk = {p.setting: p.config for p in expand("rtopk", budget="full")}
    assert {c.clients for c in rtopk.values()} == {5}
    assert {(c.strategy, c.ratio) for c in rtopk.values() if c.strategy != "fedavg"} >= {
        ("rtopk", 0.01), ("rtopk", 0.001), ("topk", 0.01), ("topk", 0.001), ("randomk", 0.01)}
    mv = {p.setting: p.config for p in expand("majority-voting", budget="full")}
    assert {c.local_steps for c in mv.values()} == {1, 2, 4, 8}
    assert mv["ssgd-mv-ad-L8-Q"].value_bits == 4 and mv["ssgd-mv-ad-L8"].value_bits == 32
    ht = {p.setting: p.config for p in expand("hard-threshold", budget="full")}
    assert ht["threshold-rule"].threshold is None and ht["threshold-0.07"].threshold == 0.07


def test_non_iid_renames_and_leaves_out_settings_as_the_preset_says(tmp_path):
    plan = expand("bidirectional-topk", non_iid=True, seeds=1, out=tmp_path)
    assert [p.setting for p in plan] == ["sgd", "topk", "bidirectional"]
    assert [p.config.lr for p in plan] == [0.06, 0.08, 0.08]  # the 20-worker learning rates
    assert all(p.path.parent == tmp_path / "bidirectional-topk-non-iid" for p in plan)
    epoch = {p.setting: p.config for p in expand("rtopk", non_iid=True, seeds=1)}
    assert epoch["rtopk-99.9-epoch"].local_steps == 5 and epoch["rtopk-99.9-batch"].local_steps == 1


def test_seeds_only_and_overrides(tmp_path):
    plan = expand("majority-voting", seeds=2, only=["sgd", "ssgd-mv-ad"], out=tmp_path, overrides={"quiet": True})
    assert [p.label for p in plan] == ["ssgd-mv-ad-seed0", "ssgd-mv-ad-seed1", "sgd-seed0", "sgd-seed1"]
    assert all(p.config.quiet for p in plan)
    with pytest.raises(ValueError, match="no setting 'nope'.*ssgd-mv-ad"):
        expand("majority-voting", only=["nope"])
    with pytest.raises(ValueError, match="seeds"):
        expand("tiny", seeds=0)
    with pytest.raises(ValueError, match="budget"):
        expand("tiny", budget="huge")
    with pytest.raises(ValueError, match="set by fl-sparse reproduce"):
        expand("tiny", overrides={"seed": 3})


def test_a_bad_preset_name_lists_the_presets(capsys):
    with pytest.raises(ValueError) as err:
        load_preset("bidirectional")
    assert "unknown preset 'bidirectional'" in str(err.value)
    for name in PAPERS:
        assert name in str(err.value)
    assert reproduce.run(parse(["bidirectional"])) == 2
    assert "unknown preset 'bidirectional'; choose one of: adaptive-topk" in capsys.readouterr().err
    assert reproduce.run(parse([])) == 2
    assert "give a preset NAME" in capsys.readouterr().err


GOOD = """
[base]
model = "mlp-784-64-10"
[[settings]]
name = "a"
strategy = "topk"
[[settings]]
name = "b"
strategy = "fedavg"
"""


@pytest.mark.parametrize(
    "text, message",
    [
        (GOOD.replace('strategy = "fedavg"', 'stratgy = "fedavg"'), "unknown setting 'stratgy'"),
        (GOOD.replace('name = "b"', 'name = "a"'), "two settings are called 'a'"),
        (GOOD.replace('name = "b"', 'name = "A"'), "two settings are called 'A'"),
        (GOOD.replace('name = "b"', 'name = "b/c"'), "a folder name"),
        (GOOD + "[budgets.small]\nsettings = ['c']\n", "no setting called 'c'"),
        (GOOD + "[budgets.huge]\nrounds = 3\n", "unknown budget 'huge'"),
        (GOOD + "[budgets.small]\nseeds = 0\n", "seeds must be an int >= 1"),
        (GOOD.replace("[base]", "[base]\nseed = 4"), "set by fl-sparse reproduce"),
        (GOOD.replace('strategy = "fedavg"', 'strategy = "fedavg"\nbudget.tiny = {rounds = 1}'), "unknown budget 'tiny'"),
        ("title = 'x'\n", "needs at least one"),
        ("titel = 'x'\n" + GOOD, "unknown top-level key"),
        (GOOD.replace('strategy = "topk"', "strategy = 'topk'\nnon_iid = false").replace(
            'strategy = "fedavg"', "strategy = 'fedavg'\nnon_iid = false"), "every setting is left out"),
        ("[[settings]\n", "not valid TOML"),
    ],
)
def test_preset_files_are_checked_with_clear_errors(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_preset("mine", text, source="mine.toml")


def test_settings_that_are_the_same_run_are_refused():
    preset = parse_preset("mine", GOOD.replace('strategy = "fedavg"', 'strategy = "topk"'))
    with pytest.raises(ValueError, match="setting 'b'.*same run as setting 'a'"):
        expand(preset)
    bad = parse_preset("mine", GOOD.replace('strategy = "fedavg"', 'strategy = "fedavg"\nratio = 2.0'))
    with pytest.raises(ValueError, match="setting 'b'.*ratio must be in"):
        expand(bad)


def test_precedence_base_budget_setting_non_iid():
    text = """
[base]
rounds = 5
lr = 0.1
[budgets.small]
rounds = 7
lr = 0.2
[[settings]]
name = "a"
strategy = "topk"
lr = 0.3
budget.full = { lr = 0.4 }
non_iid = { clients = 50, name = "a-n" }
[non_iid]
fraction = 0.2
"""
    preset = parse_preset("mine", text)
    small, full = expand(preset, seeds=1)[0].config, expand(preset, budget="full", seeds=1)[0].config
    assert (small.rounds, small.lr) == (7, 0.3) and (full.rounds, full.lr) == (5, 0.4)
    (run,) = expand(preset, seeds=1, non_iid=True)
    assert run.setting == "a-n"
    assert (run.config.clients, run.config.fraction, run.config.partition, run.config.alpha) == (50, 0.2, "dirichlet", 0.3)


# ------------------------------------------------------------------ running
TINY_RUNS = {"topk", "bidirectional"}


def test_reproduce_runs_the_plan_writes_the_report_and_continues_where_it_stopped(tmp_path, capsys):
    args = parse(["tiny", "--out", str(tmp_path), "--quiet"])
    assert reproduce.run(args, runner=in_process) == 0
    folder = tmp_path / "tiny"
    err = capsys.readouterr().err
    assert "[1/2] topk-seed0" in err and "[2/2] bidirectional-seed0" in err
    for name in TINY_RUNS:
        assert (folder / f"{name}-seed0" / "metrics.jsonl").is_file()
        assert not (folder / f"{name}-seed0" / "client-state").exists()  # removed once the run is complete
    report = folder / "results.md"
    rows = results_rows(report)
    assert set(rows) == TINY_RUNS
    for row in rows.values():
        assert 0.0 < float(row["final acc (%)"]) <= 100.0
        assert float(row["uplink MB"]) > 0 and float(row["downlink MB"]) > 0
        assert row["rounds"] == "2"
    text = report.read_text()
    assert f"fl-sparse reproduce tiny --budget small --seeds 1 --out {tmp_path}" in text
    assert re.search(r"- Machine: .*\d+ CPUs.*runs on: cpu", text)
    assert re.search(r"- Date: \d{4}-\d\d-\d\dT", text)
    assert png_size(folder / "accuracy.png")[0] > 100

    # Again: every run is complete, nothing runs.
    calls = []
    assert reproduce.run(args, runner=lambda cfg: calls.append(cfg) or in_process(cfg)) == 0
    assert calls == [] and capsys.readouterr().err.count("already complete") == 2


def test_an_interrupted_run_is_continued_and_a_broken_one_restarted(tmp_path):
    (planned,) = expand("tiny", out=tmp_path, only=["topk"], overrides={"quiet": True})
    cfg = planned.config

    def stop_in_round_1(node, reply):  # Ctrl-C while round 1 runs: the run stops after it, checkpointed
        if not reply.has_error() and protocol.Report.read(reply.content).server_round == 1:
            stop_requested.set()
        return reply

    try:
        with pytest.raises(RunInterrupted, match="after round 1 of 2"):
            run_server(InProcessGrid(client_app, cfg.clients, tamper=stop_in_round_1), cfg)
    finally:
        stop_requested.clear()
    assert run_status(planned) == ("resume", "continuing from round 1")
    seen = []
    outcome = run_plan([planned], runner=lambda c: seen.append(c) or in_process(c), log=lambda m: None)
    assert outcome.ran == [planned] and seen[0].resume == str(planned.path) and seen[0].rounds == 2
    assert run_status(planned)[0] == "complete"
    rows = [json.loads(line) for line in (planned.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    # A folder with run files but no checkpoint: started again from scratch.
    (planned.path / "checkpoint.pt").unlink()
    assert run_status(planned)[0] == "restart"
    outcome = run_plan([planned], runner=lambda c: seen.append(c) or in_process(c), log=lambda m: None)
    assert outcome.ran == [planned] and seen[1].resume is None
    assert run_status(planned)[0] == "complete"


def test_a_failed_run_is_reported_and_the_rest_still_run(tmp_path, capsys):
    def runner(cfg):
        if "topk-seed0" in cfg.out:
            raise RunFailed("run stopped after round 1: no client update was accepted")
        return in_process(cfg)

    assert reproduce.run(parse(["tiny", "--out", str(tmp_path), "--quiet"]), runner=runner) == 1
    err = capsys.readouterr().err
    assert "[1/2] topk-seed0: FAILED: run stopped after round 1" in err
    assert "1 of 2 runs complete" in err and "1 failed" in err
    report = tmp_path / "tiny" / "results.md"
    assert set(results_rows(report)) == {"bidirectional"}
    assert "topk-seed0: run stopped after round 1" in report.read_text()


def test_a_folder_holding_another_run_is_left_alone(tmp_path, capsys):
    (planned,) = expand("tiny", out=tmp_path, only=["topk"], overrides={"quiet": True})
    in_process(replace(planned.config, lr=0.05))
    before = (planned.path / "metrics.jsonl").read_text()
    status, why = run_status(planned)
    assert status == "conflict" and "lr: saved 0.05, planned 0.1" in why
    outcome = run_plan([planned], runner=in_process, log=lambda m: None)
    assert outcome.failed and outcome.ran == []
    assert (planned.path / "metrics.jsonl").read_text() == before
    (planned.path / "checkpoint.pt").unlink()  # no checkpoint: config.json still says whose run it is
    assert run_status(planned)[0] == "conflict"
    run_plan([planned], runner=in_process, log=lambda m: None)
    assert (planned.path / "metrics.jsonl").read_text() == before
    stranger = tmp_path / "tiny" / "bidirectional-seed0"
    stranger.mkdir(parents=True)
    (stranger / "notes.txt").write_text("mine")
    (other,) = expand("tiny", out=tmp_path, only=["bidirectional"])
    assert run_status(other)[0] == "conflict"


DIAGNOSED = """
title = "Diagnosed"
paper = "a paper"
columns = ["density", "cumulative_total_error", "no_such_metric"]
[base]
model = "mlp-784-64-10"
clients = 3
rounds = 2
local_steps = 1
lr = 0.1
ratio = 0.01
diagnostics = true
[[settings]]
name = "uni"
strategy = "topk"
paper = "Table 1: 21.78"
[[settings]]
name = "bi"
strategy = "bidirectional-topk"
"""


def test_the_report_has_the_rho_table_and_the_presets_columns(tmp_path):
    preset = parse_preset("diagnosed", DIAGNOSED)
    plan = expand(preset, seeds=2, out=tmp_path, overrides={"quiet": True})
    outcome = run_plan(plan, runner=in_process, log=lambda m: None)
    assert len(outcome.ran) == 4
    report = reproduce.write_report(tmp_path / "diagnosed", preset, plan, command="cmd", budget="small",
                                    non_iid=False, outcome=outcome)
    text = report.read_text()
    rows = results_rows(report)
    assert set(rows) == {"uni", "bi"} and rows["uni"]["seeds"] == "2"
    assert "±" in rows["uni"]["final acc (%)"]  # mean ± std over the two seeds
    rho = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]]
           for line in text.split("## ρ and ρ̂", 1)[1].split("\n## ", 1)[0].splitlines() if line.startswith("| ")}
    assert rho["uni"][1] == "-" and rho["uni"][2] == "Table 1: 21.78"  # unidirectional: ρ̂ only
    assert float(rho["uni"][0].split(" ")[0]) > 0 and float(rho["bi"][1].split(" ")[0]) >= 0
    other = text.split("## Other measures", 1)[1].split("\n## ", 1)[0]
    uni = next(line for line in other.splitlines() if line.startswith("| uni "))
    density, total_error, missing = [c.strip() for c in uni.strip("|").split("|")[1:]]
    assert float(density.split(" ")[0]) == pytest.approx(0.01, rel=0.05) and missing == "-"
    assert float(total_error.split(" ")[0]) > 0


def test_dry_run_prints_the_runs_and_runs_nothing(tmp_path, capsys):
    assert reproduce.run(parse(["rtopk", "--dry-run", "--seeds", "2", "--out", str(tmp_path)]),
                         runner=lambda cfg: pytest.fail("ran")) == 0
    out = capsys.readouterr().out
    assert "20 runs into" in out and "[20/20] randomk-99-epoch-seed1" in out and "[new]" in out
    assert not (tmp_path / "rtopk").exists()


def test_list_and_the_cli_wiring(capsys):
    assert cli.main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    for name in PAPERS:
        assert re.search(rf"^{re.escape(name)}\s+\S", out, re.M)
    assert cli.main(["reproduce", "nope"]) == 2


# ------------------------------------------------------------------ end to end, as CI runs it
@pytest.mark.slow
def test_tiny_preset_end_to_end_through_the_ray_simulation(tmp_path):
    """``fl-sparse reproduce tiny``: two runs in Flower's Ray simulation, the table and the plot."""
    assert cli.main(["reproduce", "tiny", "--out", str(tmp_path), "--quiet"]) == 0
    folder = tmp_path / "tiny"
    rows = results_rows(folder / "results.md")
    assert set(rows) == TINY_RUNS
    for row in rows.values():
        acc = float(row["final acc (%)"])
        assert 0.0 < acc <= 100.0 and math.isfinite(acc)
        assert float(row["uplink MB"]) > 0 and float(row["downlink MB"]) > 0
        assert row["rounds"] == "2" and row["seeds"] == "1"
    # sparse both ways: less than a dense fp32 model per client per round (3 clients, 2 rounds, d = 50,890)
    assert float(rows["bidirectional"]["uplink MB"]) < 3 * 2 * 50_890 * 4 / 1e6
    width, height = png_size(folder / "accuracy.png")
    assert width > 100 and height > 100
