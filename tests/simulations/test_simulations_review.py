"""Review of the experiment layer: compare's grouping, reproduce's duplicate-run check, RESULTS.md's claims.

Every test here runs on synthetic run folders or on parsed text (no Ray, no training).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from fl_sparse.server_app import RunConfig
from fl_sparse.simulations.compare import COLUMNS, group_labels, group_runs, load_run, summary_rows
from fl_sparse.simulations.reproduce import expand, parse_preset

ROOT = Path(__file__).resolve().parents[2]
D = 50_890


def _write_run(folder: Path, config: dict, accs, *, up=10_000, down=50_000, accepted=2) -> Path:
    folder.mkdir(parents=True)
    meta = {**config, "lr_used": 0.1, "num_params": D, "clients_per_round": accepted}
    (folder / "config.json").write_text(json.dumps(meta))
    rows = [{"round": i, "uplink_bytes": up, "downlink_bytes": down, "accepted": accepted, "test_accuracy": a,
             "elapsed_seconds": float(i)} for i, a in enumerate(accs, start=1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# ------------------------------------------------------------------ compare
def test_a_setting_written_as_an_int_or_as_a_float_is_one_setting(tmp_path):
    """fraction = 1 (a TOML int: a preset, or flwr run's pyproject run-config) and fraction = 1.0 (the CLI's
    float) are the same run. compare grouped by the JSON text of the settings, so the two seeds became two
    groups, both labelled 'fraction=1': two table rows that look the same, each '1 seed', no std."""
    base = asdict(RunConfig(clients=4, rounds=3))
    a = _write_run(tmp_path / "s0", {**base, "seed": 0, "fraction": 1}, [0.5, 0.6, 0.70])
    b = _write_run(tmp_path / "s1", {**base, "seed": 1, "fraction": 1.0}, [0.5, 0.6, 0.72])
    c = _write_run(tmp_path / "t0", {**base, "seed": 0, "fraction": 1.0, "strategy": "topk"}, [0.5, 0.6, 0.8])
    runs = [load_run(p) for p in (a, b, c)]
    groups = group_runs(runs)
    assert [[r.seed for r in g] for g in groups] == [[0, 1], [0]]
    assert group_labels(groups) == ["bidirectional-topk", "topk"]
    row = dict(zip(COLUMNS, summary_rows(runs)[0]))
    assert row["seeds"] == "2" and row["final acc (%)"] == "71.00 ± 1.41"


# ------------------------------------------------------------------ reproduce
PRESET = """
title = "review"
seeds = 1
[base]
model = "mlp-784-64-10"
clients = 2
rounds = 2
local_steps = 1
[[settings]]
name = "a"
strategy = "{strategy}"
[[settings]]
name = "b"
strategy = "{strategy}"
{extra}
"""


@pytest.mark.parametrize(
    "strategy, extra",
    [
        ("topk", "lr = 0.1"),  # the MLP's own lr: what setting "a" (lr unset) runs with
        ("adaptive-topk-no-ec", "error_feedback = false"),  # a -no-ec strategy ignores the flag
    ],
)
def test_expand_refuses_two_settings_that_compare_reports_as_one(tmp_path, strategy, extra):
    """expand refuses two settings that are the same run, but compared the raw RunConfig: lr unset vs the
    model's own lr, or a -no-ec strategy with and without error_feedback, passed. compare (write_report's
    table) groups such runs as one setting: results.md then has one row, named after the first setting,
    with both settings' runs as its seeds, and the second setting is missing from the table."""
    preset = parse_preset("review", PRESET.format(strategy=strategy, extra=extra))
    with pytest.raises(ValueError, match="same run"):
        plan = expand(preset, out=tmp_path)
        # What the report would do with it (reached only while the bug is there):
        runs = []
        for p in plan:
            _write_run(p.path, {**asdict(p.config)}, [0.5, 0.6])
            runs.append(load_run(p.path))
        assert len(group_runs(runs)) == 2, "write_report would merge settings 'a' and 'b' into one row"


