"""``fl-sparse compare`` rule by rule (written to kill the mutants of ``fl_sparse/simulations/compare.py``).

Small run folders written here (``config.json`` and ``metrics.jsonl`` / ``metrics.json``), every
expected number worked out by hand in the comments; no simulation runs.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import struct
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import pytest

from fl_sparse import checkpoint
from fl_sparse.server_app import RunConfig
from fl_sparse.simulations import compare
from fl_sparse.simulations.compare import (
    COLUMNS,
    NOT_A_SETTING,
    Run,
    add_arguments,
    group_labels,
    group_runs,
    load_run,
    plot_runs,
    setting_key,
    summary_rows,
    summary_table,
)


def write_run(folder: Path, config, rows, *, metrics="metrics.jsonl") -> Path:
    """A run folder: ``config.json`` (None: none) and the rows as ``metrics.jsonl`` (one JSON object a line)
    or as an older run's ``metrics.json`` (one list)."""
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if metrics == "metrics.jsonl":
        (folder / metrics).write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        (folder / metrics).write_text(json.dumps(rows))
    return folder


def cells(runs) -> list[dict[str, str]]:
    return [dict(zip(COLUMNS, row)) for row in summary_rows(runs)]


def labels(*configs) -> list[str]:
    return group_labels(group_runs([Run(Path(f"r{i}"), c) for i, c in enumerate(configs)]))


# ------------------------------------------------------------------ settings, groups, labels
@pytest.mark.parametrize("key", sorted(NOT_A_SETTING))
def test_each_way_of_running_is_not_a_setting(key):
    a = Run(Path("a"), {"strategy": "topk", "clients": 4, key: 1})
    b = Run(Path("b"), {"strategy": "topk", "clients": 4, key: 2})
    assert setting_key(a.config) == setting_key(b.config)
    assert [[r.path for r in g] for g in group_runs([a, b])] == [[Path("a"), Path("b")]]
    assert a.label == "topk clients=4"  # never named in a label


@pytest.mark.parametrize("name", [f.name for f in fields(RunConfig) if f.name not in NOT_A_SETTING])
def test_every_other_field_of_runconfig_is_a_setting(name):
    default = getattr(RunConfig(), name)
    other = (not default if isinstance(default, bool) else "other" if isinstance(default, str)
             else 7 if default is None else default + 3)
    a, b = Run(Path("a"), {}), Run(Path("b"), {name: other})
    assert setting_key(a.config) != setting_key(b.config)
    assert len(group_runs([a, b])) == 2


def test_a_missing_field_is_its_default_and_other_keys_are_not_settings():
    assert setting_key({}) == setting_key(asdict(RunConfig()))
    assert setting_key({"num_params": 1, "versions": {"a": 1}, "git_commit": "x"}) == setting_key({})
    assert setting_key({"clients": 4}) != setting_key({})


def test_whole_floats_are_ints_other_floats_stay():
    assert setting_key({"fraction": 1}) == setting_key({"fraction": 1.0}) == setting_key({})
    assert setting_key({"alpha": 0.5}) != setting_key({"alpha": 0})
    assert setting_key({"alpha": 2.0}) == setting_key({"alpha": 2}) != setting_key({"alpha": 2.5})
    assert Run(Path("a"), {"alpha": 2.0}).label == "bidirectional-topk alpha=2"
    assert Run(Path("a"), {"alpha": 0.25}).label == "bidirectional-topk alpha=0.25"
    assert Run(Path("a"), {"dataset": "cifar-10"}).label == "bidirectional-topk dataset=cifar-10"


def test_a_value_json_cannot_write_is_compared_by_its_text():
    # Python code may hand compare a config with, say, a Path for the dataset: it is the same setting as its text.
    assert setting_key({"dataset": Path("data/x")}) == setting_key({"dataset": "data/x"})
    assert labels({"dataset": Path("data/x")}, {"dataset": Path("data/y")}) == [
        "bidirectional-topk dataset=data/x", "bidirectional-topk dataset=data/y"]


def test_lr_as_used_the_config_lr_then_lr_used_then_the_models_own():
    # mlp-784-64-10 (the default model) trains at 0.1 by default; cnn-fmnist at 0.02 (MODEL_LR).
    assert setting_key({"lr": 0.2}) == setting_key({"lr_used": 0.2}) == setting_key({"lr": None, "lr_used": 0.2})
    assert setting_key({"lr": 0.2, "lr_used": 0.3}) == setting_key({"lr": 0.2})
    assert setting_key({"lr_used": 0.1}) == setting_key({}) == setting_key({"lr": 0.1})
    assert setting_key({"model": "cnn-fmnist"}) == setting_key({"model": "cnn-fmnist", "lr": 0.02})
    assert setting_key({"model": "cnn-fmnist"}) != setting_key({"model": "cnn-fmnist", "lr": 0.1})
    assert Run(Path("a"), {"lr_used": 0.3}).label == "bidirectional-topk lr=0.3"
    assert Run(Path("a"), {}).label == "bidirectional-topk"
    assert Run(Path("a"), {"model": "cnn-fmnist", "lr": 0.02}).label == "bidirectional-topk model=cnn-fmnist"
    assert Run(Path("a"), {"model": "cnn-fmnist", "lr": 0.1}).label == "bidirectional-topk model=cnn-fmnist lr=0.1"
    assert Run(Path("a"), {"model": "cnn-fmnist", "lr_used": 0.1}).label == (
        "bidirectional-topk model=cnn-fmnist lr=0.1")
    # A model fl-sparse does not know has no lr of its own: an lr given is a difference.
    assert Run(Path("a"), {"model": "mine", "lr": 0.1}).label == "bidirectional-topk model=mine lr=0.1"


