"""A new user's walk through the docs: what they print must be what the software prints.

* examples/sparse-quickstart/README.md's "Expected output": the bytes of every round (and the
  dense size) are machine-independent, so the block must match a run of the example's own
  ServerApp and ClientApp (3 nodes, all sampled, the defaults), here in this process
  (:class:`inprocess.InProcessGrid`, no Ray). The block had gone stale when the uplink started
  counting the exact arrays (BatchNorm's ``num_batches_tracked``) that each update carries.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sparse-quickstart"
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))

from flwr.app import Context, RecordDict  # noqa: E402
from inprocess import InProcessGrid  # noqa: E402

from sparse_quickstart import server_app as server_module  # noqa: E402
from sparse_quickstart.client_app import app as client_app  # noqa: E402
from sparse_quickstart.server_app import app as server_app  # noqa: E402

ROUND_LINE = re.compile(
    r"^round (\d+): uplink (\d+) B from (\d+) clients \(([\d.]+)% of dense\), downlink (\d+) B, accuracy ([\d.]+)$"
)
DENSE_LINE = re.compile(r"^Dense model: (\d+) B per client and direction; initial accuracy ([\d.]+)$")


def _expected_output() -> tuple[int, list[tuple[int, int, int, str, int]]]:
    """(dense bytes, [(round, uplink, clients, uplink %, downlink), ...]) of the README's block."""
    text = (EXAMPLE / "README.md").read_text()
    section = text.split("## Expected output", 1)[1]
    block = section.split("```", 2)[1]
    dense, rows = None, []
    for line in block.strip().splitlines():
        if m := DENSE_LINE.match(line):
            dense = int(m.group(1))
        elif m := ROUND_LINE.match(line):
            rows.append((int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4), int(m.group(5))))
        else:
            raise AssertionError(f"unexpected line in the README's expected output: {line!r}")
    assert dense is not None and rows
    return dense, rows


def test_example_readme_expected_bytes_match_a_run(tmp_path: Path, monkeypatch):
    dense, expected = _expected_output()
    # "With the defaults (3 clients, 5 rounds, ratio = 0.05)": the README's run is the default one.
    assert len(expected) == server_module.DEFAULT_CONFIG["num-server-rounds"]
    assert "`ratio = 0.05`" in (EXAMPLE / "README.md").read_text()
    assert server_module.DEFAULT_CONFIG["ratio"] == 0.05

    monkeypatch.chdir(tmp_path)  # final_model.pt
    grid = InProcessGrid(client_app, 3, node_config=lambda i: {"state-dir": str(tmp_path / "state")})
    run_config = {**server_module.DEFAULT_CONFIG, "results": str(tmp_path / "results.json")}
    server_app(grid, Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    results = json.loads((tmp_path / "results.json").read_text())

    assert results["dense_bytes"] == dense
    got = [
        (r["round"], r["uplink_bytes"], r["clients"], f"{100 * r['uplink_fraction']:.1f}", r["downlink_bytes"])
        for r in results["rounds"]
    ]
    assert got == expected
    # The prose's per-client figure is the block's uplink over its clients.
    per_client = expected[0][1] // expected[0][2]
    assert f"Each client sends {per_client} bytes per round" in (EXAMPLE / "README.md").read_text()
    # Accuracies are machine-dependent; the run still has to learn (chance: 0.1).
    assert results["rounds"][-1]["accuracy"] == pytest.approx(0.79, abs=0.1)


def test_example_learns_at_a_small_ratio(tmp_path: Path, monkeypatch):
    """README's second command (num-server-rounds=10 ratio=0.01) on the library's defaults: BatchNorm's
    running statistics go whole, so no running variance turns negative and the model does not collapse
    to one class (accuracy 0.1 from round 5 when they were top-K'd with error feedback)."""
    import torch

    monkeypatch.chdir(tmp_path)
    grid = InProcessGrid(client_app, 3, node_config=lambda i: {"state-dir": str(tmp_path / "state")})
    run_config = {**server_module.DEFAULT_CONFIG, "num-server-rounds": 10, "ratio": 0.01,
                  "fraction-evaluate": 0.0, "results": str(tmp_path / "results.json")}
    server_app(grid, Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    final = torch.load(tmp_path / "final_model.pt")
    assert min(v.min().item() for n, v in final.items() if n.endswith("running_var")) > 0
    rows = json.loads((tmp_path / "results.json").read_text())["rounds"]
    assert rows[-1]["accuracy"] > 0.5, [r["accuracy"] for r in rows]
