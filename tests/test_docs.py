"""The documentation's code runs as written and does what the text says.

* README.md: every ```python block is executed, section by section in one
  namespace (as a reader would paste them). "Make your own Flower app sparse"
  runs for real: fast through :class:`inprocess.InProcessGrid` (every block but
  the ``run_simulation`` one, which is replaced by the in-process grid), and
  slow as one script exactly as written, through Flower's Ray simulation.
  Its printed numbers are checked against oracles computed here (bytes of the
  model, k = ceil(ratio * d) raw (int32, fp32) pairs per client) and against
  the expected output the README shows.
* Module docstrings: ``>>>`` examples through :mod:`doctest`, and the
  ``SparseFedAvg`` subclassing example (a ``::`` block) executed.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import io
import math
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from inprocess import InProcessGrid

import fl_sparse
from fl_sparse.clients import SparseMod
from fl_sparse.strategies import BidirectionalTopKSGD, SparseFedAvg

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAKE_SPARSE = "Make your own Flower app sparse"
USING = "Using the strategies in your own Flower app"
LIBRARY = "Library"
RUNNING = "Running experiments"
HEADER_BYTES = 512  # generous bound on one payload's header
ROUND_LINE = re.compile(
    r"round (\d+): train loss ([0-9.]+), uplink (\d+) B from (\d+) clients \(dense: (\d+) B each\)"
)


# ----------------------------------------------------------------- helpers
def fenced_blocks(text: str) -> list[tuple[str, str, str]]:
    """(section heading, fence language, code) of every fenced block, in order."""
    blocks, heading, lang, lines = [], "", None, []
    for line in text.splitlines():
        if lang is None:
            if line.startswith("## "):
                heading = line[3:].strip()
            elif line.startswith("```"):
                lang, lines = line[3:].strip(), []
        elif line.startswith("```"):
            blocks.append((heading, lang, "\n".join(lines) + "\n"))
            lang = None
        else:
            lines.append(line)
    assert lang is None, "unclosed code fence in README.md"
    return blocks


def python_blocks(section: str | None = None) -> list[str]:
    return [
        code
        for heading, lang, code in fenced_blocks(README.read_text())
        if lang == "python" and (section is None or heading == section)
    ]


def run_blocks(blocks: list[str], ns: dict | None = None) -> tuple[dict, str]:
    """Execute the blocks in order in one namespace; returns it and what they printed."""
    ns = {"__name__": "__readme__"} if ns is None else ns
    out = io.StringIO()
    with redirect_stdout(out):
        for i, code in enumerate(blocks):
            exec(compile(code, f"README.md block {i}", "exec"), ns)
    return ns, out.getvalue()


def parse_rounds(text: str) -> list[tuple[int, float, int, int, int]]:
    return [(int(r), float(loss), int(up), int(n), int(dense)) for r, loss, up, n, dense in ROUND_LINE.findall(text)]


def check_sparse_app_output(printed: str, make_model, *, clients: int = 2, rounds: int = 3, ratio: float = 0.1) -> None:
    """The README app's printed rounds: real sparse traffic, learning, and the README's own numbers."""
    sizes = [t.numel() for t in make_model().state_dict().values()]
    d = sum(sizes)
    k = math.ceil(ratio * d)
    rows = parse_rounds(printed)
    assert [r[0] for r in rows] == list(range(1, rounds + 1)), printed
    for _, loss, uplink, n, dense in rows:
        assert n == clients
        assert dense == 4 * d  # float32 model, bytes
        # k (int32 position, fp32 value) pairs per client, plus a header: a fraction of dense.
        assert clients * 8 * k <= uplink <= clients * (8 * k + HEADER_BYTES), (uplink, k)
        assert uplink < clients * dense
        assert math.isfinite(loss)
    assert rows[-1][1] < rows[0][1], rows  # the global model improves round over round
    assert rows[-1][1] < math.log(2), rows  # and beats guessing (2 classes)
    # What the README says it prints: the same bytes exactly, the losses roughly.
    shown = parse_rounds(_readme_expected_output())
    assert [r[0] for r in shown] == [r[0] for r in rows]
    assert [r[2:] for r in shown] == [r[2:] for r in rows]
    for (_, shown_loss, *_), (_, loss, *_) in zip(shown, rows):
        assert abs(shown_loss - loss) < 0.15, (shown, rows)


def _readme_expected_output() -> str:
    outputs = [code for heading, lang, code in fenced_blocks(README.read_text()) if heading == MAKE_SPARSE and lang == ""]
    assert len(outputs) == 1, "the section shows one expected output block"
    return outputs[0]


def _state_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("gen-*/*.state"))


# ----------------------------------------------------------- README.md
def test_every_python_block_is_run_here():
    """New README code gets tested: every python block is in a section this module runs."""
    headings = {heading for heading, lang, _ in fenced_blocks(README.read_text()) if lang == "python"}
    assert headings == {MAKE_SPARSE, USING, LIBRARY, RUNNING}, headings
    for code in python_blocks():
        assert not code.lstrip().startswith("# not run"), code


def test_make_your_own_app_sparse_in_process(tmp_path: Path, monkeypatch):
    """The section's client and server blocks, run on the in-process grid (2 nodes, 3 rounds)."""
    blocks = python_blocks(MAKE_SPARSE)
    assert len(blocks) == 3 and "run_simulation(" in blocks[2]
    assert all("run_simulation(" not in b for b in blocks[:2])
    monkeypatch.setenv("FL_SPARSE_STATE_DIR", str(tmp_path / "state"))
    ns, _ = run_blocks(blocks[:2])
    client_app, server_app = ns["client_app"], ns["server_app"]
    assert [type(m) for m in client_app._mods] == [SparseMod]

    grid = InProcessGrid(client_app, 2)
    context = Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    out = io.StringIO()
    with redirect_stdout(out):
        server_app(grid, context)
    check_sparse_app_output(out.getvalue(), ns["make_model"])
    assert _state_files(tmp_path / "state") == ["client-0.state", "client-1.state"]