def test_a_no_ec_strategy_ran_without_error_feedback_whatever_the_flag():
    assert setting_key({"strategy": "x-no-ec"}) == setting_key({"strategy": "x-no-ec", "error_feedback": False})
    assert setting_key({"strategy": "x-no-ec", "error_feedback": True}) == setting_key(
        {"strategy": "x-no-ec", "error_feedback": False})
    assert Run(Path("a"), {"strategy": "x-no-ec"}).label == "x-no-ec no-error-feedback"
    # Only the end of the name counts.
    assert Run(Path("a"), {"strategy": "no-ec-x"}).label == "no-ec-x"
    assert setting_key({"strategy": "no-ec-x"}) != setting_key({"strategy": "no-ec-x", "error_feedback": False})


def test_label_names_short_names_and_on_off_settings_in_field_order():
    config = {"strategy": "topk", "seed": 3, "out": "x", "diagnostics": True, "error_feedback": False,
              "value_bits": 8, "downlink_ratio": 0.5, "momentum": 0.9, "batch_size": 64, "local_steps": 5,
              "self_balancing": True, "min_partition_size": 3, "error_memory_dtype": "bfloat16"}
    assert Run(Path("a"), config).label == (
        "topk min-partition-size=3 self-balancing H=5 B=64 momentum=0.9 down-ratio=0.5 bits=8 "
        "no-error-feedback error-memory-dtype=bfloat16 diagnostics"
    )


def test_label_floats_with_ten_significant_digits():
    assert Run(Path("a"), {"ratio": 1 / 512}).label == "bidirectional-topk ratio=0.001953125"
    assert Run(Path("a"), {"ratio": 0.1 + 0.2}).label == "bidirectional-topk ratio=0.3"  # 0.30000000000000004
    assert Run(Path("a"), {"ratio": 1 / 3}).label == "bidirectional-topk ratio=0.3333333333"
    assert Run(Path("a"), {"ratio": 1.5e-7}).label == "bidirectional-topk ratio=1.5e-07"


def test_run_seed():
    assert Run(Path("a"), {"seed": 4}).seed == 4
    assert Run(Path("a"), {}).seed is None


def test_group_labels_say_what_differs_among_the_groups():
    assert group_labels([]) == []
    # One group: what differs from the defaults.
    assert labels({"strategy": "topk", "clients": 4, "seed": 0}, {"strategy": "topk", "clients": 4, "seed": 1}) == [
        "topk clients=4"]
    # Two groups: only what differs between them (clients=4 is in both).
    assert labels({"strategy": "topk", "clients": 4, "ratio": 0.1},
                  {"strategy": "topk", "clients": 4, "ratio": 0.2}) == ["topk ratio=0.1", "topk ratio=0.2"]
    # The strategy always leads, never twice; a setting that differs in one group only is named in all.
    assert labels({"strategy": "topk", "clients": 4, "ratio": 0.1, "error_feedback": True},
                  {"strategy": "topk", "clients": 4, "ratio": 0.2, "error_feedback": True},
                  {"strategy": "randk", "clients": 4, "ratio": 0.1, "error_feedback": False}) == [
        "topk ratio=0.1 error-feedback", "topk ratio=0.2 error-feedback", "randk ratio=0.1 no-error-feedback"]
    # 1 and 1.0 are one value: not a difference.
    assert labels({"fraction": 1, "rounds": 2}, {"fraction": 1.0, "rounds": 3}) == [
        "bidirectional-topk rounds=2", "bidirectional-topk rounds=3"]


def test_groups_in_order_of_first_appearance_each_sorted_by_seed():
    runs = [Run(Path(f"{s}{seed}"), {"strategy": s, "seed": seed})
            for s, seed in [("b", 2), ("a", 1), ("b", 0), ("a", 0), ("b", 1)]]
    assert [[r.path.name for r in g] for g in group_runs(runs)] == [["b0", "b1", "b2"], ["a0", "a1"]]


def test_seeds_of_other_types_and_missing_seeds_sort_without_error():
    # A run without a seed sorts first (its type's name, NoneType, sorts before int's); two such runs keep their order.
    runs = [Run(Path("s1"), {"seed": 1}), Run(Path("s0"), {"seed": 0}), Run(Path("none-a"), {}),
            Run(Path("none-b"), {"seed": None})]
    (group,) = group_runs(runs)
    assert [r.path.name for r in group] == ["none-a", "none-b", "s0", "s1"]
    runs = [Run(Path("x"), {"seed": "x"}), Run(Path("s3"), {"seed": 3}), Run(Path("s2"), {"seed": 2})]
    (group,) = group_runs(runs)
    assert [r.path.name for r in group] == ["s2", "s3", "x"]  # "<class 'int'>" < "<class 'str'>"


# ------------------------------------------------------------------ loading
ROW = {"uplink_bytes": 10, "downlink_bytes": 20}


