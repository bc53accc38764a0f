"""Compare run folders: one table and one plot for runs written by ``fl-sparse simulate --out DIR``.

``fl-sparse compare DIR... [--plot FILE.png] [--markdown]`` loads every run
(:func:`load_run`: ``DIR/config.json`` and ``DIR/metrics.jsonl``, or
``DIR/metrics.json`` of an older run), groups the runs that differ only in
their seed (and in how they ran: :data:`NOT_A_SETTING`) with
:func:`group_runs`, prints :func:`summary_table` (one row per group, mean ±
sample standard deviation over the seeds) and draws :func:`plot_runs` (test
accuracy against round and against cumulative MB sent, one line per group,
a ±std band where a group has several seeds).

Units: MB are 10**6 bytes of encoded payload as sent (what the metrics'
``uplink_bytes`` / ``downlink_bytes`` count); accuracies are percentages of
the test split; "bits/param/round" is the uplink's total bits divided by
d (the model's parameter count, ``num_params`` in config.json) times the
client updates the server accepted (rounds x clients per round when every
reply is accepted): 32 for dense fp32 FedAvg.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = [
    "Run",
    "NOT_A_SETTING",
    "setting_key",
    "load_run",
    "group_runs",
    "group_labels",
    "COLUMNS",
    "summary_rows",
    "summary_table",
    "plot_runs",
    "add_arguments",
    "run",
]

# Keys of config.json that say how a run ran, not what it computed: runs that
# differ only in these (and in their seed) are one setting.
NOT_A_SETTING = frozenset({"seed", "out", "resume", "quiet", "num_cpus", "num_gpus", "state_dir", "checkpoint_every",
                           "eval_every", "max_failed_rounds", "ray_address"})
# Short names in labels.
_SHORT = {"local_steps": "H", "batch_size": "B", "value_bits": "bits", "downlink_ratio": "down-ratio"}


def _defaults() -> dict[str, Any]:
    from dataclasses import asdict

    from fl_sparse.server_app import RunConfig

    return asdict(RunConfig())


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    """The run's settings (every RunConfig field, missing ones at their default), ``lr`` as used."""
    from fl_sparse.server_app import MODEL_LR, RunConfig

    names = [f.name for f in fields(RunConfig)]
    defaults = _defaults()
    settings = {n: config.get(n, defaults[n]) for n in names}
    if settings.get("lr") is None:
        settings["lr"] = config.get("lr_used", MODEL_LR.get(settings["model"]))
    if str(settings.get("strategy", "")).endswith("-no-ec"):
        settings["error_feedback"] = False  # such a strategy ignores the flag: label the run as it ran
    return settings


