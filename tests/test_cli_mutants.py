"""``fl-sparse``'s command line, flag by flag and exit by exit (written against fl_sparse/cli.py's mutants).

Fast: nothing here starts Ray. The tests of ``main``'s wiring replace
``fl_sparse.simulations.runner.simulate`` (and, where the data split is not the
point, ``fl_sparse.server_app.preflight``) to see the :class:`RunConfig` a
command line turns into, and what ``main`` prints and returns for each way a run ends.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import signal
import sys
import types

import numpy as np
import pytest

import fl_sparse.cli as cli
from fl_sparse.cli import build_parser, main
from fl_sparse.server_app import MODEL_LR, RunConfig


def _subparser(name: str, parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


# One non-default value per flag: (command-line words, RunConfig field, the value the field gets).
# Together they are every RunConfig field: each setting of a run has its flag.
FLAG_VALUES = [
    (["--strategy", "ssgd-mv-ad"], "strategy", "ssgd-mv-ad"),
    (["--dataset", "mnist"], "dataset", "mnist"),
    (["--model", "cnn-mnist"], "model", "cnn-mnist"),
    (["--clients", "7"], "clients", 7),
    (["--fraction", "0.5"], "fraction", 0.5),
    (["--partition", "dirichlet"], "partition", "dirichlet"),
    (["--alpha", "0.3"], "alpha", 0.3),
    (["--min-partition-size", "5"], "min_partition_size", 5),
    (["--self-balancing"], "self_balancing", True),
    (["--rounds", "9"], "rounds", 9),
    (["--local-steps", "4"], "local_steps", 4),
    (["--batch-size", "16"], "batch_size", 16),
    (["--lr", "0.05"], "lr", 0.05),
    (["--momentum", "0.9"], "momentum", 0.9),
    (["--weight-decay", "0.0001"], "weight_decay", 0.0001),
    (["--ratio", "0.1"], "ratio", 0.1),
    (["--downlink-ratio", "0.2"], "downlink_ratio", 0.2),
    (["--threshold", "0.5"], "threshold", 0.5),
    (["--value-bits", "4"], "value_bits", 4),
    (["--add-drop-ratio", "0.01"], "add_drop_ratio", 0.01),
    (["--positions", "block"], "positions", "block"),
    (["--no-error-feedback"], "error_feedback", False),
    (["--error-memory-dtype", "bfloat16"], "error_memory_dtype", "bfloat16"),
    (["--r-ratio", "0.05"], "r_ratio", 0.05),
    (["--t-hat", "3"], "t_hat", 3),
    (["--seed", "11"], "seed", 11),
    (["--out", "runs/a"], "out", "runs/a"),
    (["--diagnostics"], "diagnostics", True),
    (["--eval-every", "2"], "eval_every", 2),
    (["--num-cpus", "2"], "num_cpus", 2.0),
    (["--num-gpus", "0.5"], "num_gpus", 0.5),
    (["--state-dir", "state"], "state_dir", "state"),
    (["--ray-address", "10.0.0.1:6379"], "ray_address", "10.0.0.1:6379"),
    (["--max-failed-rounds", "5"], "max_failed_rounds", 5),
    (["--checkpoint-every", "0"], "checkpoint_every", 0),
    (["--resume", "runs/b"], "resume", "runs/b"),
    (["--quiet"], "quiet", True),
]


def test_the_flags_are_the_run_configs_fields():
    assert sorted(f for _, f, _ in FLAG_VALUES) == sorted(f.name for f in dataclasses.fields(RunConfig))


@pytest.mark.parametrize("words,field,value", FLAG_VALUES, ids=[w[0] for w, _, _ in FLAG_VALUES])
def test_each_flag_sets_its_field_with_its_type(words, field, value):
    args = vars(build_parser().parse_args(["simulate", *words]))
    assert args[field] == value and type(args[field]) is type(value)
    assert args["command"] == "simulate"
    # Only this field differs from RunConfig's default.
    default = dataclasses.asdict(RunConfig())
    assert {k: v for k, v in args.items() if k in default and v != default[k]} == {field: value}


def test_the_defaults_are_run_configs():
    args = vars(build_parser().parse_args(["simulate"]))
    assert args == {"command": "simulate", **dataclasses.asdict(RunConfig())}
    for name, value in dataclasses.asdict(RunConfig()).items():
        assert type(args[name]) is type(value), name


def test_with_explicit_only_the_flags_left_out_are_absent():
    parser = build_parser(_explicit_only=True)
    assert vars(parser.parse_args(["simulate"])) == {"command": "simulate"}
    given = vars(parser.parse_args(["simulate", "--rounds", "3", "--quiet", "--no-error-feedback", "--lr", "0.5"]))
    assert given == {"command": "simulate", "rounds": 3, "quiet": True, "error_feedback": False, "lr": 0.5}
    # The ordinary parser is not changed by it.
    assert build_parser().parse_args(["simulate"]).rounds == RunConfig().rounds


@pytest.mark.parametrize(
    "flag,accepted",
    [
        ("--strategy", "fl_sparse.strategies.STRATEGY_NAMES"),
        ("--dataset", "fl_sparse.tasks.data.DATASETS"),
        ("--model", "fl_sparse.tasks.models.MODEL_NAMES"),
        ("--partition", ("iid", "dirichlet", "shards")),
        ("--positions", ("raw", "block", "rice")),
        ("--error-memory-dtype", ("float32", "float16", "bfloat16")),
    ],
)
def test_a_choice_flag_takes_exactly_what_a_run_accepts(flag, accepted, capsys):
    """Every value RunConfig.validate accepts parses; anything else is refused by the parser, named."""
    import importlib

    if isinstance(accepted, str):
        module, name = accepted.rsplit(".", 1)
        accepted = tuple(getattr(importlib.import_module(module), name))
    field = flag[2:].replace("-", "_")
    for value in accepted:
        args = build_parser().parse_args(["simulate", flag, value])
        assert getattr(args, field) == value
        RunConfig(**{field: value}).validate()  # a run takes it
    assert sorted(_option(_subparser("simulate"), flag).choices) == sorted(accepted)
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["simulate", flag, "nonesuch"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: invalid choice: 'nonesuch'" in err


@pytest.mark.parametrize("flag", ["--clients", "--rounds", "--local-steps", "--batch-size", "--seed", "--value-bits",
                                  "--min-partition-size", "--t-hat", "--eval-every", "--max-failed-rounds",
                                  "--checkpoint-every"])
def test_a_count_flag_refuses_a_fraction(flag, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["simulate", flag, "2.5"])
    assert exc.value.code == 2
    assert f"argument {flag}: invalid int value: '2.5'" in capsys.readouterr().err


def test_the_program_and_its_commands(capsys):
    parser = build_parser()
    assert parser.prog == "fl-sparse"
    assert _subparser("simulate", parser).format_usage().startswith("usage: fl-sparse simulate ")
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([])
    assert exc.value.code == 2
    assert "the following arguments are required: command" in capsys.readouterr().err
    for command in ("simulate", "compare", "reproduce"):
        assert _subparser(command, parser).prog == f"fl-sparse {command}"


def test_the_folders_and_the_address_are_named_as_their_help_names_them(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    sim = _subparser("simulate")
    usage = " ".join(sim.format_usage().split())
    for flag, metavar in (("--out", "DIR"), ("--resume", "DIR"), ("--ray-address", "HOST:PORT")):
        assert f"[{flag} {metavar}]" in usage
    assert "DIR/config.json" in _option(sim, "--out").help and "DIR" in _option(sim, "--resume").help


def _help_lines(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's line in ``--help`` (its last flag -> its help, defaults filled in), from the parser's formatter."""
    formatter = parser._get_formatter()
    return {a.option_strings[-1]: formatter._expand_help(a) for a in parser._actions if a.option_strings and a.help}