def test_load_run_reads_config_and_rows_and_adds_byte_sums(tmp_path):
    config = {"strategy": "topk", "seed": 1, "num_params": 100}
    folder = write_run(tmp_path / "r", config, [{"round": 1, **ROW}, {"round": 2, **ROW, "test_accuracy": 0.5}])
    run = load_run(str(folder))
    assert run.path == folder and isinstance(run.path, Path)
    assert run.config == config
    assert run.rows == [
        {"round": 1, **ROW, "cumulative_uplink_bytes": 10, "cumulative_downlink_bytes": 20},
        {"round": 2, **ROW, "test_accuracy": 0.5, "cumulative_uplink_bytes": 20, "cumulative_downlink_bytes": 40},
    ]


def test_what_is_not_a_run_folder_is_named(tmp_path):
    (tmp_path / "a-file").write_text("{}")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'a-file'}: a file, not a run folder")):
        load_run(tmp_path / "a-file")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'gone'}: no such run folder")):
        load_run(tmp_path / "gone")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path / 'empty'}: no metrics.jsonl or metrics.json (not a run folder of fl-sparse simulate --out)")):
        load_run(tmp_path / "empty")
    folder = write_run(tmp_path / "r", None, [{"round": 1}])
    with pytest.raises(ValueError, match=re.escape(
            f"{folder}: no config.json (nor checkpoint.pt) saying what the run's settings were")):
        load_run(folder)


def test_metrics_jsonl_is_read_before_metrics_json(tmp_path):
    folder = write_run(tmp_path / "r", {}, [{"round": 1}, {"round": 2}])
    (folder / "metrics.json").write_text(json.dumps([{"round": 7}]))
    assert [r["round"] for r in load_run(folder).rows] == [1, 2]
    (folder / "metrics.jsonl").unlink()
    assert [r["round"] for r in load_run(folder).rows] == [7]


def test_blank_lines_are_skipped_and_a_complete_bad_last_line_is_an_error(tmp_path):
    folder = write_run(tmp_path / "r", {}, [])
    jsonl = folder / "metrics.jsonl"
    jsonl.write_text('{"round": 1}\n\n   \n{"round": 2}\n\n')
    assert [r["round"] for r in load_run(folder).rows] == [1, 2]
    # Followed by its newline, the last line was written whole: broken, not torn.
    jsonl.write_text('{"round": 1}\n{"round": 2\n')
    with pytest.raises(ValueError, match=re.escape(f"{jsonl}: line 2 is not JSON")):
        load_run(folder)
    jsonl.write_text('{"round": 1}\n\n{"round": 2\n\n')
    with pytest.raises(ValueError, match=re.escape(f"{jsonl}: line 3 is not JSON")):
        load_run(folder)
    jsonl.write_text('{"round": 1}\n{"round": 2}\n{"rou')  # torn: no newline after it
    assert [r["round"] for r in load_run(folder).rows] == [1, 2]
    jsonl.write_text("")
    assert load_run(folder).rows == []


def test_a_metrics_jsonl_that_is_not_text_is_named(tmp_path):
    # Fixed 2026-11-27: the decoding error came out bare ("'utf-8' codec can't decode byte 0xff ..."), no file named.
    folder = write_run(tmp_path / "r", {}, [])
    (folder / "metrics.jsonl").write_bytes(b'\xff\xfe{"round": 1}\n')
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'metrics.jsonl'} is not text: ")):
        load_run(folder)


def test_a_broken_or_wrong_metrics_json_is_named(tmp_path):
    folder = write_run(tmp_path / "r", {}, [{"round": 1}], metrics="metrics.json")
    (folder / "metrics.json").write_text("[{")
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'metrics.json'} is not JSON: ")):
        load_run(folder)
    (folder / "metrics.json").write_text('{"round": 1}')
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'metrics.json'} is not a list of rows")):
        load_run(folder)


@pytest.mark.parametrize("rows", [[{"round": 1}, {"test_accuracy": 0.5}], [{"round": 1}, [1]], [3]])
def test_rows_must_be_objects_with_a_round(tmp_path, rows):
    folder = write_run(tmp_path / "r", {}, rows)
    with pytest.raises(ValueError, match=re.escape(f"{folder}: metrics rows must be objects with a 'round'")):
        load_run(folder)


def test_a_broken_or_wrong_config_json_is_named(tmp_path):
    folder = write_run(tmp_path / "r", {}, [{"round": 1}])
    (folder / "config.json").write_text("{")
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'config.json'} is not JSON: ")):
        load_run(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'config.json'} is not a JSON object")):
        load_run(folder)


def test_settings_from_the_checkpoint_when_there_is_no_config_json(tmp_path):
    folder = write_run(tmp_path / "r", None, [{"round": 1}])
    checkpoint.save(folder, {"round": 1, "config": {"strategy": "topk", "seed": 5}, "rows": [], "strategy": {}})
    run = load_run(folder)
    assert run.config == {"strategy": "topk", "seed": 5} and type(run.config) is dict
    (folder / "config.json").write_text(json.dumps({"strategy": "randk"}))  # config.json comes first
    assert load_run(folder).config == {"strategy": "randk"}