@pytest.mark.slow
def test_make_your_own_app_sparse_as_written(tmp_path: Path):
    """The section's three blocks as one script, exactly as written: Flower's Ray simulation."""
    script = tmp_path / "readme_app.py"
    script.write_text("\n".join(python_blocks(MAKE_SPARSE)))
    env = dict(os.environ, FL_SPARSE_STATE_DIR=str(tmp_path / "state"), PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ns, _ = run_blocks(python_blocks(MAKE_SPARSE)[:1])  # make_model, for the oracle
    check_sparse_app_output(proc.stdout, ns["make_model"])
    assert _state_files(tmp_path / "state") == ["client-0.state", "client-1.state"]


@pytest.mark.slow
def test_python_api_block_runs_two_simulations(tmp_path: Path, monkeypatch):
    """``simulate(RunConfig(...))`` and ``simulate(cfg, strategy=...)`` as written, through Ray."""
    monkeypatch.chdir(tmp_path)
    (block,) = python_blocks(RUNNING)
    ns, printed = run_blocks([block])
    first, second = (line.split() for line in printed.strip().splitlines()[-2:])
    k = math.ceil(0.01 * ns["mine"].state.model.numel())  # RunConfig's ratio 0.01 vs the strategy's 0.05
    assert 0.3 < float(first[0]) <= 1 and 0.3 < float(second[0]) <= 1  # both learn in 3 rounds
    assert int(second[1]) > 4 * int(first[1])  # 5x the uplink entries (positions cost less per entry)
    assert len(ns["rows"]) == 3 and ns["rows"][-1]["clients"] == 4 and k > 0


def test_using_the_strategies_block():
    ns, _ = run_blocks(python_blocks(USING))
    strategy = ns["strategy"]
    assert isinstance(strategy, BidirectionalTopKSGD)
    assert strategy.uplink == {"name": "topk", "ratio": 0.001}
    assert strategy.uplink_positions == "rice" and strategy.fraction_train == 0.1 and strategy.seed == 0
    decaying = ns["DecayingTopK"]()
    assert isinstance(decaying, SparseFedAvg)
    ratios = {t: decaying.uplink_spec(t, 10)["ratio"] for t in (1, 10, 11, 20, 21, 31)}
    assert ratios == {1: 0.01, 10: 0.01, 11: 0.005, 20: 0.005, 21: 0.0025, 31: 0.00125}


def test_library_block():
    ns, printed = run_blocks(python_blocks(LIBRARY))
    x, a, sparse, received, memory = ns["x"], ns["a"], ns["sparse"], ns["received"], ns["memory"]
    assert torch.equal(a, x)  # a fresh memory is zero: a = x + 0
    top = set(torch.topk(a.abs(), 1000).indices.tolist())  # ratio 0.001 of 10^6
    assert set(sparse.indices.tolist()) == top
    assert torch.equal(received.indices, sparse.indices)
    assert torch.equal(torch.sign(received.values), torch.sign(sparse.values))  # q4 keeps signs
    unsent = torch.ones(x.numel(), dtype=torch.bool)
    unsent[sparse.indices] = False
    assert torch.equal(memory.error[unsent], a[unsent])  # error keeps what was not sent
    total = int(printed.strip().splitlines()[-1])
    # 1000 values at 4 bits + near-entropy positions: far below 1000 raw (int32, fp32) pairs.
    assert 500 < total < 1000 * 8 // 2, total


# --------------------------------------------------------- docstrings
def _modules():
    for info in pkgutil.walk_packages(fl_sparse.__path__, "fl_sparse."):
        yield importlib.import_module(info.name)


def test_module_doctests():
    """``>>>`` examples in the package's docstrings, if any, pass."""
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    attempted = 0
    for module in _modules():
        for test in finder.find(module):
            result = runner.run(test, out=lambda s: None)
            assert result.failed == 0, f"doctest failed in {test.name}"
            attempted += result.attempted
    if attempted == 0:
        pytest.skip("no >>> examples in fl_sparse's docstrings")


def test_sparse_fedavg_subclass_example_in_docstring():
    """base.py's 'a ratio that halves every 10 rounds' example, executed as written."""
    from fl_sparse.strategies import base

    doc = inspect.getdoc(base)
    start = doc.index("halves every 10 rounds::")
    block = []
    for line in doc[start:].splitlines()[1:]:
        if line.strip() and not line.startswith(" "):
            break
        block.append(line)
    code = textwrap.dedent("\n".join(block))
    assert "class DecayingTopK(SparseFedAvg)" in code
    ns: dict = {}
    exec(compile(code, "fl_sparse/strategies/base.py docstring", "exec"), ns)
    strategy = ns["DecayingTopK"]()
    assert [strategy.uplink_spec(t, 3)["ratio"] for t in (1, 11, 21)] == [0.01, 0.005, 0.0025]
