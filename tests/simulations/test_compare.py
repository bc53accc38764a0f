"""``fl-sparse compare``: run folders loaded, seeds grouped, the table's numbers, the plot, the CLI."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from fl_sparse.cli import main
from fl_sparse.server_app import RunConfig
from fl_sparse.simulations.compare import (
    COLUMNS,
    group_labels,
    group_runs,
    load_run,
    plot_runs,
    summary_rows,
    summary_table,
)

D = 50_000  # num_params of the synthetic runs
# Setting A (bidirectional-topk), seeds 0, 1, 2: test accuracy per round; setting B (topk), seed 0.
ACC_A = {0: [0.50, 0.85, 0.80], 1: [0.50, 0.60, 0.82], 2: [0.50, 0.70, 0.84]}
WALL_A = {0: 3.0, 1: 4.0, 2: 5.0}


def _write_run(folder: Path, cfg: RunConfig, accs, *, up=10_000, down=50_000, accepted=2, wall=3.0, jsonl=True) -> Path:
    folder.mkdir(parents=True)
    meta = {**asdict(cfg), "lr_used": cfg.effective_lr, "num_params": D, "clients_per_round": accepted,
            "versions": {"fl_sparse": "0.1.0"}, "git_commit": None, "device": "cpu", "cpu_count": 2}
    (folder / "config.json").write_text(json.dumps(meta))
    rows = []
    for i, acc in enumerate(accs, start=1):
        row = {"round": i, "uplink_bytes": up, "downlink_bytes": down, "accepted": accepted,
               "elapsed_seconds": wall * i / len(accs)}
        if acc is not None:
            row["test_accuracy"] = acc
        rows.append(row)
    if jsonl:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:  # an older run folder: metrics.json only, without cumulative columns
        (folder / "metrics.json").write_text(json.dumps(rows))
    return folder


@pytest.fixture
def folders(tmp_path) -> list[Path]:
    base = RunConfig(clients=4, rounds=3)
    out = [
        _write_run(tmp_path / f"a-seed{s}", replace(base, seed=s, out=str(tmp_path / f"a-seed{s}"), num_cpus=1.0 + s),
                   ACC_A[s], wall=WALL_A[s])
        for s in (2, 0, 1)  # out of order: a group is sorted by seed
    ]
    out.append(_write_run(tmp_path / "b", replace(base, strategy="topk"), [0.6, 0.7, 0.75], up=20_000, wall=9.0))
    return out


def test_seeds_of_one_setting_are_one_group_other_settings_another(folders):
    runs = [load_run(f) for f in folders]
    groups = group_runs(runs)
    assert [[r.seed for r in g] for g in groups] == [[0, 1, 2], [0]]
    assert [g[0].config["strategy"] for g in groups] == ["bidirectional-topk", "topk"]
    assert group_labels(groups) == ["bidirectional-topk", "topk"]
    # The label says what differs from the defaults, never the seed.
    assert runs[0].label == "bidirectional-topk clients=4 rounds=3"
    assert replace(runs[0], config={**runs[0].config, "ratio": 0.001, "lr": 0.1}).label == (
        "bidirectional-topk clients=4 rounds=3 ratio=0.001"  # lr 0.1 is the MLP's own: not a difference
    )


def test_any_other_setting_splits_a_group(folders):
    runs = [load_run(f) for f in folders[:3]]
    runs[2] = replace(runs[2], config={**runs[2].config, "ratio": 0.001})
    groups = group_runs(runs)
    assert [[r.seed for r in g] for g in groups] == [[0, 2], [1]]
    assert group_labels(groups) == ["bidirectional-topk ratio=0.01", "bidirectional-topk ratio=0.001"]


def test_a_no_ec_strategy_is_labelled_without_error_feedback(tmp_path):
    # adaptive-topk-no-ec ignores RunConfig.error_feedback: its label must say what ran, not the flag.
    base = RunConfig(clients=4, rounds=3, error_feedback=True)
    no_ec = load_run(_write_run(tmp_path / "n", replace(base, strategy="adaptive-topk-no-ec"), [0.5, 0.6, 0.7]))
    topk = load_run(_write_run(tmp_path / "t", replace(base, strategy="topk", error_feedback=False), [0.5, 0.6, 0.7]))
    # Both ran without error feedback, so only the strategy tells them apart.
    assert group_labels(group_runs([no_ec, topk])) == ["adaptive-topk-no-ec", "topk"]
    assert "no-error-feedback" in no_ec.label


def test_table_numbers_mean_and_sample_std_over_seeds(folders):
    rows = summary_rows([load_run(f) for f in folders])
    a, b = (dict(zip(COLUMNS, r)) for r in rows)
    assert a == {
        "setting": "bidirectional-topk",
        "seeds": "3",
        "final acc (%)": "82.00 ± 2.00",  # 80, 82, 84
        "best acc (%)": "83.67 ± 1.53",  # 85, 82, 84: sample std sqrt(7/3)
        "rounds": "3",
        "uplink MB": "0.030",  # 3 x 10 kB
        "downlink MB": "0.150",
        "bits/param/round": "0.800",  # 8 * 30 000 bits / (50 000 params * 3 rounds * 2 clients)
        "wall s": "4.0",  # mean of 3, 4, 5
    }
    assert b["seeds"] == "1" and b["final acc (%)"] == "75.00" and b["best acc (%)"] == "75.00"
    assert b["uplink MB"] == "0.060" and b["bits/param/round"] == "1.600" and b["wall s"] == "9.0"


def test_text_and_markdown_tables(folders):
    runs = [load_run(f) for f in folders]
    text = summary_table(runs).splitlines()
    assert text[0].split("  ")[0] == "setting" and set(text[1]) == {"-", " "}
    assert text[2].startswith("bidirectional-topk") and "82.00 ± 2.00" in text[2] and "83.67 ± 1.53" in text[2]
    assert len({len(line) for line in text[:2]}) == 1  # aligned
    md = summary_table(runs, "markdown").splitlines()
    assert md[0] == "| " + " | ".join(COLUMNS) + " |" and md[1].count("---") == len(COLUMNS)
    assert md[2] == "| bidirectional-topk | 3 | 82.00 ± 2.00 | 83.67 ± 1.53 | 3 | 0.030 | 0.150 | 0.800 | 4.0 |"
    assert md[3] == "| topk | 1 | 75.00 | 75.00 | 3 | 0.060 | 0.150 | 1.600 | 9.0 |"
    with pytest.raises(ValueError, match="fmt must be"):
        summary_table(runs, "html")
    with pytest.raises(ValueError, match="no runs"):
        summary_table([])


def test_old_run_folder_metrics_json_gets_cumulative_columns(tmp_path):
    folder = _write_run(tmp_path / "old", RunConfig(), [0.5, None, 0.7], up=7, down=11, jsonl=False)
    run = load_run(folder)
    assert [(r["cumulative_uplink_bytes"], r["cumulative_downlink_bytes"]) for r in run.rows] == [(7, 11), (14, 22), (21, 33)]
    assert run.accuracies() == [(1, 0.5), (3, 0.7)]  # round 2 was not evaluated


def test_a_torn_last_line_is_skipped_a_bad_line_before_it_is_an_error(tmp_path):
    folder = _write_run(tmp_path / "r", RunConfig(), [0.5, 0.6])
    with open(folder / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 3, "upl')  # the process died while writing round 3
    assert [r["round"] for r in load_run(folder).rows] == [1, 2]
    (folder / "metrics.jsonl").write_text('{"round": 1}\nnot json\n{"round": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl: line 2 is not JSON"):
        load_run(folder)


def test_a_folder_without_metrics_or_settings_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no metrics.jsonl or metrics.json"):
        load_run(tmp_path / "empty")
    with pytest.raises(ValueError, match="no such run folder"):
        load_run(tmp_path / "missing")
    folder = _write_run(tmp_path / "noconfig", RunConfig(), [0.5])
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match=r"noconfig: no config.json"):
        load_run(folder)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"round": "x"}, "row 2: 'round' must be an integer, got 'x'"),
        ({"round": None}, "row 2: 'round' must be an integer, got None"),
        ({"round": 2.5}, "row 2: 'round' must be an integer, got 2.5"),
        ({"uplink_bytes": "abc"}, "row 2 \\(round 2\\): 'uplink_bytes' must be a number, got 'abc'"),
        ({"cumulative_uplink_bytes": "lots"}, "row 2 \\(round 2\\): 'cumulative_uplink_bytes' must be a number, got 'lots'"),
        ({"elapsed_seconds": True}, "row 2 \\(round 2\\): 'elapsed_seconds' must be a number, got True"),
    ],
)
def test_a_damaged_metrics_row_is_named_with_its_file_row_and_column(tmp_path, capsys, change, message):
    folder = _write_run(tmp_path / "r", RunConfig(), [0.5, 0.6, 0.7])
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    rows[1].update(change)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=f"metrics.jsonl: {message}"):
        load_run(folder)
    assert main(["compare", str(folder)]) == 2
    assert "metrics.jsonl: row 2" in capsys.readouterr().err


def test_a_damaged_config_or_a_file_for_a_folder_is_named(tmp_path):
    folder = _write_run(tmp_path / "r", RunConfig(), [0.5])
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_params": "x"}))
    with pytest.raises(ValueError, match="config.json: 'num_params' must be a number, got 'x'"):
        load_run(folder)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="a-file: a file, not a run folder"):
        load_run(tmp_path / "a-file")


def test_plot_is_a_png_with_a_band_for_the_group_of_seeds(folders, tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    bands = []
    real = Axes.fill_between
    monkeypatch.setattr(Axes, "fill_between", lambda self, x, lo, hi, **kw: bands.append((list(x), lo, hi)) or real(self, x, lo, hi, **kw))
    path = tmp_path / "plots" / "cmp.png"
    plot_runs([load_run(f) for f in folders], path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # Group A only (3 seeds), on both panels: x = rounds, then x = mean cumulative MB (up + down).
    assert [b[0] for b in bands] == [[1, 2, 3], [0.06, 0.12, 0.18]]
    assert bands[0][1][1] == pytest.approx(71.6667 - 12.5831, abs=1e-3)  # round 2: 85, 60, 70 -> mean - std
    with pytest.raises(ValueError, match="no runs"):
        plot_runs([], tmp_path / "x.png")


def test_cli_compare_prints_the_table_and_writes_the_plot(folders, tmp_path, capsys):
    png = tmp_path / "cmp.png"
    assert main(["compare", *map(str, folders), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[2].startswith("bidirectional-topk") and "82.00 ± 2.00" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["compare", *map(str, folders), "--markdown"]) == 0
    assert "| topk | 1 | 75.00 |" in capsys.readouterr().out


def test_cli_compare_exit_codes_for_bad_folders(folders, tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    assert main(["compare", str(folders[0]), str(tmp_path / "nothing")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"fl-sparse compare: error: {tmp_path / 'nothing'}: no metrics.jsonl" in captured.err
    (tmp_path / "a-file").write_text("")
    assert main(["compare", str(folders[0]), "--plot", str(tmp_path / "a-file" / "x.png")]) == 1
    assert "cannot write the plot" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["compare"])
    assert exc.value.code == 2


def test_real_runs_round_trip_through_compare(tmp_path):
    """Two seeds of a short in-process run: one group; bits per parameter from the real payloads."""
    from fl_sparse.clients.app import app as client_app
    from fl_sparse.server_app import run_server
    from inprocess import InProcessGrid

    base = RunConfig(clients=3, rounds=2, local_steps=1, batch_size=10, ratio=0.02, quiet=True)
    rows = {}
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        rows[seed] = run_server(InProcessGrid(client_app, 3), replace(base, seed=seed, out=str(out)))
    runs = [load_run(tmp_path / f"seed{s}") for s in (0, 1)]
    assert [r.rows for r in runs] == [rows[0], rows[1]]
    (group,) = group_runs(runs)
    assert len(group) == 2
    cells = dict(zip(COLUMNS, summary_rows(runs)[0]))
    bits = [8 * sum(r["uplink_bytes"] for r in rows[s]) / (50_890 * sum(r["accepted"] for r in rows[s])) for s in (0, 1)]
    assert cells["bits/param/round"] == f"{sum(bits) / 2:.3f}"
    assert 0 < sum(bits) / 2 < 32 * 0.02 * 2  # ~2 % of the entries, each position and value well under 64 bits
    assert cells["seeds"] == "2" and " ± " in cells["final acc (%)"]


def test_how_a_run_ran_never_splits_a_setting():
    """A run joined to a Ray cluster, or allowed more failed rounds, computes the same as one that was not:
    every option a resumed run may change (but the number of rounds) is not a setting."""
    from fl_sparse.server_app import RESUME_OVERRIDES
    from fl_sparse.simulations.compare import NOT_A_SETTING, Run, group_runs

    assert set(RESUME_OVERRIDES) - {"rounds"} <= NOT_A_SETTING
    runs = [Run(Path("a"), {"strategy": "topk", "seed": 0}),
            Run(Path("b"), {"strategy": "topk", "seed": 1, "ray_address": "10.0.0.1:6379"}),
            Run(Path("c"), {"strategy": "topk", "seed": 2, "max_failed_rounds": 5})]
    assert len(group_runs(runs)) == 1