def test_rounds_and_numbers_that_are_allowed(tmp_path):
    rows = [{"round": 1.0, "test_accuracy": None, "uplink_bytes": None},
            {"round": 2, "test_accuracy": float("nan")}, {"round": 3, "test_accuracy": 1},
            {"round": 4, "test_accuracy": float("inf")}, {"round": 5, "test_accuracy": 0.25},
            {"round": 6, "test_accuracy": -float("inf")}, {"round": 7}]
    folder = write_run(tmp_path / "r", {"num_params": None}, rows)
    run = load_run(folder)
    acc = run.accuracies()
    assert acc == [(3, 1.0), (5, 0.25)]
    assert [(type(r), type(a)) for r, a in acc] == [(int, float)] * 2


@pytest.mark.parametrize("value", [True, "2", [2]])
def test_a_round_that_is_not_a_number(tmp_path, value):
    folder = write_run(tmp_path / "r", {}, [{"round": 1}, {"round": value}])
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'metrics.jsonl'}: row 2: 'round' must be an integer, "
                                                   f"got {value!r}")):
        load_run(folder)


@pytest.mark.parametrize("key", ["test_accuracy", "accepted", "round_seconds", "cumulative_downlink_bytes"])
def test_a_metric_that_is_not_a_number(tmp_path, key):
    folder = write_run(tmp_path / "r", {}, [{"round": 1}, {"round": 2.0, key: False}])
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'metrics.jsonl'}: row 2 (round 2.0): {key!r} must be "
                                                   "a number, got False")):
        load_run(folder)


def test_num_params_must_be_a_number_or_absent(tmp_path):
    folder = write_run(tmp_path / "r", {"num_params": True}, [{"round": 1}])
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'config.json'}: 'num_params' must be a number, "
                                                   "got True")):
        load_run(folder)
    (folder / "config.json").write_text("{}")
    assert load_run(folder).config == {}


def test_the_rows_are_checked_before_the_settings_are_looked_for(tmp_path):
    folder = write_run(tmp_path / "r", None, [{"test_accuracy": 0.5}])
    with pytest.raises(ValueError, match="metrics rows must be objects"):
        load_run(folder)


# ------------------------------------------------------------------ the table's numbers
def rows_of(*specs):
    """Rows from (up, down, accepted, accuracy, elapsed) tuples; None: the column is left out."""
    names = ("uplink_bytes", "downlink_bytes", "accepted", "test_accuracy", "elapsed_seconds")
    return [{"round": i, **{n: v for n, v in zip(names, spec) if v is not None}} for i, spec in enumerate(specs, 1)]


BASE = {"strategy": "topk", "num_params": 100_000, "clients_per_round": 4, "rounds": 3}


def test_one_run_all_columns(tmp_path):
    rows = rows_of((1_000_000, 3_000_000, 4, 0.8, 2.0), (1_500_000, 3_000_000, 2, None, 5.0),
                   (500_000, 3_000_000, 3, 0.75, 9.5))
    run = load_run(write_run(tmp_path / "r", {**BASE, "seed": 0}, rows))
    assert cells([run]) == [{
        "setting": "topk rounds=3", "seeds": "1",
        "final acc (%)": "75.00", "best acc (%)": "80.00",  # the last evaluated round; the best of all
        "rounds": "3",
        "uplink MB": "3.000", "downlink MB": "9.000",
        "bits/param/round": "26.667",  # 8 * 3e6 bits / (1e5 params * (4 + 2 + 3) accepted updates)
        "wall s": "9.5",  # the last row's elapsed seconds
    }]


def test_bits_per_parameter_from_the_rounds_times_clients_when_accepted_is_not_in_every_row(tmp_path):
    rows = rows_of((1_000_000, 0, None, 0.5, None), (1_500_000, 0, 2, 0.5, None), (500_000, 0, 3, 0.5, None))
    run = load_run(write_run(tmp_path / "r", BASE, rows))
    assert cells([run])[0]["bits/param/round"] == "20.000"  # 8 * 3e6 / (1e5 * 3 rounds * 4 clients)
    rows = rows_of((1_000_000, 0, 2.0, 0.5, None), (1_500_000, 0, 2.0, 0.5, None), (500_000, 0, 2.0, 0.5, None))
    run = load_run(write_run(tmp_path / "floats", BASE, rows))
    assert cells([run])[0]["bits/param/round"] == "20.000"  # not ints: not read as counts


@pytest.mark.parametrize("change", [{"num_params": None}, {"num_params": 0}, {"clients_per_round": None},
                                    {"clients_per_round": 0}])
def test_no_bits_per_parameter_without_the_parameter_or_update_count(tmp_path, change):
    rows = rows_of((1_000_000, 0, None, 0.5, None))
    config = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    assert cells([load_run(write_run(tmp_path / "r", config, rows))])[0]["bits/param/round"] == "-"


def test_no_bits_per_parameter_with_no_accepted_update(tmp_path):
    rows = rows_of((0, 0, 0, 0.5, None))
    assert cells([load_run(write_run(tmp_path / "r", BASE, rows))])[0]["bits/param/round"] == "-"