def _same_number(value: Any) -> Any:
    """``value`` with a whole float as an int: 1 (a TOML int, flwr run's run-config) and 1.0 (the CLI's) are one setting."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _compared(config: dict[str, Any]) -> dict[str, Any]:
    return {k: _same_number(v) for k, v in _settings(config).items() if k not in NOT_A_SETTING}


def setting_key(config: dict[str, Any]) -> str:
    """Equal for two run configs exactly when compare reports them as one setting (one table row)."""
    return json.dumps(_compared(config), sort_keys=True, default=str)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.10g}"  # :g (6 digits) wrote 1/512 as 0.00195312, the label of another setting
    return str(value)


def _describe(settings: dict[str, Any], keys: Iterable[str]) -> str:
    parts = [str(settings.get("strategy", "?"))]
    for key in keys:
        if key == "strategy":
            continue
        value = settings.get(key)
        name = _SHORT.get(key, key.replace("_", "-"))
        if isinstance(value, bool):
            parts.append(name if value else f"no-{name}")
        else:
            parts.append(f"{name}={_format_value(value)}")
    return " ".join(parts)


@dataclass
class Run:
    """One run folder: its ``config.json`` (as a dict) and its per-round metrics rows."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The strategy and every setting that differs from the defaults (seed and how it ran left out).

        ``lr`` counts as a default when it is the model's own. Tables and plots
        of several runs label a group by what differs among them instead
        (:func:`group_labels`).
        """
        from fl_sparse.server_app import MODEL_LR

        settings = _compared(self.config)
        defaults = _defaults()
        defaults["lr"] = MODEL_LR.get(settings["model"])
        return _describe(settings, [k for k in settings if k in defaults and settings[k] != defaults[k]])

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    def accuracies(self) -> list[tuple[int, float]]:
        """(round, test accuracy) of every evaluated round."""
        out = []
        for r in self.rows:
            acc = r.get("test_accuracy")
            if isinstance(acc, (int, float)) and math.isfinite(acc):
                out.append((int(r["round"]), float(acc)))
        return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().split("\n")
    except UnicodeDecodeError as exc:  # a ValueError that would not say which file
        raise ValueError(f"{path} is not text: {exc}") from None
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:  # the last line, torn by a process that died while writing it
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return rows


def load_run(path: str | Path) -> Run:
    """The run in folder ``path``.

    Metrics from ``metrics.jsonl`` (or, for a run of an older fl-sparse,
    ``metrics.json``); settings from ``config.json`` (or, failing that, the
    run's ``checkpoint.pt``). Rows without cumulative byte columns get them
    (running sums). Raises ValueError naming the folder when it holds no
    metrics or no settings.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: {'a file, not a' if path.exists() else 'no such'} run folder")
    if (path / "metrics.jsonl").is_file():
        source = path / "metrics.jsonl"
        rows = _read_jsonl(source)
    elif (path / "metrics.json").is_file():
        source = path / "metrics.json"
        try:
            rows = json.loads(source.read_text())
        except ValueError as exc:
            raise ValueError(f"{path / 'metrics.json'} is not JSON: {exc}") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path / 'metrics.json'} is not a list of rows")
    else:
        raise ValueError(f"{path}: no metrics.jsonl or metrics.json (not a run folder of fl-sparse simulate --out)")
    if not all(isinstance(r, dict) and "round" in r for r in rows):
        raise ValueError(f"{path}: metrics rows must be objects with a 'round'")
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except ValueError as exc:
            raise ValueError(f"{path / 'config.json'} is not JSON: {exc}") from None
    elif (path / "checkpoint.pt").is_file():
        from fl_sparse import checkpoint

        config = dict(checkpoint.load(path, mmap=True)["config"])
    else:
        raise ValueError(f"{path}: no config.json (nor checkpoint.pt) saying what the run's settings were")
    if not isinstance(config, dict):
        raise ValueError(f"{path / 'config.json'} is not a JSON object")
    from fl_sparse.server_app import METRIC_COLUMNS, add_cumulative_bytes
    from fl_sparse.strategies.arguments import is_number

    # Every number the tables and plots use is a number (JSON null: not measured), so a damaged
    # file is named here, not by a TypeError deep in a sum.
    for i, row in enumerate(rows, 1):
        if not is_number(row["round"]) or not float(row["round"]).is_integer():
            raise ValueError(f"{source}: row {i}: 'round' must be an integer, got {row['round']!r}")
        for key in METRIC_COLUMNS:
            if row.get(key) is not None and not is_number(row[key]):
                raise ValueError(f"{source}: row {i} (round {row['round']}): {key!r} must be a number, got {row[key]!r}")
    if config.get("num_params") is not None and not is_number(config["num_params"]):
        raise ValueError(f"{path / 'config.json'}: 'num_params' must be a number, got {config['num_params']!r}")

    rows = add_cumulative_bytes([dict(r) for r in rows])
    return Run(path=path, config=config, rows=rows)


def group_runs(runs: Sequence[Run]) -> list[list[Run]]:
    """Runs equal in every setting but :data:`NOT_A_SETTING` (seed, out, ...), in order of first appearance.

    Within a group the runs are sorted by seed.
    """
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(setting_key(r.config), []).append(r)
    return [sorted(g, key=lambda r: (str(type(r.seed)), r.seed if r.seed is not None else 0)) for g in groups.values()]


def group_labels(groups: Sequence[Sequence[Run]]) -> list[str]:
    """A label per group: the strategy and the settings that differ among the groups.

    One group alone is labelled by its :attr:`Run.label` (its settings that
    differ from the defaults).
    """
    if len(groups) <= 1:
        return [g[0].label for g in groups]
    settings = [_compared(g[0].config) for g in groups]
    keys = [k for k in settings[0] if len({json.dumps(s.get(k), default=str) for s in settings}) > 1]
    labels = [_describe(s, keys) for s in settings]
    return labels