def test_help_shows_defaults_but_none_and_on_off_flags(monkeypatch):
    lines = _help_lines(_subparser("simulate"))
    assert lines["--ratio"].endswith("(default: 0.01)")
    assert lines["--strategy"].endswith("(default: bidirectional-topk)")
    assert lines["--rounds"].endswith(f"(default: {RunConfig().rounds})")
    assert "(default: None)" not in lines["--lr"]  # its help says what unset means
    for flag in ("--downlink-ratio", "--threshold", "--out", "--resume", "--r-ratio", "--t-hat",
                 "--self-balancing", "--diagnostics", "--quiet", "--no-error-feedback"):
        assert "(default:" not in lines[flag], flag
    assert lines["--no-error-feedback"].endswith("(without the flag they do)")


def test_help_lists_each_models_default_learning_rate():
    lr_help = _help_lines(_subparser("simulate"))["--lr"]
    m = re.fullmatch(r"local SGD learning rate \(default: the model's own: (.*)\)", lr_help)
    assert m, lr_help
    listed = dict(item.split(" ") for item in m.group(1).split(", "))
    assert {model: float(lr) for model, lr in listed.items()} == MODEL_LR


# ------------------------------------------------------------------ main: compare and reproduce


def test_compare_runs_the_compare_module_with_its_arguments(monkeypatch):
    from fl_sparse.simulations import compare

    seen = []
    monkeypatch.setattr(compare, "run", lambda args: seen.append(args) or 5)
    assert main(["compare", "runs/a", "runs/b", "--plot", "p.png", "--markdown"]) == 5
    (args,) = seen
    assert (args.command, args.runs, args.plot, args.markdown) == ("compare", ["runs/a", "runs/b"], "p.png", True)
    sub = _subparser("compare")
    assert sub.description == "Compare run folders written by fl-sparse simulate --out DIR."