def test_wall_time_the_last_rows_elapsed_else_the_sum_of_round_seconds(tmp_path):
    def wall(name, rows):
        return cells([load_run(write_run(tmp_path / name, BASE, rows))])[0]["wall s"]

    both = [{"round": 1, "round_seconds": 1.0, "elapsed_seconds": 4.0},
            {"round": 2, "round_seconds": 2.0, "elapsed_seconds": 10.0}]
    assert wall("both", both) == "10.0"  # elapsed counts the evaluation too: not the sum 3
    assert wall("sum", [{"round": 1, "round_seconds": 1.5}, {"round": 2, "round_seconds": 2.5, "elapsed_seconds": None}]
                ) == "4.0"
    assert wall("int", [{"round": 1, "round_seconds": 1}, {"round": 2, "round_seconds": 2}]) == "3.0"
    assert wall("missing", [{"round": 1, "round_seconds": 1.5}, {"round": 2}]) == "-"
    assert wall("none", [{"round": 1, "round_seconds": 1.5}, {"round": 2, "round_seconds": None}]) == "-"
    assert wall("elapsed-early", [{"round": 1, "elapsed_seconds": 3.0}, {"round": 2}]) == "-"


def test_a_run_without_rows(tmp_path):
    run = load_run(write_run(tmp_path / "r", {**BASE, "num_params": 10}, []))
    assert cells([run]) == [{"setting": "topk rounds=3", "seeds": "1", "final acc (%)": "-", "best acc (%)": "-",
                             "rounds": "0 of 3", "uplink MB": "0.000", "downlink MB": "0.000",
                             "bits/param/round": "-", "wall s": "-"}]


def test_byte_columns_from_the_last_rows_running_sums(tmp_path):
    # A run's own sums win (a resumed run's rows carry them); a null sum is no traffic measured.
    rows = [{"round": 1, "uplink_bytes": 5, "cumulative_uplink_bytes": 2_000_000, "cumulative_downlink_bytes": 7_000_000},
            {"round": 2, "uplink_bytes": 5, "cumulative_uplink_bytes": 4_500_000, "cumulative_downlink_bytes": 8_000_000}]
    c = cells([load_run(write_run(tmp_path / "r", {"num_params": 1_000_000, "clients_per_round": 1}, rows))])[0]
    assert (c["uplink MB"], c["downlink MB"], c["bits/param/round"]) == ("4.500", "8.000", "18.000")  # 8*4.5e6/(1e6*2)
    # MB are 10**6 bytes: gigabytes of traffic to the byte.
    rows = [{"round": 1, "uplink_bytes": 3_000_000_000, "downlink_bytes": 5_000_000_000}]
    c = cells([load_run(write_run(tmp_path / "big", {}, rows))])[0]
    assert (c["uplink MB"], c["downlink MB"]) == ("3000.000", "5000.000")
    rows = [{"round": 1, "cumulative_uplink_bytes": None, "cumulative_downlink_bytes": None}]
    c = cells([load_run(write_run(tmp_path / "null", {"num_params": 1, "clients_per_round": 1}, rows))])[0]
    assert (c["uplink MB"], c["downlink MB"], c["bits/param/round"]) == ("0.000", "0.000", "0.000")


def test_means_over_seeds_and_runs_without_a_number_left_out(tmp_path):
    config = {**BASE, "rounds": 2}
    a = write_run(tmp_path / "a", {**config, "seed": 0}, rows_of((1_000_000, 0, 4, 0.5, 1.0), (1_000_000, 0, 4, 0.6, 3.0)))
    b = write_run(tmp_path / "b", {**config, "seed": 1}, rows_of((3_000_000, 0, 4, None, None), (3_000_000, 0, 4, None, None)))
    c = write_run(tmp_path / "c", {**config, "seed": 2}, rows_of((2_000_000, 0, 4, 0.7, 2.0), (2_000_000, 0, 4, 0.8, 6.0)))
    assert cells([load_run(f) for f in (a, b, c)]) == [{
        "setting": "topk rounds=2", "seeds": "3",
        "final acc (%)": "70.00 ± 14.14",  # 60 and 80 (b evaluated nothing): sample std sqrt(200)
        "best acc (%)": "70.00 ± 14.14",
        "rounds": "2",
        "uplink MB": "4.000",  # (2 + 6 + 4) / 3
        "downlink MB": "0.000",
        "bits/param/round": "40.000",  # 8 * (2e6, 6e6, 4e6) / (1e5 params * 8 updates) = 20, 60, 40
        "wall s": "4.5",  # (3 + 6) / 2: b has no time
    }]


def test_a_non_finite_number_is_printed_as_python_writes_it(tmp_path):
    # Not hidden: a byte count that overflowed a float (JSON 1e400) and a clock that read NaN.
    rows = [{"round": 1, "cumulative_uplink_bytes": float("inf"), "cumulative_downlink_bytes": float("inf"),
             "elapsed_seconds": float("nan")}]
    c = cells([load_run(write_run(tmp_path / "r", {"num_params": 10, "clients_per_round": 1}, rows))])[0]
    assert [c[k] for k in COLUMNS[5:]] == ["inf", "inf", "inf", "nan"]