# ------------------------------------------------------------------ numbers
def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    if len(values) == 1:
        return float(values[0]), None
    return statistics.fmean(values), statistics.stdev(values)


def _run_numbers(run: Run) -> dict[str, float | None]:
    accs = run.accuracies()
    last = run.rows[-1] if run.rows else {}
    up = float(last.get("cumulative_uplink_bytes") or 0)
    down = float(last.get("cumulative_downlink_bytes") or 0)
    d = run.config.get("num_params")
    accepted = [r.get("accepted") for r in run.rows]
    if run.rows and all(isinstance(a, int) for a in accepted):
        updates = sum(accepted)
    else:
        per_round = run.config.get("clients_per_round")
        updates = len(run.rows) * per_round if per_round else None
    bits = 8 * up / (d * updates) if d and updates else None
    wall = last.get("elapsed_seconds")
    if wall is None and run.rows and all(isinstance(r.get("round_seconds"), (int, float)) for r in run.rows):
        wall = sum(r["round_seconds"] for r in run.rows)
    return {
        "final": accs[-1][1] if accs else None,
        "best": max(a for _, a in accs) if accs else None,
        "rounds": int(run.rows[-1]["round"]) if run.rows else 0,
        "planned": run.config.get("rounds") if isinstance(run.config.get("rounds"), int) else None,
        "up_mb": up / 1e6,
        "down_mb": down / 1e6,
        "bits": bits,
        "wall": float(wall) if wall is not None else None,
    }


def _percent(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    mean, std = _mean_std([100 * v for v in present])
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _mean(values: list[float | None], fmt: str) -> str:
    present = [v for v in values if v is not None]
    return format(statistics.fmean(present), fmt) if present else "-"


def _rounds(values: list[int], planned: list[int | None]) -> str:
    """The rounds the runs ran; ``"2 of 3"`` when one stopped before its planned rounds (failed, interrupted)."""
    lo, hi = min(values), max(values)
    text = str(lo) if lo == hi else f"{lo}-{hi}"
    short = [p for v, p in zip(values, planned) if p is not None and v < p]
    return f"{text} of {max(short)}" if short else text


def _seeds(group: Sequence[Run]) -> str:
    """How many seeds the group's numbers are over; ``"1 (2 runs)"`` when a seed ran twice (a re-run, a copy):
    its spread is then not the spread over seeds."""
    seeds = len({json.dumps(r.seed, default=str) for r in group})
    return str(seeds) if seeds == len(group) else f"{seeds} ({len(group)} runs)"


COLUMNS = (
    "setting",
    "seeds",
    "final acc (%)",
    "best acc (%)",
    "rounds",
    "uplink MB",
    "downlink MB",
    "bits/param/round",
    "wall s",
)


def summary_rows(runs: Sequence[Run]) -> list[list[str]]:
    """The cells of :func:`summary_table`, one list per group (in :data:`COLUMNS` order)."""
    groups = group_runs(runs)
    table = []
    for label, group in zip(group_labels(groups), groups):
        numbers = [_run_numbers(r) for r in group]
        col = lambda key: [n[key] for n in numbers]  # noqa: E731
        table.append(
            [
                label,
                _seeds(group),
                _percent(col("final")),
                _percent(col("best")),
                _rounds(col("rounds"), col("planned")),
                _mean(col("up_mb"), ".3f"),
                _mean(col("down_mb"), ".3f"),
                _mean(col("bits"), ".3f"),
                _mean(col("wall"), ".1f"),
            ]
        )
    return table


def summary_table(runs: Sequence[Run], fmt: str = "text") -> str:
    """One row per group of runs (:func:`group_runs`): accuracy, rounds, traffic, bits per parameter, time.

    ``fmt`` is ``"text"`` (aligned columns) or ``"markdown"`` (a pipe
    table). Accuracies are mean ± sample std over the group's seeds when it
    has several; the other columns are means.
    """
    if fmt not in ("text", "markdown"):
        raise ValueError(f"fmt must be 'text' or 'markdown', got {fmt!r}")
    if not runs:
        raise ValueError("no runs to compare")
    body = summary_rows(runs)
    if fmt == "markdown":
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
        return "\n".join(lines) + "\n"
    widths = [max(len(c), *(len(row[i]) for row in body)) for i, c in enumerate(COLUMNS)]
    fmt_row = lambda cells: "  ".join(  # noqa: E731
        cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths))
    ).rstrip()
    return "\n".join([fmt_row(COLUMNS), fmt_row(["-" * w for w in widths]), *map(fmt_row, body)]) + "\n"


