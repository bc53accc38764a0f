"""The user-facing docs against the code: what a careful new user would type or rely on.

Cheap checks (no Flower processes, no training) of claims in docs/deployment.md,
docs/ray-cluster.md, docs/scale.md and examples/sparse-quickstart/README.md that
tests/test_docs.py, tests/test_deployment*.py and tests/test_walkthrough_review.py do
not read from the docs themselves:

* every ``--run-config "..."`` the docs show is accepted by Flower's own key check
  (``flwr run`` refuses keys that are not in ``[tool.flwr.app.config]``) and by
  :meth:`RunConfig.from_run_config`; the doc's list of ``fl-sparse simulate`` flags
  without a run-config key, and of the keys a resumed ``flwr run`` takes, are the code's;
* every connection a ``flwr`` command names is a ``[superlink.NAME]`` TOML block of the
  doc, insecure or with root certificates;
* the numbers the docs give for code: ``bench_deployment.py``'s default rounds, the
  automatic Dirichlet minimum's formula, the quickstart's byte breakdown, the Ray cluster
  messages;
* the quickstart's "replace BidirectionalTopKSGD by any strategy" holds with the
  arguments its ServerApp passes (and what the README says a strategy needs besides);
* no paragraph is repeated in these docs.
"""

from __future__ import annotations

import math
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENT = ROOT / "docs" / "deployment.md"
RAY_CLUSTER = ROOT / "docs" / "ray-cluster.md"
SCALE = ROOT / "docs" / "scale.md"
EXAMPLE = ROOT / "examples" / "sparse-quickstart"
QUICKSTART = EXAMPLE / "README.md"
README = ROOT / "README.md"
OWN_DOCS = (DEPLOYMENT, RAY_CLUSTER, SCALE, QUICKSTART)
SHELL_KEYWORDS = {"do", "done", "then", "else", "fi", "until", "while", "if", "(", ")", "{", "}"}


def _fenced(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block (a block indented in a list item unindented)."""
    blocks, lang, lines, indent = [], None, [], 0
    for line in text.splitlines():
        if lang is None:
            if line.lstrip().startswith("```"):
                lang, lines, indent = line.strip()[3:].strip(), [], len(line) - len(line.lstrip())
        elif line.lstrip().startswith("```"):
            blocks.append((lang, "\n".join(lines) + "\n"))
            lang = None
        else:
            lines.append(line[indent:] if line[:indent].isspace() else line)
    assert lang is None, "unclosed code fence"
    return blocks


def _shell_commands(text: str) -> list[list[str]]:
    """The commands of the doc's bash/shell blocks, continuation lines joined, split like a shell."""
    commands = []
    for lang, code in _fenced(text):
        if lang not in ("bash", "sh", "shell"):
            continue
        code = re.sub(r"<<'?TOML'?\n.*?\nTOML\n", "\n", code, flags=re.S)  # heredocs are TOML, not commands
        for line in code.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            for part in re.split(r"&&|;|\|\|?|&(?!\d)", line):
                try:
                    argv = shlex.split(part)
                except ValueError:
                    continue  # a fragment of a shell construct ($(...)), not a command of ours
                while argv and argv[0] in SHELL_KEYWORDS:
                    argv = argv[1:]
                if argv:
                    commands.append(argv)
    return commands


def _run_configs(text: str) -> list[str]:
    """The values of every ``--run-config`` the doc's commands give."""
    out = []
    for argv in _shell_commands(text):
        for i, arg in enumerate(argv[:-1]):
            if arg in ("--run-config", "-c") and argv[0] == "flwr":
                out.append(argv[i + 1])
    return out


def _app_config(pyproject: Path) -> dict:
    return tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]


def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs and bullets (code blocks left out), whitespace-normalised."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    parts = re.split(r"\n\s*\n|\n(?=\s*[*-] )|\n(?=\d+\. )", prose)
    return [" ".join(p.split()) for p in parts if p.strip()]


# ------------------------------------------------------------- run config keys
@pytest.mark.parametrize("doc, pyproject", [(DEPLOYMENT, ROOT / "pyproject.toml"), (QUICKSTART, EXAMPLE / "pyproject.toml")],
                         ids=["deployment", "quickstart"])
def test_documented_run_configs_pass_flowers_key_check(doc: Path, pyproject: Path):
    """``flwr run --run-config`` as the docs write it: Flower's SuperLink refuses a key that pyproject lacks."""
    from flwr.common.config import fuse_dicts, parse_config_args

    configs = _run_configs(doc.read_text())
    assert configs, f"no --run-config in {doc.name}"
    defaults = _app_config(pyproject)
    for text in configs:
        text = text.replace("$W", "/tmp/w")
        overrides = parse_config_args([text])
        fused = fuse_dicts(defaults, overrides, check_keys=True)  # what StartRun does: ValueError on a bad key
        if doc == DEPLOYMENT:
            from fl_sparse.server_app import RunConfig

            RunConfig.from_run_config(fused)  # the ServerApp's parse and validate


def _backticked(sentence: str) -> list[str]:
    return re.findall(r"`([^`]+)`", sentence)