def test_rounds_column_says_when_a_run_stopped_early(tmp_path):
    def rounds(name, *runs):
        return cells([load_run(write_run(tmp_path / f"{name}{i}", cfg, [{"round": r} for r in range(1, n + 1)]))
                      for i, (cfg, n) in enumerate(runs)])[0]["rounds"]

    assert rounds("done", ({"rounds": 3, "seed": 0}, 3), ({"rounds": 3, "seed": 1}, 3)) == "3"
    assert rounds("one", ({"rounds": 3, "seed": 0}, 3), ({"rounds": 3, "seed": 1}, 2)) == "2-3 of 3"
    assert rounds("both", ({"rounds": 3, "seed": 0}, 1), ({"rounds": 3, "seed": 1}, 2)) == "1-2 of 3"
    assert rounds("same", ({"rounds": 4, "seed": 0}, 2), ({"rounds": 4, "seed": 1}, 2)) == "2 of 4"
    # A config that does not say its rounds (default 20: same setting) plans nothing known.
    assert rounds("unknown", ({}, 2), ({"rounds": 20, "seed": 1}, 2)) == "2 of 20"
    assert rounds("unknown2", ({}, 2), ({"seed": 1}, 3)) == "2-3"
    assert rounds("float", ({"rounds": 3.0}, 2)) == "2"


def test_seeds_column_counts_distinct_seeds(tmp_path):
    def seeds(*configs):
        return cells([Run(Path(f"r{i}"), c, [{"round": 1}]) for i, c in enumerate(configs)])[0]["seeds"]

    assert seeds({"seed": 0}, {"seed": 1}) == "2"
    assert seeds({"seed": 0, "out": "a"}, {"seed": 0, "out": "b"}) == "1 (2 runs)"
    assert seeds({"seed": 0}, {"seed": 1}, {"seed": 1}) == "2 (3 runs)"
    assert seeds({}, {"seed": None}) == "1 (2 runs)"


# ------------------------------------------------------------------ the printed table
def one_run(tmp_path):
    rows = rows_of((500, 1000, 2, 0.5, 1.0), (500, 1000, 2, 0.625, 2.5))
    return load_run(write_run(tmp_path / "r", {"strategy": "topk", "num_params": 1000, "rounds": 2, "seed": 0}, rows))


# The cells (by hand): label "topk rounds=2"; 1 seed; 62.50 both; 2 rounds; 1000 B up = 0.001 MB, 2000 B
# down = 0.002 MB; 8 * 1000 / (1000 params * 4 updates) = 2.000 bits; 2.5 s.
TEXT = (
    "setting        seeds  final acc (%)  best acc (%)  rounds  uplink MB  downlink MB  bits/param/round  wall s\n"
    "-------------  -----  -------------  ------------  ------  ---------  -----------  ----------------  ------\n"
    "topk rounds=2      1          62.50         62.50       2      0.001        0.002             2.000     2.5\n"
)
MARKDOWN = (
    "| setting | seeds | final acc (%) | best acc (%) | rounds | uplink MB | downlink MB | bits/param/round | wall s |\n"
    "|---|---|---|---|---|---|---|---|---|\n"
    "| topk rounds=2 | 1 | 62.50 | 62.50 | 2 | 0.001 | 0.002 | 2.000 | 2.5 |\n"
)


def test_text_table_exactly(tmp_path):
    run = one_run(tmp_path)
    assert summary_table([run]) == TEXT
    assert summary_table([run], "text") == TEXT
    assert summary_table([run], fmt="markdown") == MARKDOWN


def test_text_table_columns_as_wide_as_their_widest_cell(tmp_path):
    run = one_run(tmp_path)
    wide = Run(Path("w"), {**run.config, "dataset": "d" * 30}, run.rows)
    lines = summary_table([wide]).splitlines()
    label = "topk dataset=" + "d" * 30 + " rounds=2"
    assert lines[0] == "setting".ljust(len(label)) + TEXT.splitlines()[0][len("setting      "):]
    assert lines[1] == "-" * len(label) + TEXT.splitlines()[1][len("-------------"):]
    assert lines[2] == label + TEXT.splitlines()[2][len("topk rounds=2"):]


def test_markdown_escapes_a_pipe_in_a_cell(tmp_path):
    run = one_run(tmp_path)
    odd = Run(Path("w"), {**run.config, "dataset": "a|b"}, run.rows)
    assert summary_table([odd], "markdown").splitlines()[2] == (
        "| topk dataset=a\\|b rounds=2 | 1 | 62.50 | 62.50 | 2 | 0.001 | 0.002 | 2.000 | 2.5 |")


def test_table_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match=re.escape("fmt must be 'text' or 'markdown', got 'html'")):
        summary_table([one_run(tmp_path)], "html")
    with pytest.raises(ValueError, match="^no runs to compare$"):
        summary_table([])
    with pytest.raises(ValueError, match="^fmt must be"):
        summary_table([], "Text")  # the format is checked first


# ------------------------------------------------------------------ the plot
@pytest.fixture
def drawn(monkeypatch):
    """The Figure plot_runs saves (it is still saved)."""
    from matplotlib.figure import Figure

    figures = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **kw: figures.append((self, a, kw)) or real(self, *a, **kw))
    return figures


def acc_rows(accs, up=1_000_000, down=3_000_000):
    return [{"round": i, "uplink_bytes": up, "downlink_bytes": down,
             **({"test_accuracy": a} if a is not None else {})} for i, a in enumerate(accs, 1)]