# ------------------------------------------------------------------ plot
def _curves(group: Sequence[Run]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Rounds evaluated in every run of ``group``; mean and std accuracy (%) there; mean cumulative MB."""
    per_run = [dict(r.accuracies()) for r in group]
    common = sorted(set.intersection(*(set(a) for a in per_run))) if per_run else []
    sent = [
        {int(row["round"]): (row.get("cumulative_uplink_bytes") or 0) + (row.get("cumulative_downlink_bytes") or 0)
         for row in r.rows}
        for r in group
    ]
    means, stds, mbs = [], [], []
    for rnd in common:
        values = [100 * a[rnd] for a in per_run]
        mean, std = _mean_std(values)
        means.append(mean)
        stds.append(std or 0.0)
        mbs.append(statistics.fmean(s[rnd] for s in sent) / 1e6)
    return common, means, stds, mbs


def plot_runs(runs: Sequence[Run], path: str | Path) -> None:
    """A PNG at ``path``: test accuracy vs round, and vs cumulative MB sent (uplink + downlink, log x).

    One line per group of runs (:func:`group_runs`), the mean over its seeds,
    with a ±std band where it has several.
    """
    if not runs:
        raise ValueError("no runs to plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    groups = group_runs(runs)
    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    by_round, by_bytes = fig.subplots(1, 2)
    for label, group in zip(group_labels(groups), groups):
        rounds, means, stds, mbs = _curves(group)
        if not rounds:
            continue
        name = f"{label} (n={len(group)})" if len(group) > 1 else label
        line = by_round.plot(rounds, means, marker="o" if len(rounds) < 30 else None, ms=3, label=name)[0]
        by_bytes.plot(mbs, means, color=line.get_color(), marker="o" if len(rounds) < 30 else None, ms=3, label=name)
        if len(group) > 1:
            lo = [m - s for m, s in zip(means, stds)]
            hi = [m + s for m, s in zip(means, stds)]
            by_round.fill_between(rounds, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
            by_bytes.fill_between(mbs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    by_round.set_xlabel("round")
    by_round.set_ylabel("test accuracy (%)")
    by_bytes.set_xlabel("cumulative MB sent (uplink + downlink)")
    by_bytes.set_ylabel("test accuracy (%)")
    by_bytes.set_xscale("log")
    by_bytes.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    by_bytes.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    by_bytes.xaxis.set_minor_formatter(NullFormatter())
    by_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (by_round, by_bytes):
        ax.grid(True, alpha=0.3)
    by_round.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


# ------------------------------------------------------------------ CLI
def add_arguments(parser) -> None:
    """The ``fl-sparse compare`` arguments."""
    parser.add_argument("runs", nargs="+", metavar="DIR", help="run folders (fl-sparse simulate --out DIR)")
    parser.add_argument("--plot", metavar="FILE.png", default=None,
                        help="also draw test accuracy vs round and vs cumulative MB into this PNG")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")


def run(args) -> int:
    """``fl-sparse compare``: 0 on success, 2 for a folder that is not a run, 1 when the plot cannot be written."""
    import sys

    try:
        runs = [load_run(p) for p in args.runs]
    except (ValueError, OSError) as exc:
        print(f"fl-sparse compare: error: {exc}", file=sys.stderr)
        return 2
    print(summary_table(runs, "markdown" if args.markdown else "text"), end="")
    if args.plot:
        try:
            plot_runs(runs, args.plot)
        except (OSError, ValueError) as exc:
            print(f"fl-sparse compare: cannot write the plot {args.plot}: {exc}", file=sys.stderr)
            return 1
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0