def test_simulate_flags_without_run_config_key_are_the_codes():
    """docs/deployment.md names the ``fl-sparse simulate`` flags that ``flwr run`` cannot be given."""
    from fl_sparse.cli import build_parser

    text = " ".join(DEPLOYMENT.read_text().split())
    m = re.search(r"these `fl-sparse simulate` flags have no run-config equivalent: ([^.]*)\.", text)
    assert m, "the sentence naming the flags without a run-config key is gone"
    named = {f.lstrip("-") for f in _backticked(m.group(1))}
    sim = build_parser()._subparsers._group_actions[0].choices["simulate"]
    flags = {o[2:] for a in sim._actions for o in a.option_strings if o.startswith("--")} - {"help"}
    keys = set(_app_config(ROOT / "pyproject.toml"))
    # --rounds is num-rounds and --no-error-feedback is error-feedback = false (the doc says so too)
    assert "`num-rounds` for `--rounds`" in text and "`error-feedback = false` for `--no-error-feedback`" in text
    assert named == flags - keys - {"rounds", "no-error-feedback"}


def test_flwr_run_resume_keys_are_the_codes():
    """The keys a ``flwr run`` resume takes from its own run config: the code's, as far as pyproject has them."""
    from fl_sparse.server_app import FLWR_RUN_RESUME_KEYS

    text = " ".join(DEPLOYMENT.read_text().split())
    m = re.search(r"of this run config's other keys only (.*?) count", text)
    assert m, "the sentence naming the keys a resumed flwr run takes is gone"
    named = set(_backticked(m.group(1)))
    keys = set(_app_config(ROOT / "pyproject.toml"))
    settable = {k.replace("_", "-") for k in FLWR_RUN_RESUME_KEYS} & keys
    assert named == settable, (named, settable)


def test_readme_flwr_run_resume_keys_are_settable():
    """README's "Under `flwr run` ... are taken from that run's config": each one a key ``--run-config`` accepts."""
    text = " ".join(README.read_text().split())
    m = re.search(r"Under `flwr run`, set the run-config key `resume = \"DIR\"` \(.*?; (.*?) are taken from that run's config", text)
    assert m
    keys = set(_app_config(ROOT / "pyproject.toml"))
    assert set(_backticked(m.group(1))) <= keys


# ------------------------------------------------------------ flwr connections
@pytest.mark.parametrize("doc", [DEPLOYMENT, QUICKSTART], ids=["deployment", "quickstart"])
def test_every_connection_a_command_names_is_defined(doc: Path):
    """``flwr run . NAME`` / ``flwr supernode ... NAME``: a ``[superlink.NAME]`` block of the doc, which
    says how to connect (``insecure = true`` or ``root-certificates``, not both)."""
    text = doc.read_text()
    connections: dict[str, dict] = {}
    for lang, code in _fenced(text):
        if lang == "toml":
            tomls = [code]
        elif lang in ("bash", "sh", "shell"):
            tomls = re.findall(r"<<'?TOML'?\n(.*?\n)TOML\n", code, flags=re.S)
        else:
            continue
        for toml in tomls:
            data = tomllib.loads(toml.replace("$W", "/tmp/w"))
            for name, conn in data.get("superlink", {}).items():
                if isinstance(conn, dict):
                    connections[name] = conn
    used = set()
    for argv in _shell_commands(text):
        if argv[:2] == ["flwr", "run"] and len(argv) > 3 and not argv[3].startswith("-"):
            used.add(argv[3])
        elif argv[:2] == ["flwr", "supernode"] and len(argv) > 3 and not argv[-1].startswith(("-", "$")):
            used.add(argv[-1])
    assert used, "no flwr command names a connection"
    for name in used:
        assert name in connections, f"`{name}` is used but no [superlink.{name}] block defines it"
        conn = connections[name]
        assert conn.get("address")
        assert bool(conn.get("insecure")) != bool(conn.get("root-certificates")), (name, conn)


# ------------------------------------------------------------------- numbers
def test_bench_deployment_default_rounds():
    source = (ROOT / "benchmarks" / "bench_deployment.py").read_text()
    default = int(re.search(r'"--rounds", type=int, default=(\d+)', source).group(1))
    text = " ".join(DEPLOYMENT.read_text().split())
    assert f"`python benchmarks/bench_deployment.py [--rounds N] [--setups ...]` (default {default} rounds)" in text


def test_scale_automatic_dirichlet_minimum_formula():
    """docs/scale.md's formula for the automatic ``min_partition_size`` is the code's."""
    from fl_sparse.tasks.data import DIRICHLET_FILL_BELOW, dirichlet_min_partition_size

    text = " ".join(SCALE.read_text().split())
    m = re.search(r"default automatic: `([^`]+)` for n training examples", text)
    assert m, "the formula is gone from docs/scale.md"
    formula = compile(m.group(1), "docs/scale.md", "eval")
    for n in (60_000, 50_000, 1_000):
        for clients in (1, 10, 100, 499, 1_000, 10_000):
            assert eval(formula, {"max": max, "min": min}, {"n": n, "clients": clients}) == \
                dirichlet_min_partition_size(n, clients), (n, clients)
    assert f"below {DIRICHLET_FILL_BELOW} examples per client" in text