def _fake_reproduce(monkeypatch, run):
    import fl_sparse.simulations

    fake = types.ModuleType("fl_sparse.simulations.reproduce")
    fake.add_arguments = lambda p: (p.add_argument("name"), p.add_argument("--seeds", type=int, default=3, help="runs"))
    fake.run = run
    monkeypatch.setitem(sys.modules, "fl_sparse.simulations.reproduce", fake)
    monkeypatch.setattr(fl_sparse.simulations, "reproduce", fake, raising=False)


def test_reproduces_exit_status_is_a_plain_int(monkeypatch):
    """``sys.exit`` takes only an int (or None) as a status: numpy's 3 would print "3" and exit with 1."""
    seen = []
    _fake_reproduce(monkeypatch, lambda args: seen.append((args.name, args.seeds)) or np.int64(3))
    rc = main(["reproduce", "tiny", "--seeds", "2"])
    assert rc == 3 and type(rc) is int
    assert seen == [("tiny", 2)]


def test_reproduce_help_shows_its_defaults(monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")
    _fake_reproduce(monkeypatch, lambda args: 0)
    parser = build_parser()
    assert _help_lines(_subparser("reproduce", parser))["--seeds"] == "runs (default: 3)"
    top = " ".join(parser.format_help().split())
    assert "reproduce run one paper's comparison from its preset: runs, plots and a markdown table" in top


def test_reproduce_without_its_module_names_the_import_error(monkeypatch, capsys):
    import fl_sparse.simulations

    monkeypatch.delattr(fl_sparse.simulations, "reproduce", raising=False)
    monkeypatch.setitem(sys.modules, "fl_sparse.simulations.reproduce", None)  # import fails
    with pytest.raises(ImportError) as exc:
        from fl_sparse.simulations import reproduce  # noqa: F401
    problem = str(exc.value)
    assert problem  # the reason shown to the user
    # Its own arguments still parse (they go nowhere): the command answers, not argparse.
    assert main(["reproduce", "bidirectional-topk", "--budget", "full", "--seeds", "3"]) == 2
    assert capsys.readouterr().err == f"fl-sparse reproduce: unavailable: {problem}\n"
    monkeypatch.setenv("COLUMNS", "2000")
    parser = build_parser()
    rep = _subparser("reproduce", parser)
    assert rep.description == f"unavailable: {problem}"
    assert "reproduce run a paper's comparison (unavailable: see its --help)" in " ".join(parser.format_help().split())
    assert rep.parse_args(["a", "--b"]).rest == ["a", "--b"]


# ------------------------------------------------------------------ main: simulate


@pytest.fixture
def fake_run(monkeypatch):
    """``simulate`` (and ``preflight``) replaced: what main hands them, and what they return or raise."""
    import fl_sparse.server_app as server_app
    import fl_sparse.simulations.runner as runner

    seen = types.SimpleNamespace(preflight=[], simulate=[], during=[], rows=[{"round": 1, "test_accuracy": 0.75}],
                                 error=None)

    def preflight(cfg, **kwargs):
        seen.preflight.append(cfg)
        return "SPLIT SUMMARY"

    def simulate(cfg, *args, **kwargs):
        seen.simulate.append((cfg, args, kwargs))
        seen.during.append((signal.getsignal(signal.SIGINT), server_app.stop_requested.is_set()))
        if seen.error is not None:
            raise seen.error
        return seen.rows

    monkeypatch.setattr(server_app, "preflight", preflight)
    monkeypatch.setattr(runner, "simulate", simulate)
    return seen


@pytest.fixture
def sigint_handler():
    """A SIGINT handler of the test's own, restored after: main must hand it back."""
    def handler(signum, frame):  # pragma: no cover - never delivered
        pass

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_every_flag_reaches_the_run_config(fake_run, capsys):
    words = [w for ws, f, _ in FLAG_VALUES if f != "resume" for w in ws]
    expected = RunConfig(**{f: v for _, f, v in FLAG_VALUES if f != "resume"})
    assert main(["simulate", *words]) == 0
    assert fake_run.preflight == [expected]
    assert fake_run.simulate == [(expected, (), {})]


def test_a_run_with_defaults_is_run_configs_default(fake_run, capsys):
    assert main(["simulate"]) == 0
    assert fake_run.simulate == [(RunConfig(), (), {})]


ADD_DROP_REFUSED = "fl-sparse simulate: error: add-drop-ratio is ssgd-mv-ad's phi_ad; leave it out for other strategies\n"


@pytest.mark.parametrize("strategy", ["bidirectional-topk", "ssgd-mv", "topk"])
def test_add_drop_ratio_is_refused_for_another_strategy_even_at_its_default(strategy, fake_run, capsys):
    default = str(RunConfig().add_drop_ratio)
    assert main(["simulate", "--strategy", strategy, "--add-drop-ratio", default]) == 2
    assert capsys.readouterr().err == ADD_DROP_REFUSED
    assert fake_run.preflight == [] and fake_run.simulate == []
    assert main(["simulate", "--add-drop-ratio", "0.02", "--strategy", strategy]) == 2
    assert capsys.readouterr().err == ADD_DROP_REFUSED


def test_add_drop_ratio_is_ssgd_mv_ads(fake_run, capsys):
    assert main(["simulate", "--strategy", "ssgd-mv-ad", "--add-drop-ratio", "0.02", "--quiet"]) == 0
    assert fake_run.simulate[0][0] == RunConfig(strategy="ssgd-mv-ad", add_drop_ratio=0.02, quiet=True)
    assert main(["simulate", "--strategy", "ssgd-mv-ad", "--quiet"]) == 0  # left out: its default
    assert fake_run.simulate[1][0].add_drop_ratio == RunConfig().add_drop_ratio


def test_a_preflight_problem_exits_2_before_the_run(fake_run, monkeypatch, capsys):
    import fl_sparse.server_app as server_app

    def preflight(cfg, **kwargs):
        raise ValueError("clients must be >= 1")

    monkeypatch.setattr(server_app, "preflight", preflight)
    assert main(["simulate", "--clients", "0"]) == 2
    assert capsys.readouterr().err == "fl-sparse simulate: error: clients must be >= 1\n"
    assert fake_run.simulate == []


def test_the_real_preflight_refuses_before_the_run(monkeypatch, capsys):
    import fl_sparse.simulations.runner as runner

    monkeypatch.setattr(runner, "simulate", lambda cfg: pytest.fail("simulate ran"))
    assert main(["simulate", "--momentum", "1"]) == 2
    assert capsys.readouterr().err == "fl-sparse simulate: error: momentum must be in [0, 1)\n"


def test_the_start_lines_name_the_run(fake_run, capsys):
    argv = ["simulate", "--strategy", "topk", "--dataset", "mnist", "--model", "cnn-mnist", "--clients", "4",
            "--partition", "shards", "--rounds", "3", "--local-steps", "5", "--ratio", "0.05", "--positions", "block"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    lr = MODEL_LR["cnn-mnist"]  # no --lr: the model's own
    assert lr == 0.1
    assert err == (
        "fl-sparse: topk on mnist (cnn-mnist), 4 clients (shards), 3 rounds of H=5, lr 0.1, ratio 0.05, "
        "block positions; starting Flower's simulation engine...\n"
        "fl-sparse: data: SPLIT SUMMARY\n"
    )
    assert main(["simulate", "--lr", "0.003"]) == 0
    assert ", lr 0.003, " in capsys.readouterr().err


def test_quiet_prints_nothing_before_the_run(fake_run, capsys):
    assert main(["simulate", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out == "done: 1 rounds, final test accuracy 0.7500\n"


def test_the_run_gets_a_fresh_stop_flag_and_the_ctrl_c_handler(fake_run, sigint_handler):
    from fl_sparse.server_app import stop_requested

    stop_requested.set()  # left by an earlier command in this process
    try:
        assert main(["simulate", "--quiet"]) == 0
    finally:
        stop_requested.clear()
    assert fake_run.during == [(cli._interrupt, False)]
    assert signal.getsignal(signal.SIGINT) is sigint_handler


def test_the_ctrl_c_handler_stops_after_the_round_then_at_once(capsys):
    from fl_sparse.server_app import stop_requested

    stop_requested.clear()
    try:
        cli._interrupt(signal.SIGINT, None)
        assert stop_requested.is_set()
        assert capsys.readouterr().err == "\nfl-sparse: stopping after this round (Ctrl-C again to stop at once)...\n"
        with pytest.raises(KeyboardInterrupt):
            cli._interrupt(signal.SIGINT, None)
        assert stop_requested.is_set()
        assert capsys.readouterr().err == ""
    finally:
        stop_requested.clear()


def test_a_finished_run_says_its_accuracy_and_folder(fake_run, tmp_path, capsys):
    fake_run.rows = [{"round": 1, "test_accuracy": 0.5}, {"round": 2, "test_accuracy": 0.6},
                     {"round": 3, "test_accuracy": 0.81234}]
    out = str(tmp_path / "run")
    assert main(["simulate", "--quiet", "--out", out]) == 0
    assert capsys.readouterr().out == (
        "done: 3 rounds, final test accuracy 0.8123\n"
        f"run folder: {out} (config.json, metrics.jsonl, metrics.csv, metrics.json, model.pt); "
        f"compare runs: fl-sparse compare {out} ...\n"
    )


def test_a_finished_run_without_an_accuracy(fake_run, capsys):
    fake_run.rows = [{"round": 1, "test_accuracy": 0.5}, {"round": 2, "test_accuracy": 0.6}, {"round": 3}]
    assert main(["simulate", "--quiet"]) == 0
    assert capsys.readouterr().out == "done: 3 rounds\n"  # the last row's: none
    fake_run.rows = [{"round": 1, "test_accuracy": 0.5}, {"round": 2, "test_accuracy": None}]
    assert main(["simulate", "--quiet"]) == 0
    assert capsys.readouterr().out == "done: 2 rounds\n"


def test_an_interrupted_run_says_where_it_is_saved(fake_run, sigint_handler, tmp_path, capsys):
    from fl_sparse.server_app import RunInterrupted

    out = str(tmp_path / "run")
    fake_run.error = RunInterrupted("stopped after round 2 of 5")
    assert main(["simulate", "--quiet", "--out", out]) == 130
    assert capsys.readouterr() == ("", (
        f"fl-sparse simulate: stopped after round 2 of 5; metrics, model and checkpoint saved in {out} "
        f"(continue: fl-sparse simulate --resume {out})\n"))
    assert main(["simulate", "--quiet"]) == 130
    assert capsys.readouterr() == ("", "fl-sparse simulate: stopped after round 2 of 5\n")
    assert signal.getsignal(signal.SIGINT) is sigint_handler


def test_a_ray_cluster_problem_exits_2(fake_run, sigint_handler, capsys):
    from fl_sparse.simulations.runner import RayClusterError

    fake_run.error = RayClusterError("cannot reach the Ray cluster at h:1")
    assert main(["simulate", "--quiet", "--ray-address", "h:1"]) == 2
    assert capsys.readouterr() == ("", "fl-sparse simulate: error: cannot reach the Ray cluster at h:1\n")
    assert signal.getsignal(signal.SIGINT) is sigint_handler


def test_a_failed_run_exits_1_and_points_at_its_metrics(fake_run, sigint_handler, tmp_path, capsys):
    from fl_sparse.server_app import RunFailed

    out = str(tmp_path / "run")
    fake_run.error = RunFailed("3 rounds in a row accepted no client update")
    assert main(["simulate", "--quiet", "--out", out]) == 1
    assert capsys.readouterr() == ("", (
        "fl-sparse simulate: failed: 3 rounds in a row accepted no client update\n"
        f"metrics so far: {out}/metrics.jsonl\n"))
    assert main(["simulate", "--quiet"]) == 1
    assert capsys.readouterr() == ("", "fl-sparse simulate: failed: 3 rounds in a row accepted no client update\n")
    assert signal.getsignal(signal.SIGINT) is sigint_handler


def test_a_second_ctrl_c_exits_130(fake_run, sigint_handler, capsys):
    fake_run.error = KeyboardInterrupt()
    assert main(["simulate", "--quiet"]) == 130
    assert capsys.readouterr() == ("", "fl-sparse simulate: interrupted\n")
    assert signal.getsignal(signal.SIGINT) is sigint_handler


# ------------------------------------------------------------------ main: simulate --resume


@pytest.fixture
def fake_resume(monkeypatch, fake_run):
    """``resume_config`` replaced: the folder and the overrides main hands it."""
    import fl_sparse.server_app as server_app

    calls = []

    def resume_config(directory, **overrides):
        calls.append((directory, overrides))
        return RunConfig(strategy="topk", rounds=overrides.get("rounds", 4), out=directory, resume=directory,
                         quiet=overrides.get("quiet", False))

    monkeypatch.setattr(server_app, "resume_config", resume_config)
    return calls


def test_resume_hands_over_only_the_flags_given(fake_resume, fake_run, capsys):
    assert main(["simulate", "--resume", "runs/a"]) == 0
    assert main(["simulate", "--resume", "runs/b", "--rounds", "7", "--quiet", "--num-cpus", "2", "--eval-every", "3",
                 "--checkpoint-every", "0", "--max-failed-rounds", "4", "--num-gpus", "0", "--ray-address", "h:1"]) == 0
    assert fake_resume == [
        ("runs/a", {}),
        ("runs/b", {"rounds": 7, "quiet": True, "num_cpus": 2.0, "eval_every": 3, "checkpoint_every": 0,
                    "max_failed_rounds": 4, "num_gpus": 0.0, "ray_address": "h:1"}),
    ]
    first = RunConfig(strategy="topk", rounds=4, out="runs/a", resume="runs/a")
    assert fake_run.preflight[0] == first and fake_run.simulate[0][0] == first


def test_resume_start_line_names_the_folder(fake_resume, fake_run, capsys):
    assert main(["simulate", "--resume", "runs/a"]) == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert first == ("fl-sparse: topk on fashion-mnist (mlp-784-64-10), 10 clients (iid), 4 rounds of H=20, lr 0.1, "
                     "ratio 0.01, rice positions, continuing the run in runs/a; starting Flower's simulation engine...")


@pytest.mark.parametrize("words,named", [(["--strategy", "topk"], "strategy"), (["--add-drop-ratio", "0.01"], "add-drop-ratio"),
                                         (["--out", "elsewhere"], "out")])
def test_resume_refuses_a_setting_of_the_run(words, named, tmp_path, capsys):
    """The real resume_config: a setting other than how far and how it runs cannot change (before any file is read)."""
    assert main(["simulate", "--resume", str(tmp_path), *words]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fl-sparse simulate: error: a resumed run keeps the saved run's settings; {named} cannot change "
                          "(allowed: rounds, ")


# ------------------------------------------------------------------ the help: what each flag means

# ``fl-sparse simulate --help`` is where the README sends a user for the flags. Each text was read
# against what its flag does (RunConfig.validate, the strategies, preflight, server_app's run folder,
# the Ray runner, tasks.data.dirichlet_min_partition_size, compressors.adaptive_k_schedule).
SIMULATE_HELP = {
    '--strategy': 'sparsification method',
    '--dataset': 'training data (Fashion-MNIST is read offline)',
    '--model': "network (the seed papers' MLPs/CNNs, ResNet-18, VGG-19)",
    '--clients': 'number of clients (virtual SuperNodes)',
    '--fraction': 'fraction of clients sampled per round',
    '--partition': 'how data is split (flwr-datasets partitioners)',
    '--alpha': 'Dirichlet concentration',
    '--min-partition-size': "Dirichlet: every client gets at least this many examples (flwr-datasets' option; unset: 10 when the data allows, less for thousands of clients)",
    '--self-balancing': "Dirichlet: flwr-datasets' self-balancing (stop filling clients above the mean size)",
    '--rounds': 'communication rounds T',
    '--local-steps': 'H: local SGD steps per round',
    '--batch-size': 'minibatch size of local SGD',
    '--momentum': 'local SGD momentum (reset every round)',
    '--weight-decay': 'local SGD weight decay',
    '--ratio': 'uplink k/d',
    '--downlink-ratio': 'downlink k/d of bidirectional-topk only (None: same as --ratio)',
    '--threshold': "lambda of hard-threshold only, in gradient units: a client sends the entries with |error + update| >= lr * lambda (None: the paper's 1/(2 sqrt(k)) with k = ratio * d)",
    '--value-bits': 'q-bit value quantization; 32 = none',
    '--add-drop-ratio': 'phi_ad of ssgd-mv-ad only',
    '--positions': "position code: raw int32, the majority-voting (SSGD-MV) paper's block code, or Golomb-Rice (smallest)",
    '--no-error-feedback': 'plain sparsification: clients keep no error memory (without the flag they do)',
    '--error-memory-dtype': 'dtype clients store their error memory in between rounds (computed in float32; float16 clamps entries beyond +-65504)',
    '--r-ratio': "rtopk: r/d, the top-r set the k entries are drawn from (None: the paper's rule)",
    '--t-hat': 'adaptive-topk: the turning point t_hat (0-based round): k_t = (1+gamma)k before t_hat/2 and from (t_hat+rounds)/2 on, (1-gamma)k between (None: estimated after round 1)',
    '--seed': 'seeds model init, data split and order, sampling',
    '--out': 'run folder: DIR/config.json, DIR/metrics.jsonl and DIR/metrics.csv (a line per round), DIR/metrics.json and DIR/model.pt at the end, the checkpoint DIR/checkpoint.pt; clients keep their state in DIR/client-state; a DIR that holds a run is refused (--resume DIR)',
    '--diagnostics': 'estimate rho and rho-hat each round',
    '--eval-every': 'evaluate every N rounds',
    '--num-cpus': 'CPUs per client actor',
    '--num-gpus': 'GPUs per client actor (fractional ok)',
    '--state-dir': 'client state folder (None: DIR/client-state with --out, else a temporary one, removed after the run)',
    '--ray-address': 'join the Ray cluster at this address (as RAY_ADDRESS, which it overrides; unset: $RAY_ADDRESS, else a local Ray); a cluster of several nodes needs --state-dir on a filesystem every node mounts (docs/ray-cluster.md)',
    '--max-failed-rounds': 'stop after this many rounds in a row that accepted no client update',
    '--checkpoint-every': 'with --out: save DIR/checkpoint.pt every N rounds (also at the end and at a stop; 0: only then)',
    '--resume': 'continue the run saved in DIR (its own settings; --rounds T may raise the last round)',
    '--quiet': 'no progress lines',
}


def test_each_simulate_flag_has_its_help():
    sim = _subparser("simulate")
    shown = {a.option_strings[-1]: a.help for a in sim._actions if a.option_strings and a.option_strings[-1] != "--help"}
    assert shown.pop("--lr") == cli._lr_help()
    assert shown == SIMULATE_HELP


def test_the_commands_say_what_they_do():
    parser = build_parser()
    assert parser.description == "Communication-efficient federated learning on Flower."
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    said = {c.dest: c.help for c in sub._choices_actions}
    assert said["simulate"] == "run a federated experiment in Flower's Ray simulation engine"
    assert said["compare"] == "one table (and a plot) of run folders; seeds of one setting as mean ± std"