# ------------------------------------------------------------------ RESULTS.md
def _table_after(text: str, heading: str) -> dict[str, dict[str, str]]:
    section = text.split(heading, 1)[1]
    lines = []
    for line in section.splitlines():
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            break
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def test_results_md_bidirectional_100_workers_claim_matches_its_table():
    text = (ROOT / "RESULTS.md").read_text()
    table = _table_after(text, "`fl-sparse reproduce bidirectional-topk --seeds 3 --out runs` (seeds 0-2)")
    topk, bidi = table["topk-w100"], table["bidirectional-w100"]
    # The claim quotes the final accuracies of the two 100-worker settings (table: 27.91 ± 1.84, 33.09 ± 1.80).
    claim = re.search(r"at 100 workers \(27\.9 ± 1\.8 % against 33\.1 ± 1\.8 % after (\d+) rounds\)", text)
    assert claim is not None
    assert bidi["final acc (%)"].startswith("27.91") and topk["final acc (%)"].startswith("33.09")
    assert claim.group(1) == topk["rounds"] == bidi["rounds"]


def test_a_seed_that_ran_twice_is_not_counted_as_two_seeds(tmp_path):
    """Two folders of one setting and one seed (a re-run next to the first run, as RESULTS.md's hard-threshold
    runs were, or a copy) were reported as '2' seeds with a 'spread over the seeds' of one seed's runs."""
    base = asdict(RunConfig(clients=4, rounds=3))
    first = _write_run(tmp_path / "seed0", {**base, "seed": 0}, [0.5, 0.6, 0.70])
    again = _write_run(tmp_path / "seed0-rerun", {**base, "seed": 0, "num_cpus": 2.0}, [0.5, 0.6, 0.72])
    other = _write_run(tmp_path / "seed1", {**base, "seed": 1}, [0.5, 0.6, 0.74])
    assert dict(zip(COLUMNS, summary_rows([load_run(first), load_run(again)])[0]))["seeds"] == "1 (2 runs)"
    assert dict(zip(COLUMNS, summary_rows([load_run(first), load_run(other)])[0]))["seeds"] == "2"


def test_a_run_that_stopped_before_its_last_round_is_marked(tmp_path):
    """A failed or interrupted run folder (rounds = 3 planned, 2 in metrics.jsonl) was reported like a
    finished 2-round run ('rounds 2'), and averaged into its setting's 'final acc' beside finished seeds with
    nothing in the row saying one of them stopped early."""
    base = asdict(RunConfig(clients=4, rounds=3))
    done = _write_run(tmp_path / "seed0", {**base, "seed": 0}, [0.5, 0.6, 0.70])
    stopped = _write_run(tmp_path / "seed1", {**base, "seed": 1}, [0.5, 0.55])
    assert dict(zip(COLUMNS, summary_rows([load_run(stopped)])[0]))["rounds"] == "2 of 3"
    assert dict(zip(COLUMNS, summary_rows([load_run(done), load_run(stopped)])[0]))["rounds"] == "2-3 of 3"
    assert dict(zip(COLUMNS, summary_rows([load_run(done)])[0]))["rounds"] == "3"


def test_labels_write_the_setting_value_not_a_rounded_one(tmp_path):
    """Labels wrote floats with :g (6 significant digits): the adaptive-topk preset's ratio 1/512 = 0.001953125
    was labelled 'ratio=0.00195312' (RESULTS.md's tables), the label of a run with --ratio 0.00195312,
    so two different settings got the same label."""
    base = asdict(RunConfig(clients=4, rounds=3))
    exact = _write_run(tmp_path / "a", {**base, "ratio": 1 / 512}, [0.5, 0.6, 0.7])
    copied = _write_run(tmp_path / "b", {**base, "ratio": 0.00195312}, [0.5, 0.6, 0.7])
    labels = group_labels(group_runs([load_run(exact), load_run(copied)]))
    assert labels == ["bidirectional-topk ratio=0.001953125", "bidirectional-topk ratio=0.00195312"]


