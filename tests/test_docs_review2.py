"""README.md and RESULTS.md against the code, read as a careful new user reads them (second review).

Cheap checks (no Ray; the metric keys come from two-round runs on the in-process grid) of what
tests/test_docs.py and tests/test_docs_review.py do not read from these two files:

* every command of their ``bash`` blocks runs as written: the blocks are run by bash with
  ``fl-sparse`` / ``python`` stubbed to record their arguments, and each ``fl-sparse simulate``
  is then given to the real CLI (argument parsing, RunConfig, the CLI's own refusals, preflight)
  with only the simulation itself replaced (RESULTS.md's SSGD-MV commands passed
  ``--add-drop-ratio`` to every strategy, which the CLI refuses for all but ``ssgd-mv-ad``);
* every ``fl-sparse reproduce NAME ...`` names a preset, and RESULTS.md's tables under it are
  what the preset runs: the settings, their "what differs" labels (compare's), their rounds,
  the "differs from the first setting" cells, the paper's numbers and the "Other measures"
  columns;
* the metric keys README.md documents are the keys ``metrics.jsonl`` holds, both ways, the
  ``metrics.csv`` columns in the table's order, and ``rho`` / ``rho_hat`` only where it says;
* the run-folder table's pointer to the checkpoint paragraph points the right way;
* every relative link of the two files (files, and headings of this repository's markdown) exists.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "RESULTS.md"
DOCS = (README, RESULTS)


def _fenced(text: str) -> list[tuple[str, str]]:
    blocks, lang, lines = [], None, []
    for line in text.splitlines():
        if lang is None:
            if line.startswith("```"):
                lang, lines = line[3:].strip(), []
        elif line.startswith("```"):
            blocks.append((lang, "\n".join(lines) + "\n"))
            lang = None
        else:
            lines.append(line)
    assert lang is None, "unclosed code fence"
    return blocks


def _table(lines: list[str], start: int) -> tuple[list[str], list[list[str]], int]:
    """(header, rows, index after it) of the first pipe table at or after line ``start``."""
    i = start
    while not lines[i].startswith("|"):
        i += 1
    header = [c.strip() for c in lines[i].strip("|").split("|")]
    rows, i = [], i + 2
    while i < len(lines) and lines[i].startswith("|"):
        rows.append([c.strip() for c in lines[i].strip("|").split("|")])
        i += 1
    return header, rows, i


# ------------------------------------------------------------ shell commands
_STUBS = r"""
_record() { local f; f=$(mktemp "$RECORD_DIR/call.XXXXXXXX"); printf '%s\0' "$@" > "$f"; sleep 0.01; }
fl-sparse() { _record fl-sparse "$@"; }
python() { _record python "$@"; }
pip() { :; }
apt-get() { :; }
"""


def _recorded_commands(tmp_path: Path) -> list[tuple[str, list[str]]]:
    """(doc, argv) of every fl-sparse command the docs' bash blocks run, in order, shell variables expanded."""
    out = []
    for doc in DOCS:
        for i, (lang, code) in enumerate(_fenced(doc.read_text())):
            if lang not in ("bash", "sh", "shell"):
                continue
            record = tmp_path / f"{doc.stem}-{i}"
            record.mkdir(parents=True)
            proc = subprocess.run(["bash", "-c", _STUBS + code], cwd=tmp_path, env={"RECORD_DIR": str(record),
                                  "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, (doc.name, code, proc.stderr)
            for f in sorted(record.iterdir(), key=lambda p: p.stat().st_mtime_ns):
                argv = f.read_bytes().decode().split("\0")[:-1]
                if argv[0] == "python":
                    if argv[1:3] != ["-m", "fl_sparse.cli"]:
                        continue  # python -m pytest
                    argv = ["fl-sparse", *argv[3:]]
                out.append((doc.name, argv[1:]))
    return out


def test_every_fl_sparse_command_of_the_bash_blocks_runs_as_written(tmp_path, monkeypatch):
    from fl_sparse import cli
    from fl_sparse.simulations import runner

    ran: list = []

    def fake_simulate(cfg, *args, **kwargs):
        ran.append(cfg)
        return [{"round": cfg.rounds, "test_accuracy": 0.5}]

    monkeypatch.setattr(runner, "simulate", fake_simulate)
    commands = _recorded_commands(tmp_path / "record")
    assert {doc for doc, _ in commands} == {"README.md", "RESULTS.md"}
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    simulated = 0
    for doc, argv in commands:
        where = f"{doc}: fl-sparse {shlex.join(argv)}"
        if argv[0] == "simulate" and "--help" in argv:
            with pytest.raises(SystemExit) as exc:
                cli.build_parser().parse_args(argv)
            assert exc.value.code == 0, where
        elif argv[0] == "simulate":
            assert cli.main(argv) == 0, where  # exit 2 with the CLI's error on stderr otherwise
            simulated += 1
        else:  # compare / reproduce: the arguments parse (the run folders do not exist here)
            cli.build_parser().parse_args(argv)
    assert simulated == len(ran) >= 20
    # RESULTS.md's SSGD-MV sweep ran its 12 settings, each with φ_ad = 0.001 where it applies
    sweep = [c for c in ran if c.out and c.out.startswith("runs/ssgd/")]
    assert len(sweep) == 12 and all(c.add_drop_ratio == 0.001 for c in sweep)


# ------------------------------------------------------------ reproduce
_REPRODUCE = re.compile(r"`fl-sparse reproduce ([^`]*)`")


def test_every_reproduce_command_names_a_preset():
    from fl_sparse import cli
    from fl_sparse.simulations import reproduce

    seen = 0
    for doc in DOCS:
        for args in _REPRODUCE.findall(doc.read_text()):
            argv = shlex.split(args)
            if not argv or argv[0].startswith("-") or argv[0] == "NAME":
                continue
            parsed = cli.build_parser().parse_args(["reproduce", *argv])
            assert parsed.name in reproduce.preset_names(), (doc.name, args)
            seen += 1
    assert seen >= 11


def _labels(plan) -> list[str]:
    """compare's label of each setting of ``plan`` (one seed each), as ``write_report`` writes them."""
    from fl_sparse.simulations import compare

    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for p in plan:
            folder = Path(tmp) / p.setting
            folder.mkdir()
            config = {**asdict(p.config), "lr_used": p.config.effective_lr}
            (folder / "config.json").write_text(json.dumps(config))
            (folder / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n")
            runs.append(compare.load_run(folder))
        return compare.group_labels(compare.group_runs(runs))


def _results_blocks():
    """(preset name, non-IID?, the RESULTS.md lines from its command to the next command or heading)."""
    lines = RESULTS.read_text().splitlines()
    starts = [(i, m) for i, line in enumerate(lines) if (m := re.match(r"^`fl-sparse reproduce (\S+)([^`]*)`", line))]
    for n, (i, m) in enumerate(starts):
        end = starts[n + 1][0] if n + 1 < len(starts) else len(lines)
        end = next((j for j in range(i + 1, end) if lines[j].startswith(("### ", "## ", "#### Non-IID"))), end)
        yield m.group(1), "--non-iid" in m.group(2), lines[i:end]


def test_results_tables_are_what_the_presets_run():
    from fl_sparse.simulations import reproduce

    checked = 0
    for name, non_iid, lines in _results_blocks():
        preset = reproduce.load_preset(name)
        plan = reproduce.expand(preset, non_iid=non_iid, seeds=1, out="runs")
        by_name = {p.setting: p for p in plan}
        where = f"RESULTS.md, fl-sparse reproduce {name}{' --non-iid' if non_iid else ''}"
        header, rows, after = _table(lines, 1)
        assert [r[0] for r in rows] == [p.setting for p in plan], where
        if "what differs" in header:
            for row, label, p in zip(rows, _labels(plan), plan):
                assert row[header.index("what differs")] == label, (where, row[0])
                assert row[header.index("rounds")] == str(p.config.rounds), (where, row[0])
            checked += 1
        i = after
        while i < len(lines):
            line = lines[i]
            if line.startswith("| setting | differs from the first setting |"):
                _, rows, i = _table(lines, i)
                reference = asdict(plan[0].config)
                for setting, differs, paper in rows:
                    p = by_name[setting]
                    assert differs == reproduce._overrides_text(p.config, reference), (where, setting)
                    assert paper == (p.paper or ""), (where, setting)
                continue
            if line.startswith("| setting | max ρ̂ | max ρ | paper |"):
                _, rows, i = _table(lines, i)
                assert all(r[-1] == (by_name[r[0]].paper or "") for r in rows), where
                continue
            if line.startswith("| setting |") and i > 0 and "Other measures" in "\n".join(lines[max(0, i - 6):i]):
                header, rows, i = _table(lines, i)
                assert tuple(header[1:]) == preset.columns, where
                assert [r[0] for r in rows] == [p.setting for p in plan], where
                continue
            i += 1
    assert checked == 10  # five papers, IID and non-IID


def test_results_participation_prose_is_the_presets():
    """"K = 1 % of d both ways, 100 IID clients ..., 1 %, 10 % or 100 % ..., 100 rounds, mlp-784-64-10, H = 5, seed 0"."""
    from fl_sparse.simulations import reproduce

    text = " ".join(RESULTS.read_text().split())
    assert ("K = 1 % of d both ways, 100 IID clients of which 1 %, 10 % or 100 % are sampled per round, 100 rounds, "
            "mlp-784-64-10 (a dense model is 203.6 kB), H = 5, seed 0") in text
    plan = reproduce.expand("participation", out="runs")
    assert sorted({p.config.fraction for p in plan}) == [0.01, 0.1, 1.0]
    assert {p.seed for p in plan} == {0}
    for p in plan:
        c = p.config
        assert (c.ratio, c.clients, c.partition, c.rounds, c.model, c.local_steps) == (
            0.01, 100, "iid", 100, "mlp-784-64-10", 5)
        assert c.downlink_ratio is None  # bidirectional's downlink K is the uplink's


# ------------------------------------------------------------ metric keys
def _documented_metrics() -> tuple[list[str], set[str]]:
    """(the column table's keys in order, the keys the paragraph after it adds)."""
    text = README.read_text()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| column | unit | meaning |"))
    _, rows, end = _table(lines, start)
    columns = [k.strip("` ") for row in rows for k in row[0].split(",")]
    para = "\n".join(lines[end:]).strip().split("\n\n")[0]
    assert para.startswith("`metrics.jsonl` also holds"), para[:80]
    extra = set(re.findall(r"`([a-z_]+)`", para))
    return columns, extra


@pytest.fixture(scope="module")
def written_rows(tmp_path_factory):
    """metrics.jsonl rows of two-round runs on the in-process grid: strategy -> rows (and the csv header)."""
    from inprocess import InProcessGrid

    from fl_sparse.clients.app import app as builtin_app
    from fl_sparse.server_app import RunConfig, run_server

    small = RunConfig(clients=2, rounds=2, local_steps=1, batch_size=10, ratio=0.02, seed=1, quiet=True)
    out = {}
    for strategy in ("bidirectional-topk", "topk", "ssgd-mv-ad", "adaptive-topk", "fedavg"):
        folder = tmp_path_factory.mktemp(strategy)
        cfg = replace(small, strategy=strategy, diagnostics=strategy != "fedavg", out=str(folder / "run"))
        run_server(InProcessGrid(builtin_app, 2), cfg)
        rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
        header = (folder / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
        out[strategy] = (rows, header)
    return out


def test_documented_metric_keys_are_the_written_ones(written_rows):
    from fl_sparse.server_app import METRIC_COLUMNS

    columns, extra = _documented_metrics()
    assert columns == list(METRIC_COLUMNS)
    written = set()
    for strategy, (rows, header) in written_rows.items():
        assert header == columns, strategy  # metrics.csv: the table's columns, in its order
        keys = set().union(*rows)
        written |= keys
        undocumented = keys - set(columns) - extra
        assert not undocumented, (strategy, sorted(undocumented))
    never = set(columns) - written
    assert not never, sorted(never)
    # sync_modes' kinds and the strategy options the paragraph names are not keys; a rejected round is not run here
    not_keys = {"none", "delta", "set", "dense", "values", "update_norm_bound", "update_norm_bound_ratio"}
    extra_never = extra - written - not_keys - {"rejected_round"}
    assert not extra_never, sorted(extra_never)


def test_rho_and_rho_hat_where_the_readme_says(written_rows):
    text = " ".join(README.read_text().split())
    assert ("estimated only with `--diagnostics`: `rho_hat` for every strategy but the SSGD-MV ones (which write "
            "neither), `rho` only for one that compresses the downlink (`bidirectional-topk`)") in text

    def has(strategy, key):
        return all(key in r for r in written_rows[strategy][0])

    assert has("bidirectional-topk", "rho") and has("bidirectional-topk", "rho_hat")
    for strategy in ("topk", "adaptive-topk"):
        assert has(strategy, "rho_hat") and not any("rho" in r for r in written_rows[strategy][0]), strategy
    assert not any("rho" in r or "rho_hat" in r for r in written_rows["ssgd-mv-ad"][0])
    assert not any("rho" in r or "rho_hat" in r for r in written_rows["fedavg"][0])  # no --diagnostics


def test_run_folder_table_points_up_to_the_checkpoint_paragraph():
    text = README.read_text()
    assert text.index("**Checkpoint and resume.**") < text.index("## Run folders and comparing runs")
    row = next(line for line in text.splitlines() if line.startswith("| `checkpoint.pt`, `client-state/` |"))
    assert "(below)" not in row and "above" in row


# ------------------------------------------------------------ links
def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in path.read_text().splitlines() if re.match(r"^#{1,6} ", line)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_relative_links_exist(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path) if path else doc
        assert file.exists(), (doc.name, target)
        if anchor:
            assert anchor in _anchors(file), (doc.name, target)


# ------------------------------------------------------------ compare's tables as shown
def test_compare_tables_shown_are_compares():
    """README's ``fl-sparse compare`` output and RESULTS.md's error-memory table: compare's columns and labels
    (RESULTS.md labelled the rows without the strategy compare writes first)."""
    from fl_sparse.server_app import RunConfig
    from fl_sparse.simulations.compare import COLUMNS

    readme = README.read_text()
    (shown,) = [code for lang, code in _fenced(readme) if lang == "" and code.startswith("setting ")]
    assert shown.splitlines()[0].split("  ")[0] == "setting"
    assert [c.strip() for c in re.split(r"\s{2,}", shown.splitlines()[0].strip())] == list(COLUMNS)
    assert [line.split()[0] for line in shown.splitlines()[2:]] == ["bidirectional-topk", "fedavg"]

    lines = RESULTS.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "fl-sparse compare runs/errdtype/* --markdown" in line)
    header, rows, _ = _table(lines, start)
    assert header == [c for c in COLUMNS if c != "wall s"]
    assert "(The command's `wall s` column is left out.)" in RESULTS.read_text()
    plan = [type("P", (), {"setting": d, "config": RunConfig(error_memory_dtype=d, seed=0, quiet=True)})()
            for d in ("float32", "float16", "bfloat16")]
    assert [r[0] for r in rows] == _labels(plan)


def test_readme_reproduce_paragraph_is_the_clis():
    """The flags README's reproduce paragraph names are the CLI's, and the presets it lists are all there are."""
    import argparse

    from fl_sparse.simulations import reproduce

    text = " ".join(README.read_text().split())
    m = re.search(r"`fl-sparse reproduce NAME ([^`]*)` runs a preset's settings × seeds(.*?)settings\. ", text)
    assert m, "README's fl-sparse reproduce paragraph is gone"
    parser = argparse.ArgumentParser()
    reproduce.add_arguments(parser)
    flags = {o for a in parser._actions for o in a.option_strings}
    named = set(re.findall(r"--[a-z-]+", m.group(1) + m.group(2)))
    assert named and named <= flags, named - flags
    assert "--budget {small,full}".replace("{small,full}", "small|full") in m.group(1)
    assert set(reproduce.BUDGETS) == {"small", "full"}
    listed = re.search(r"`--list` describes the presets \(the five papers', `participation` and the smoke test `tiny`\)",
                       text)
    assert listed
    papers = {"adaptive-topk", "bidirectional-topk", "hard-threshold", "majority-voting", "rtopk"}
    assert set(reproduce.preset_names()) == papers | {"participation", "tiny"}
    assert "OUT/NAME[-full][-non-iid]/<setting>-seed<s>/" in text
    assert str(reproduce.results_dir("OUT", "NAME", budget="full", non_iid=True)) == "OUT/NAME-full-non-iid"