def test_quickstart_byte_breakdown():
    """The quickstart README's per-client uplink, taken apart: every part from the model, the header the rest."""
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    from flwr.app import ArrayRecord

    from sparse_quickstart.server_app import DEFAULT_CONFIG
    from sparse_quickstart.task import Net

    state = Net().state_dict()
    floats = {n: t for n, t in state.items() if t.is_floating_point()}
    stats = {n: t for n, t in floats.items() if n.endswith(("running_mean", "running_var"))}
    ints = {n: t for n, t in state.items() if not t.is_floating_point()}
    d = sum(t.numel() for t in floats.values())
    params = d - sum(t.numel() for t in stats.values())
    ratio = DEFAULT_CONFIG["ratio"]
    k = math.ceil(ratio * params)

    def nbytes(arrays) -> int:
        return sum(len(a.data) for a in ArrayRecord(arrays).values())

    text = " ".join(QUICKSTART.read_text().split())
    per_client = int(re.search(r"Each client sends (\d+) bytes per round", text).group(1))
    header = int(re.search(r"the update's header \((\d+) B\)", text).group(1))
    assert f"({d:,} float entries: {params:,} parameters".replace(",", " ") in text
    assert f"its {d - params} running means and variances ({nbytes(stats)} B" in text
    assert f"integer `num_batches_tracked` counters ({nbytes(ints)} B as Flower arrays)" in text
    assert f"k = ⌈{ratio} · {params}⌉ = {k} entries" in text
    assert f"(8 bytes each, {8 * k} B:" in text
    assert f"dense {4 * d:,} bytes".replace(",", " ") in text
    assert per_client == 8 * k + header + nbytes(ints) + nbytes(stats)
    assert f"{100 * per_client / (4 * d):.1f} % of the dense" in text


def test_quickstart_strategies_take_the_server_apps_arguments():
    """"replace BidirectionalTopKSGD by any strategy": each listed one builds from the ServerApp's arguments
    plus the ones the README says it needs."""
    import fl_sparse.strategies as strategies

    text = " ".join(QUICKSTART.read_text().split())
    m = re.search(r"Another method: replace `BidirectionalTopKSGD` by any strategy of `fl_sparse.strategies` \(([^)]*)\)", text)
    assert m
    names = _backticked(m.group(1))
    assert names
    for name in names:
        kwargs = dict(fraction_train=1.0, fraction_evaluate=1.0, ratio=0.05, seed=0)  # server_app.py's
        needs = re.search(rf"`{name}` also needs `(\w+)=\w+`", text)
        if needs:
            kwargs[needs.group(1)] = 5
        getattr(strategies, name)(**kwargs)


# -------------------------------------------------------------- ray-cluster.md
def test_ray_cluster_messages_are_the_codes():
    """The joined line and the several-nodes-without-state-dir refusal, as docs/ray-cluster.md shows them."""
    from fl_sparse.server_app import RunConfig
    from fl_sparse.simulations.runner import ClusterInfo, RayClusterError, check_cluster

    blocks = [code.strip() for lang, code in _fenced(RAY_CLUSTER.read_text()) if lang == "text"]
    nodes = [
        {"Alive": True, "Resources": {"CPU": 2.0}, "NodeManagerAddress": "192.0.2.2", "NodeID": "a"},
        {"Alive": True, "Resources": {"CPU": 1.0}, "NodeManagerAddress": "192.0.2.3", "NodeID": "b"},
        {"Alive": False, "Resources": {"CPU": 8.0}, "NodeManagerAddress": "192.0.2.4", "NodeID": "c"},
    ]
    info = ClusterInfo.from_nodes("192.0.2.2:6379", nodes)
    assert info.line() in blocks
    assert f'"nodes": {info.nodes}, "cpus": {info.cpus}, "gpus": {info.gpus}' in RAY_CLUSTER.read_text()
    with pytest.raises(RayClusterError) as exc:
        check_cluster(RunConfig(out="/shared/runs/a"), nodes, "192.0.2.2:6379")
    assert f"fl-sparse simulate: error: {exc.value}" in blocks


# --------------------------------------------------------------------- prose
@pytest.mark.parametrize("doc", OWN_DOCS, ids=[d.name if d != QUICKSTART else "quickstart" for d in OWN_DOCS])
def test_no_paragraph_is_repeated(doc: Path):
    seen: dict[str, int] = {}
    for p in _paragraphs(doc.read_text()):
        if len(p) >= 80:
            seen[p] = seen.get(p, 0) + 1
    repeated = [p[:100] for p, n in seen.items() if n > 1]
    assert not repeated, repeated
    # and no long sentence twice within one paragraph (the quickstart's was)
    for p in seen:
        sentences = [s for s in re.split(r"(?<=[.;:])\s+", p) if len(s) >= 80]
        assert len(sentences) == len(set(sentences)), p[:200]