def test_dry_run_lines_say_what_tells_the_settings_apart(tmp_path, capsys):
    """--dry-run printed a fixed list of fields: hard-threshold's threshold-0.3 and threshold-0.07, or
    adaptive-topk's topk-256 and topk-256-no-ec, printed the same line but for the name."""
    import argparse

    from fl_sparse.simulations import reproduce

    parser = argparse.ArgumentParser()
    reproduce.add_arguments(parser)
    lines = {}
    for name in ("hard-threshold", "adaptive-topk"):
        args = parser.parse_args([name, "--dry-run", "--seeds", "1", "--out", str(tmp_path)])
        assert reproduce.run(args, runner=lambda cfg: pytest.fail("ran")) == 0
        for line in capsys.readouterr().out.splitlines()[1:]:
            label = line.split()[1]
            lines[label] = line.split("  [")[0].split(None, 2)[2]  # the line without its number and label
    assert lines["threshold-0.3-seed0"] != lines["threshold-0.07-seed0"]
    assert "threshold=0.3" in lines["threshold-0.3-seed0"]
    assert lines["topk-256-seed0"] != lines["topk-256-no-ec-seed0"]
    assert "error_feedback=False" in lines["topk-256-no-ec-seed0"]
    assert "ratio=0.001953125" in lines["topk-512-seed0"]
    assert not (tmp_path / "hard-threshold").exists()


@pytest.mark.parametrize(
    "setting, model, clients, rounds, uplink_mb",
    [
        ("sgd-w20", "mlp-784-256-128-64-10", 20, 100, 1942.240),  # bidirectional-topk table
        ("topk-w20", "mlp-784-256-128-64-10", 20, 100, 2.630),
        ("ssgd-mv-ad-L4-Q", "mlp-784-64-10", 10, 30, 0.200),  # majority-voting table
        ("sgd", "logreg-784-10", 8, 100, 25.178),  # adaptive-topk table
    ],
)
def test_results_md_bits_per_param_column_is_compares_own_number(tmp_path, setting, model, clients, rounds,
                                                                  uplink_mb):
    """RESULTS.md's bits/param/round cells recomputed by compare from the table's own uplink MB (no run data is
    stored in docs/results, only the plots): rows that send the table's bytes give the table's bits."""
    from fl_sparse.tasks.models import build_model

    d = sum(p.numel() for p in build_model(model).parameters())
    text = (ROOT / "RESULTS.md").read_text()
    line = next(l for l in text.splitlines() if l.startswith(f"| {setting} |") and f"| {uplink_mb:.3f} |" in l)
    claimed = line.strip("|").split("|")[-2].strip()
    folder = tmp_path / setting
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model": model, "num_params": d, "clients": clients}))
    per_round = uplink_mb * 1e6 / rounds
    rows = [{"round": r, "uplink_bytes": 0, "accepted": clients, "cumulative_uplink_bytes": round(per_round * r),
             "cumulative_downlink_bytes": 0} for r in range(1, rounds + 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cells = dict(zip(COLUMNS, summary_rows([load_run(folder)])[0]))
    # The table's MB are rounded to 0.001 MB: allow the bits that rounding moves, plus the bits' own rounding.
    slack = 8 * 0.0005e6 / (d * clients * rounds) + 0.0005
    assert abs(float(cells["bits/param/round"]) - float(claimed)) <= slack


def test_simulate_names_a_resource_request_the_machine_cannot_meet_before_ray_starts(tmp_path, monkeypatch):
    """runner.simulate: preflight refuses more CPUs per client than the machine has, naming the flag, before
    Flower's simulation engine (Ray) is called."""
    import os

    import flwr.simulation

    from fl_sparse.simulations import runner

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: pytest.fail("Ray started"))
    cfg = RunConfig(clients=2, rounds=1, local_steps=1, num_cpus=float((os.cpu_count() or 1) + 1),
                    out=str(tmp_path / "r"))
    with pytest.raises(ValueError, match=r"num-cpus \d+ per client, but this machine has \d+ CPUs"):
        runner.simulate(cfg)
    assert runner.backend_config(replace(cfg, num_cpus=0.5, num_gpus=0.25))["client_resources"] == {
        "num_cpus": 0.5, "num_gpus": 0.25}