def test_plot_lines_bands_and_labels(tmp_path, drawn):
    import matplotlib.colors as mcolors

    # Group A: seeds 0 and 1, evaluated in rounds 1 and 3 (and seed 1 in round 2 too: not in both, not drawn).
    a0 = Run(tmp_path / "a0", {"strategy": "topk", "seed": 0}, acc_rows([0.5, None, 0.7]))
    a1 = Run(tmp_path / "a1", {"strategy": "topk", "seed": 1},
             acc_rows([0.7, 0.6, 0.9], up=3_000_000))
    # Group B: never evaluated: no line.  Group C: one seed, drawn first (A's band then takes A's colour, not the
    # first colour of the cycle), and once more after B (B is skipped, not the end).
    b = Run(tmp_path / "b", {"strategy": "randk"}, acc_rows([None, None]))
    c = Run(tmp_path / "c", {"strategy": "qsgd"}, acc_rows([0.25, 0.5]))
    from fl_sparse.server_app import add_cumulative_bytes

    for r in (a0, a1, b, c):
        add_cumulative_bytes(r.rows)
    path = tmp_path / "out" / "deeper" / "cmp.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # drawn without a warning
        plot_runs([c, a0, b, a1], path)
    ((fig, args, kwargs),) = drawn
    assert args == (path,) and kwargs == {"format": "png"}
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1210, 462)  # 11 x 4.2 inches at 110 dpi
    by_round, by_bytes = fig.axes
    # A: mean of (50, 70) and (70, 90); std sqrt(200) = 14.142; MB: a0 4 and 12, a1 6 and 18 -> 5, 15.
    std = math.sqrt(200)
    (lc, la) = by_round.lines
    assert list(la.get_xdata()) == [1, 3] and list(la.get_ydata()) == pytest.approx([60, 80])
    assert list(lc.get_xdata()) == [1, 2] and list(lc.get_ydata()) == pytest.approx([25, 50])
    (mc, ma) = by_bytes.lines
    assert list(ma.get_xdata()) == pytest.approx([5, 15], rel=1e-12) and list(ma.get_ydata()) == pytest.approx([60, 80])
    assert list(mc.get_xdata()) == pytest.approx([4, 8], rel=1e-12) and list(mc.get_ydata()) == pytest.approx([25, 50])
    assert [line.get_label() for line in by_round.lines] == ["qsgd", "topk (n=2)"]
    assert [line.get_label() for line in by_bytes.lines] == ["qsgd", "topk (n=2)"]
    assert la.get_color() != lc.get_color()
    assert ma.get_color() == la.get_color() and mc.get_color() == lc.get_color()
    for line in (la, lc, ma, mc):
        assert line.get_marker() == "o" and line.get_markersize() == 3
    # One band per panel, for A only: mean -/+ std, in A's colour, translucent, no edge.
    for ax, xs in ((by_round, [1, 3]), (by_bytes, [5, 15])):
        (band,) = ax.collections
        assert band.get_alpha() == 0.2
        assert list(band.get_linewidths()) == [0]
        assert mcolors.to_hex(band.get_facecolor()[0], keep_alpha=False) == mcolors.to_hex(la.get_color())
        corners = band.get_paths()[0].vertices
        for x, m in zip(xs, (60, 80)):
            ys = sorted({round(float(y), 6) for px, y in corners if px == pytest.approx(x)})
            assert ys == pytest.approx([m - std, m + std])
    assert (by_round.get_xlabel(), by_round.get_ylabel()) == ("round", "test accuracy (%)")
    assert (by_bytes.get_xlabel(), by_bytes.get_ylabel()) == ("cumulative MB sent (uplink + downlink)",
                                                              "test accuracy (%)")
    assert by_bytes.get_xscale() == "log" and by_round.get_xscale() == "linear"
    assert list(by_bytes.xaxis.get_major_locator().tick_values(0.01, 10)) == pytest.approx(
        [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50])
    fmt = by_bytes.xaxis.get_major_formatter()
    assert (fmt(0.05, 0), fmt(20.0, 1), fmt(2e6, 2)) == ("0.05", "20", "2e+06")
    assert by_bytes.xaxis.get_minor_formatter()(0.03, 0) == ""
    ticks = by_round.xaxis.get_major_locator().tick_values(0.8, 3.2)
    assert all(float(t).is_integer() for t in ticks)
    for ax in (by_round, by_bytes):
        grid = ax.xaxis.get_gridlines()
        assert grid and all(g.get_visible() and g.get_alpha() == 0.3 for g in grid)
        assert all(g.get_visible() and g.get_alpha() == 0.3 for g in ax.yaxis.get_gridlines())
    legend = by_round.get_legend()
    assert by_bytes.get_legend() is None
    assert [t.get_text() for t in legend.get_texts()] == ["qsgd", "topk (n=2)"]
    from matplotlib.font_manager import FontProperties

    assert legend.get_texts()[0].get_fontsize() == FontProperties(size="small").get_size_in_points()
    box, axes_box = legend.get_window_extent(), by_round.get_window_extent()
    assert box.x1 > axes_box.x0 + 0.8 * axes_box.width and box.y0 < axes_box.y0 + 0.2 * axes_box.height  # lower right
    # Side by side, one row.
    assert by_bytes.get_position().x0 > by_round.get_position().x1
    assert by_bytes.get_position().y0 == pytest.approx(by_round.get_position().y0)
    # tight_layout: the panels use the figure's margins (matplotlib's default left edge is 0.125).
    assert by_round.get_position().x0 < 0.1 and by_bytes.get_position().x1 > 0.95


def test_plot_markers_only_below_30_points_and_no_band_for_one_seed(tmp_path, drawn):
    from fl_sparse.server_app import add_cumulative_bytes

    runs = [Run(tmp_path / "a", {"strategy": "a"}, add_cumulative_bytes(acc_rows([0.5] * 29))),
            Run(tmp_path / "b", {"strategy": "b"}, add_cumulative_bytes(acc_rows([0.5] * 30)))]
    plot_runs(runs, tmp_path / "p.png")
    plot_runs(runs, tmp_path / "p.png")  # again, into the folder that exists
    fig = drawn[-1][0]
    for ax in fig.axes:
        assert [line.get_marker() for line in ax.lines] == ["o", "None"]
        assert len(ax.collections) == 0


def test_plot_band_of_equal_seeds_is_flat_and_null_byte_sums_count_nothing(tmp_path, drawn):
    # Two seeds with the same accuracies: std 0, the band is the line itself. A null running sum adds no bytes:
    # round 1 sends 2 MB (downlink only), round 2 3 MB (uplink only).
    rows = [{"round": 1, "test_accuracy": 0.5, "cumulative_uplink_bytes": None, "cumulative_downlink_bytes": 2_000_000},
            {"round": 2, "test_accuracy": 0.75, "cumulative_uplink_bytes": 3_000_000, "cumulative_downlink_bytes": None}]
    runs = [Run(tmp_path / f"s{s}", {"seed": s}, [dict(r) for r in rows]) for s in (0, 1)]
    plot_runs(runs, tmp_path / "p.png")
    by_round, by_bytes = drawn[-1][0].axes
    (line,) = by_bytes.lines
    assert list(line.get_xdata()) == pytest.approx([2, 3], rel=1e-12)
    (band,) = by_round.collections
    for x, m in ((1, 50), (2, 75)):
        ys = {float(y) for px, y in band.get_paths()[0].vertices if px == x}
        assert ys == {m}


def test_plot_needs_runs(tmp_path):
    with pytest.raises(ValueError, match="^no runs to plot$"):
        plot_runs([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------ the command
def parse(argv):
    parser = argparse.ArgumentParser(prog="fl-sparse compare")
    add_arguments(parser)
    return parser, parser.parse_args(argv)


def test_arguments():
    _, args = parse(["a", "b"])
    assert (args.runs, args.plot, args.markdown) == (["a", "b"], None, False)
    _, args = parse(["a", "--plot", "x.png", "--markdown"])
    assert (args.runs, args.plot, args.markdown) == (["a"], "x.png", True)
    with pytest.raises(SystemExit):
        parse([])
    parser, _ = parse(["a"])
    text = " ".join(parser.format_help().split())
    assert "[--plot FILE.png] [--markdown] DIR [DIR ...]" in text
    assert "DIR run folders (fl-sparse simulate --out DIR)" in text
    assert "--plot FILE.png also draw test accuracy vs round and vs cumulative MB into this PNG" in text
    assert "--markdown print the table as markdown" in text


def test_run_prints_the_table_and_says_where_the_plot_went(tmp_path, capsys):
    folder = one_run(tmp_path).path
    assert compare.run(argparse.Namespace(runs=[str(folder)], plot=None, markdown=False)) == 0
    assert capsys.readouterr() == (TEXT, "")
    png = tmp_path / "p" / "cmp.png"
    assert compare.run(argparse.Namespace(runs=[str(folder)], plot=str(png), markdown=True)) == 0
    assert capsys.readouterr() == (MARKDOWN, f"plot: {png}\n")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_run_exit_codes_and_messages(tmp_path, capsys, monkeypatch):
    folder = one_run(tmp_path).path
    missing = tmp_path / "missing"
    assert compare.run(argparse.Namespace(runs=[str(folder), str(missing)], plot=None, markdown=False)) == 2
    assert capsys.readouterr() == ("", f"fl-sparse compare: error: {missing}: no such run folder\n")
    (tmp_path / "a-file").write_text("")
    bad = tmp_path / "a-file" / "x.png"
    assert compare.run(argparse.Namespace(runs=[str(folder)], plot=str(bad), markdown=False)) == 1
    out, err = capsys.readouterr()
    assert out == TEXT
    assert err.startswith(f"fl-sparse compare: cannot write the plot {bad}: [Errno ") and err.endswith("\n")
    assert "plot:" not in err

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(compare, "load_run", unreadable)
    assert compare.run(argparse.Namespace(runs=[str(folder)], plot=None, markdown=False)) == 2
    assert capsys.readouterr() == ("", f"fl-sparse compare: error: [Errno 13] Permission denied: '{folder}'\n")

    def no_plot(runs, path):
        raise ValueError("cannot draw")

    monkeypatch.undo()
    monkeypatch.setattr(compare, "plot_runs", no_plot)
    assert compare.run(argparse.Namespace(runs=[str(folder)], plot="p.png", markdown=False)) == 1
    assert capsys.readouterr().err == "fl-sparse compare: cannot write the plot p.png: cannot draw\n"
