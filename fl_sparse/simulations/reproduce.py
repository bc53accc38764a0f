"""Each paper's comparison from one command: ``fl-sparse reproduce NAME``.

A *preset* (``fl_sparse/simulations/presets/NAME.toml``, read with
:mod:`tomllib`) describes one paper's experiment on Fashion-MNIST: a ``base``
run configuration (field names of :class:`~fl_sparse.server_app.RunConfig`),
a list of ``settings`` (each a short ``name`` and the fields it overrides),
per-budget overrides (``[budgets.small]``: all five papers in about two
hours on a 2-core CPU; ``[budgets.full]``: the papers' own sizes) and a
non-IID variant (``[non_iid]``: by default Dirichlet α = 0.3, 100 clients,
10 % sampled per round). :func:`expand` turns a preset into
:class:`PlannedRun` s, settings × seeds; :func:`run_plan` runs them one after
the other with :func:`~fl_sparse.simulations.runner.simulate`;
:func:`write_report` writes ``results.md`` (the table of
:func:`fl_sparse.simulations.compare.summary_rows` with the settings' names,
the exact command, the machine, the date) and ``accuracy.png``
(:func:`~fl_sparse.simulations.compare.plot_runs`).

Preset file format (every key optional but ``settings``)::

    title = "..."                 # one line
    paper = "..."                 # the paper (file stem in ../shared/papers, or a title)
    description = "..."           # what is compared, and how it departs from the paper
    seeds = 3                     # default --seeds
    columns = ["density"]         # per-round metrics also reported: cumulative_* at the last round, others averaged

    [base]                        # RunConfig fields for every run
    model = "mlp-784-64-10"

    [[settings]]                  # one per compared setting, in table order
    name = "topk"                 # [A-Za-z0-9._-], unique; the run folder is <name>-seed<s>
    strategy = "topk"             # RunConfig fields this setting overrides
    paper = "Table 1: 92.2 %"     # what the paper reports for it (shown in results.md)
    budget.full = {rounds = 3000} # overrides at one budget only
    non_iid = {name = "topk-n"}   # overrides in the non-IID variant (and its name); false: left out of it

    [budgets.small]               # RunConfig fields at this budget, plus:
    settings = ["topk"]           # the settings run at this budget (default: all)
    seeds = 3                     # default --seeds at this budget

    [non_iid]                     # RunConfig fields of the non-IID variant (over the defaults below)

Precedence, later wins: RunConfig defaults, ``base``, the budget's fields,
the setting's fields, the setting's ``budget.<budget>``, then with
``--non-iid`` the non-IID fields and the setting's ``non_iid``; ``seed`` and
``out`` are set by :func:`expand`.

Runs go to ``OUT/NAME[-full][-non-iid]/<setting>-seed<s>/``. A folder that
already holds the complete run is skipped, an interrupted one is continued
from its checkpoint (:func:`~fl_sparse.server_app.resume_config`), so running
the same command again finishes what is missing; a folder holding a run of
other settings is reported and left alone. A completed run's
``client-state`` folder (each client's model copy and error memory, only
needed to continue the run) is removed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from fl_sparse.server_app import RUN_FILES, RunConfig, RunFailed, RunInterrupted, stop_requested
from fl_sparse.simulations.compare import NOT_A_SETTING, setting_key

__all__ = [
    "BUDGETS",
    "NON_IID",
    "Preset",
    "Setting",
    "PlannedRun",
    "Outcome",
    "preset_names",
    "load_preset",
    "parse_preset",
    "expand",
    "results_dir",
    "run_status",
    "run_plan",
    "write_report",
    "add_arguments",
    "run",
]

PRESET_PACKAGE = "fl_sparse.simulations.presets"
BUDGETS = ("small", "full")
DEFAULT_SEEDS = 3
# The non-IID variant of every preset (issue 10): Dirichlet α = 0.3 over 100 clients, 10 % per round.
NON_IID: dict[str, Any] = {"partition": "dirichlet", "alpha": 0.3, "clients": 100, "fraction": 0.1}

_CONFIG_FIELDS = {f.name for f in fields(RunConfig)}
# Set by reproduce itself, never by a preset.
_RESERVED = {"seed", "out", "resume", "state_dir"}
# How a run ran, not what it computed: a finished run that differs only in these is the same run.
_HOW_IT_RAN = NOT_A_SETTING - {"seed"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ------------------------------------------------------------------ presets
@dataclass(frozen=True)
class Setting:
    """One compared setting of a preset."""

    name: str
    overrides: dict[str, Any]
    paper: str | None = None
    budget: dict[str, dict[str, Any]] = field(default_factory=dict)
    non_iid: dict[str, Any] | None = field(default_factory=dict)  # None: not in the non-IID variant


@dataclass(frozen=True)
class Preset:
    """A paper's comparison, as read from its preset file."""

    name: str
    title: str
    paper: str
    description: str
    seeds: int
    base: dict[str, Any]
    settings: tuple[Setting, ...]
    budgets: dict[str, dict[str, Any]]
    non_iid: dict[str, Any]
    source: str
    columns: tuple[str, ...] = ()

    def setting(self, name: str) -> Setting:
        for s in self.settings:
            if s.name == name:
                return s
        raise KeyError(name)


@dataclass(frozen=True)
class PlannedRun:
    """One run of a reproduction: a setting at one seed, its configuration and folder."""

    setting: str
    seed: int
    config: RunConfig
    paper: str | None = None

    @property
    def path(self) -> Path:
        return Path(self.config.out)

    @property
    def label(self) -> str:
        return f"{self.setting}-seed{self.seed}"


def preset_names() -> list[str]:
    """The presets shipped in the package, sorted."""
    folder = resources.files(PRESET_PACKAGE)
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> Preset:
    """The preset called ``name``; ValueError listing the presets when there is none."""
    names = preset_names()
    if name not in names:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(names)}")
    source = f"{PRESET_PACKAGE.replace('.', '/')}/{name}.toml"
    text = resources.files(PRESET_PACKAGE).joinpath(f"{name}.toml").read_text(encoding="utf-8")
    return parse_preset(name, text, source=source)


def _fields(where: str, table: Any, *, allowed_extra: Iterable[str] = ()) -> dict[str, Any]:
    """``table``'s RunConfig fields, checked: a table, known names, none reproduce sets itself."""
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table of RunConfig fields, got {table!r}")
    extra = set(allowed_extra)
    out = {}
    for key, value in table.items():
        if key in extra:
            continue
        if key in _RESERVED:
            raise ValueError(f"{where}: {key!r} is set by fl-sparse reproduce (--seeds, --out), not by a preset")
        if key not in _CONFIG_FIELDS:
            known = ", ".join(sorted(_CONFIG_FIELDS - _RESERVED))
            raise ValueError(f"{where}: unknown setting {key!r}; RunConfig fields are: {known}")
        out[key] = value
    return out


def _check_name(where: str, name: Any) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{where}: a setting name must be letters, digits, '.', '_' or '-' (a folder name), got {name!r}")
    return name


def _seeds(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: seeds must be an int >= 1, got {value!r}")
    return value


def parse_preset(name: str, text: str, *, source: str = "<preset>") -> Preset:
    """A :class:`Preset` from TOML ``text``; ValueError naming ``source`` and the offending key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source}: not valid TOML: {exc}") from None
    known_top = {"title", "paper", "description", "seeds", "columns", "base", "settings", "budgets", "non_iid"}
    unknown = sorted(set(data) - known_top)
    if unknown:
        raise ValueError(f"{source}: unknown top-level key(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(sorted(known_top))}")
    base = _fields(f"{source} [base]", data.get("base", {}))
    raw_settings = data.get("settings")
    if not isinstance(raw_settings, list) or not raw_settings:
        raise ValueError(f"{source}: needs at least one [[settings]] table")
    settings: list[Setting] = []
    for i, raw in enumerate(raw_settings):
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: settings entry {i + 1} is not a table")
        where = f"{source} setting {raw.get('name', i + 1)!r}"
        sname = _check_name(where, raw.get("name"))
        if any(s.name.lower() == sname.lower() for s in settings):  # folders: case-insensitive file systems too
            raise ValueError(f"{source}: two settings are called {sname!r}")
        overrides = _fields(where, raw, allowed_extra=("name", "paper", "budget", "non_iid"))
        budget_raw = raw.get("budget", {})
        if not isinstance(budget_raw, dict):
            raise ValueError(f"{where}: 'budget' must map budget names to overrides")
        per_budget = {}
        for b, table in budget_raw.items():
            if b not in BUDGETS:
                raise ValueError(f"{where}: unknown budget {b!r}; budgets are {', '.join(BUDGETS)}")
            per_budget[b] = _fields(f"{where} budget.{b}", table)
        non_iid_raw = raw.get("non_iid", {})
        if non_iid_raw is False:
            non_iid = None
        else:
            non_iid = _fields(f"{where} non_iid", non_iid_raw, allowed_extra=("name",))
            if "name" in non_iid_raw:
                non_iid["name"] = _check_name(f"{where} non_iid", non_iid_raw["name"])
        paper = raw.get("paper")
        if paper is not None and not isinstance(paper, str):
            raise ValueError(f"{where}: 'paper' must be a string")
        settings.append(Setting(sname, overrides, paper, per_budget, non_iid))
    budgets: dict[str, dict[str, Any]] = {}
    raw_budgets = data.get("budgets", {})
    if not isinstance(raw_budgets, dict):
        raise ValueError(f"{source}: [budgets] must hold [budgets.small] and [budgets.full] tables")
    for b, table in raw_budgets.items():
        if b not in BUDGETS:
            raise ValueError(f"{source}: unknown budget {b!r}; budgets are {', '.join(BUDGETS)}")
        where = f"{source} [budgets.{b}]"
        budgets[b] = _fields(where, table, allowed_extra=("settings", "seeds"))
        if "settings" in table:
            subset = table["settings"]
            if not isinstance(subset, list) or not subset:
                raise ValueError(f"{where}: 'settings' must be a non-empty list of setting names")
            names = [s.name for s in settings]
            missing = [s for s in subset if s not in names]
            if missing:
                raise ValueError(f"{where}: no setting called {', '.join(map(repr, missing))}; settings: {', '.join(names)}")
            budgets[b]["settings"] = list(subset)
        if "seeds" in table:
            budgets[b]["seeds"] = _seeds(where, table["seeds"])
    non_iid = {**NON_IID, **_fields(f"{source} [non_iid]", data.get("non_iid", {}))}
    if all(s.non_iid is None for s in settings):
        raise ValueError(f"{source}: every setting is left out of the non-IID variant")
    for key in ("title", "paper", "description"):
        if key in data and not isinstance(data[key], str):
            raise ValueError(f"{source}: {key!r} must be a string")
    columns = data.get("columns", [])
    if not isinstance(columns, list) or not all(isinstance(c, str) and c for c in columns):
        raise ValueError(f"{source}: 'columns' must be a list of metric names")
    return Preset(
        name=name,
        title=str(data.get("title", name)),
        paper=str(data.get("paper", "")),
        description=" ".join(str(data.get("description", "")).split()),
        seeds=_seeds(source, data.get("seeds", DEFAULT_SEEDS)),
        base=base,
        settings=tuple(settings),
        budgets=budgets,
        non_iid=non_iid,
        source=source,
        columns=tuple(columns),
    )


# ------------------------------------------------------------------ planning
def results_dir(out: str | os.PathLike, name: str, *, budget: str = "small", non_iid: bool = False) -> Path:
    """``OUT/NAME``, with ``-full`` for the full budget and ``-non-iid`` for the non-IID variant."""
    return Path(out) / (name + ("-full" if budget == "full" else "") + ("-non-iid" if non_iid else ""))


def default_seeds(preset: Preset, budget: str) -> int:
    return int(preset.budgets.get(budget, {}).get("seeds", preset.seeds))


def expand(
    preset: Preset | str,
    *,
    budget: str = "small",
    seeds: int | None = None,
    non_iid: bool = False,
    out: str | os.PathLike = "runs",
    only: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[PlannedRun]:
    """The runs of ``preset`` at ``budget``: its settings (or ``only`` those) × seeds 0..seeds-1, setting-major.

    ``overrides`` are RunConfig fields of how the runs run (``quiet``,
    ``num_cpus``, ``num_gpus``, ``eval_every``, ...), applied last. Every
    configuration is validated (:meth:`RunConfig.validate`); two settings that
    would be the same run are refused.
    """
    if isinstance(preset, str):
        preset = load_preset(preset)
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    n_seeds = default_seeds(preset, budget) if seeds is None else seeds
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {n_seeds!r}")
    extra = _fields("overrides", overrides or {})
    budget_fields = dict(preset.budgets.get(budget, {}))
    chosen_names = budget_fields.pop("settings", None)
    budget_fields.pop("seeds", None)
    settings = [s for s in preset.settings if chosen_names is None or s.name in chosen_names]
    if non_iid:
        settings = [s for s in settings if s.non_iid is not None]
    if only:
        names = [s.name if not non_iid else s.non_iid.get("name", s.name) for s in settings]
        missing = [o for o in only if o not in names]
        if missing:
            raise ValueError(f"preset {preset.name!r} has no setting {', '.join(map(repr, missing))} "
                             f"at this budget{' (non-IID)' if non_iid else ''}; its settings: {', '.join(names)}")
    folder = results_dir(out, preset.name, budget=budget, non_iid=non_iid)
    defaults = asdict(RunConfig())
    plan: list[PlannedRun] = []
    seen: dict[str, str] = {}
    for s in settings:
        values = {**defaults, **preset.base, **budget_fields, **s.overrides, **s.budget.get(budget, {})}
        name = s.name
        if non_iid:
            values.update(preset.non_iid)
            values.update({k: v for k, v in s.non_iid.items() if k != "name"})
            name = s.non_iid.get("name", s.name)
        if only and name not in only:
            continue
        values.update(extra)
        where = f"preset {preset.name!r} setting {name!r} ({budget} budget{', non-IID' if non_iid else ''})"
        try:
            base_cfg = RunConfig(**{k: v for k, v in values.items() if k in _CONFIG_FIELDS})
            base_cfg.validate()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        # The same run as compare (write_report's table) sees it: lr unset is the model's own, a -no-ec
        # strategy runs without error feedback, 1 and 1.0 are one value; else two settings become one row.
        key = setting_key(asdict(base_cfg))
        if key in seen:
            raise ValueError(f"{where} is the same run as setting {seen[key]!r}")
        if name.lower() in {v.lower() for v in seen.values()}:
            raise ValueError(f"{where}: two settings are called {name!r}")
        seen[key] = name
        for seed in range(n_seeds):
            cfg = replace(base_cfg, seed=seed, out=str(folder / f"{name}-seed{seed}"))
            plan.append(PlannedRun(setting=name, seed=seed, config=cfg, paper=s.paper))
    return plan


# ------------------------------------------------------------------ running
def _saved(path: Path) -> tuple[dict[str, Any], int] | None:
    """(config, round) of the checkpoint in ``path``, or None when there is no readable one."""
    from fl_sparse import checkpoint

    if not (path / "checkpoint.pt").is_file():
        return None
    try:
        ckpt = checkpoint.load(path, mmap=True)
        return dict(ckpt["config"]), int(ckpt["round"])
    except Exception:  # noqa: BLE001 - a torn or foreign checkpoint: no run to continue
        return None


def run_status(planned: PlannedRun) -> tuple[str, str]:
    """What running ``planned`` means now: ("new" | "complete" | "resume" | "restart" | "conflict", why)."""
    from fl_sparse.simulations.compare import load_run

    path = planned.path
    cfg = planned.config
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return "new", ""
    if not path.is_dir():
        return "conflict", f"{path} exists and is not a folder"
    if not any((path / f).exists() for f in RUN_FILES):
        return "conflict", f"{path} holds files that are not an fl-sparse run; move them or use another --out"
    saved = _saved(path)
    if saved is None:
        try:  # no checkpoint: the run died before its first one, or it was deleted; config.json says whose run it is
            config, done = json.loads((path / "config.json").read_text()), -1
        except (OSError, ValueError):
            config, done = None, -1
    else:
        config, done = saved
    if isinstance(config, dict):
        mine = asdict(cfg)
        differ = [k for k in mine if k not in _HOW_IT_RAN and config.get(k, mine[k]) != mine[k]]
        if differ:
            detail = ", ".join(f"{k}: saved {config.get(k)!r}, planned {mine[k]!r}" for k in differ)
            return "conflict", f"{path} holds a run of other settings ({detail}); move it away or use another --out"
    if saved is None:
        return "restart", "no checkpoint to continue from"
    if done >= cfg.rounds:
        try:
            rows = load_run(path).rows
        except ValueError as exc:
            return "restart", str(exc)
        if rows and int(rows[-1]["round"]) >= cfg.rounds:
            return "complete", ""
        return "restart", f"the metrics stop at round {int(rows[-1]['round']) if rows else 0}"
    return "resume", f"continuing from round {done}"


@dataclass
class Outcome:
    """What :func:`run_plan` did."""

    ran: list[PlannedRun] = field(default_factory=list)
    skipped: list[PlannedRun] = field(default_factory=list)
    failed: list[tuple[PlannedRun, str]] = field(default_factory=list)
    interrupted: PlannedRun | None = None

    @property
    def complete(self) -> list[PlannedRun]:
        return [*self.skipped, *self.ran]


def _default_runner(cfg: RunConfig) -> list[dict[str, Any]]:
    from fl_sparse.simulations.runner import simulate

    return simulate(cfg)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_plan(
    plan: Sequence[PlannedRun],
    *,
    runner: Callable[[RunConfig], list[dict[str, Any]]] | None = None,
    log: Callable[[str], None] = _log,
) -> Outcome:
    """Run every planned run not already complete, one after the other; a failure does not stop the rest.

    ``runner(cfg)`` runs one configuration (default:
    :func:`~fl_sparse.simulations.runner.simulate`). A run interrupted on
    request (:class:`~fl_sparse.server_app.RunInterrupted`) ends the plan:
    running it again continues there.
    """
    runner = runner or _default_runner
    outcome = Outcome()
    total = len(plan)
    for i, planned in enumerate(plan, 1):
        head = f"[{i}/{total}] {planned.label}"
        status, why = run_status(planned)
        cfg = planned.config
        if status == "complete":
            log(f"{head}: already complete in {planned.path}, skipped")
            outcome.skipped.append(planned)
            continue
        if status == "conflict":
            log(f"{head}: FAILED: {why}")
            outcome.failed.append((planned, why))
            continue
        if stop_requested.is_set():
            # Ctrl-C in the last round of the run before: that run ended complete; the plan ends here,
            # before this run starts (it would stop after its first round, a folder to continue for nothing).
            log(f"{head}: not started: stop requested; run the same command again to continue")
            outcome.interrupted = planned
            break
        try:
            if status == "resume":
                from fl_sparse.server_app import resume_config

                cfg = resume_config(
                    planned.path, rounds=cfg.rounds, quiet=cfg.quiet, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                    eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every,
                    max_failed_rounds=cfg.max_failed_rounds,
                )
            elif status == "restart":
                shutil.rmtree(planned.path)
            log(f"{head}: {cfg.strategy}, {cfg.clients} clients, {cfg.rounds} rounds"
                + (f" ({why})" if status in ("resume", "restart") else "") + f" -> {planned.path}")
            started = time.perf_counter()
            rows = runner(cfg)
        except RunInterrupted as exc:
            log(f"{head}: interrupted ({exc}); run the same command again to continue")
            outcome.interrupted = planned
            break
        except Exception as exc:  # noqa: BLE001 - report it, go on with the other runs
            message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, (RunFailed, ValueError)) else str(exc)
            log(f"{head}: FAILED: {message}")
            outcome.failed.append((planned, message))
            continue
        shutil.rmtree(planned.path / "client-state", ignore_errors=True)  # only needed to continue the run
        acc = rows[-1].get("test_accuracy") if rows else None
        acc_s = f", final accuracy {100 * acc:.2f} %" if isinstance(acc, float) else ""
        log(f"{head}: done in {time.perf_counter() - started:.0f} s{acc_s}")
        outcome.ran.append(planned)
    return outcome


# ------------------------------------------------------------------ report
def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _max_metric(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return max(values) if values else None


def _run_measure(rows: list[dict[str, Any]], key: str) -> float | None:
    """``key`` of a run: its last value for ``cumulative_*`` metrics, else its mean over the rounds."""
    values = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
              and math.isfinite(r[key])]
    if not values:
        return None
    return values[-1] if key.startswith("cumulative_") else sum(values) / len(values)


def _mean_std(values: list[float]) -> str:
    import statistics

    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.fmean(values):.3g} ± {statistics.stdev(values):.2g}"


def _machine(runs: Sequence[Any]) -> str:
    import torch

    devices = sorted({str(r.config.get("device")) for r in runs if r.config.get("device")}) or ["cpu"]
    versions = next((r.config.get("versions") for r in runs if isinstance(r.config.get("versions"), dict)), {}) or {}
    flwr = versions.get("flwr")
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"
            + (f", {torch.cuda.get_device_name(0)} visible" if torch.cuda.is_available() else "")
            + f"; runs on: {', '.join(devices)}; Python {platform.python_version()}, torch {torch.__version__}"
            + (f", flwr {flwr}" if flwr else ""))


def _overrides_text(cfg: RunConfig, reference: dict[str, Any]) -> str:
    mine = asdict(cfg)
    parts = [f"{k}={mine[k]!r}" if isinstance(mine[k], str) else f"{k}={mine[k]}"
             for k in mine if k not in _HOW_IT_RAN | {"seed"} and mine[k] != reference.get(k)]
    return ", ".join(parts) or "(the base)"


def write_report(
    folder: str | os.PathLike,
    preset: Preset,
    plan: Sequence[PlannedRun],
    *,
    command: str,
    budget: str,
    non_iid: bool,
    outcome: Outcome | None = None,
) -> Path | None:
    """``folder/results.md`` and ``folder/accuracy.png`` from the plan's complete runs; None if none is.

    The table has one row per setting (mean ± std over its seeds), named as in
    the preset; a ρ / ρ̂ table is added when the runs measured them
    (``diagnostics``); the settings table says what each one overrides and
    what the paper reports for it.
    """
    from fl_sparse.simulations import compare

    folder = Path(folder)
    loaded = []
    for planned in plan:
        status, _ = run_status(planned)
        if status == "complete":
            loaded.append((planned, compare.load_run(planned.path)))
    if not loaded:
        return None
    runs = [r for _, r in loaded]
    by_path = {str(r.path): p for p, r in loaded}
    groups = compare.group_runs(runs)
    names = [by_path[str(g[0].path)].setting for g in groups]
    labels = compare.group_labels(groups)
    cells = compare.summary_rows(runs)
    columns = list(compare.COLUMNS)

    variant = "non-IID (" + ", ".join(f"{k}={v}" for k, v in preset.non_iid.items()) + ")" if non_iid else "as in the preset"
    seeds = sorted({p.seed for p in plan})
    lines = [
        f"# {preset.title}",
        "",
        preset.description,
        "",
        f"- Paper: {preset.paper}; preset `{preset.source}`",
        f"- Command: `{command}`",
        f"- Budget: {budget}; data split: {variant}; seeds: {', '.join(map(str, seeds))}",
        f"- Machine: {_machine(runs)}",
        f"- Date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- Runs: {len(loaded)} of {len(plan)} complete",
        "",
        "## Results",
        "",
        "| " + " | ".join(["setting", "what differs", *columns[1:]]) + " |",
        "|" + "|".join("---" for _ in range(len(columns) + 1)) + "|",
    ]
    for name, label, row in zip(names, labels, cells):
        lines.append("| " + " | ".join(_md(c) for c in [name, label, *row[1:]]) + " |")
    lines += [
        "",
        "Accuracy: % of the test split, final round and best round, mean ± sample std over the seeds. "
        "MB: 10^6 bytes as encoded and sent, summed over the run and all clients; bits/param/round: uplink "
        "bits per parameter per accepted client update (32 = dense fp32). Plot: `accuracy.png` (test accuracy "
        "against round and against cumulative MB sent).",
        "",
    ]
    diag = []
    for name, group in zip(names, groups):
        rho_hat = [v for v in (_max_metric(r.rows, "rho_hat") for r in group) if v is not None]
        rho = [v for v in (_max_metric(r.rows, "rho") for r in group) if v is not None]
        if rho_hat or rho:
            paper = by_path[str(group[0].path)].paper or ""
            diag.append(f"| {_md(name)} | {_mean_std(rho_hat)} | {_mean_std(rho)} | {_md(paper)} |")
    if diag:
        lines += [
            "## ρ and ρ̂ (maximum over the rounds)",
            "",
            "ρ̂: ‖Top_K(Σ p a) − Σ Top_K(p a)‖ / ‖Σ p α g‖ (unidirectional); ρ: the same with the server error δ "
            "and the downlink top-K (bidirectional); the shape of Table 1 of the bidirectional top-K paper.",
            "",
            "| setting | max ρ̂ | max ρ | paper |",
            "|---|---|---|---|",
            *diag,
            "",
        ]
    if preset.columns:
        lines += [
            "## Other measures",
            "",
            "Per-round metrics of the runs (`metrics.jsonl`): `cumulative_*` at the last round, the others "
            "averaged over the rounds that report them; mean ± std over the seeds.",
            "",
            "| setting | " + " | ".join(preset.columns) + " |",
            "|" + "|".join("---" for _ in range(len(preset.columns) + 1)) + "|",
        ]
        for name, group in zip(names, groups):
            cells = [_mean_std([v for v in (_run_measure(r.rows, c) for r in group) if v is not None])
                     for c in preset.columns]
            lines.append(f"| {_md(name)} | " + " | ".join(cells) + " |")
        lines.append("")
    reference = asdict(plan[0].config)
    base_text = _overrides_text(plan[0].config, asdict(RunConfig()))
    lines += [
        "## Settings",
        "",
        f"First setting ({plan[0].setting}), as RunConfig fields that differ from the defaults: {base_text}.",
        "",
        "| setting | differs from the first setting | the paper reports |",
        "|---|---|---|",
    ]
    shown = set()
    for p in plan:
        if p.setting in shown:
            continue
        shown.add(p.setting)
        lines.append(f"| {_md(p.setting)} | {_md(_overrides_text(p.config, reference))} | {_md(p.paper or '')} |")
    missing = [p for p in plan if p.path not in {q.path for q, _ in loaded}]
    if missing:
        failed = {q.label: why for q, why in (outcome.failed if outcome else [])}
        lines += ["", "## Runs missing from the table", ""]
        lines += [f"- {p.label}: {_md(failed.get(p.label, 'not run (yet)'))}" for p in missing]
    folder.mkdir(parents=True, exist_ok=True)
    report = folder / "results.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    compare.plot_runs(runs, folder / "accuracy.png")
    return report


# ------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fl-sparse reproduce`` arguments."""
    parser.description = (
        "Run one paper's comparison from its preset (settings x seeds in Flower's simulation engine), then write "
        "results.md (a markdown table, the command, the machine, the date) and accuracy.png in "
        "OUT/NAME[-full][-non-iid]/. "
        "Running the same command again skips finished runs and continues an interrupted one."
    )
    parser.add_argument("name", nargs="?", metavar="NAME",
                        help=f"the preset: {', '.join(preset_names())} (--list describes them)")
    parser.add_argument("--budget", choices=BUDGETS, default="small",
                        help="small: all five papers in about two hours on a 2-core CPU; full: the papers' own sizes")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds 0..N-1 per setting (default: the preset's, 3 for the papers)")
    parser.add_argument("--out", default="runs", help="parent folder of OUT/NAME[-full][-non-iid]/<setting>-seed<s>/")
    parser.add_argument("--non-iid", action="store_true",
                        help="the non-IID variant: Dirichlet alpha = 0.3 over 100 clients, 10 %% sampled per round")
    parser.add_argument("--only", default=None, metavar="SETTING[,SETTING...]", help="run only these settings")
    parser.add_argument("--dry-run", action="store_true", help="print the runs (and whether each is done) and stop")
    parser.add_argument("--list", action="store_true", help="list the presets and stop")
    parser.add_argument("--quiet", action="store_true", help="no per-round progress lines, only one line per run")
    parser.add_argument("--num-cpus", type=float, default=None, help="CPUs per client actor (default: RunConfig's)")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs per client actor, fractions allowed")


def _command(args: argparse.Namespace, seeds: int) -> str:
    parts = ["fl-sparse", "reproduce", args.name, "--budget", args.budget, "--seeds", str(seeds), "--out", args.out]
    if args.non_iid:
        parts.append("--non-iid")
    if args.only:
        parts += ["--only", args.only]
    for flag, value in (("--num-cpus", args.num_cpus), ("--num-gpus", args.num_gpus)):
        if value is not None:
            parts += [flag, f"{value:g}"]
    return shlex.join(parts)


def _list() -> int:
    for name in preset_names():
        preset = load_preset(name)
        small = len(preset.budgets.get("small", {}).get("settings", preset.settings))
        print(f"{name:20s} {preset.title} ({len(preset.settings)} settings, {small} at the small budget)")
    return 0


def _interrupt(signum, frame) -> None:
    from fl_sparse.server_app import stop_requested

    if stop_requested.is_set():
        raise KeyboardInterrupt
    stop_requested.set()
    _log("\nfl-sparse reproduce: stopping after this round (Ctrl-C again to stop at once); "
         "the same command continues later")


def run(args: argparse.Namespace, *, runner: Callable[[RunConfig], list[dict[str, Any]]] | None = None) -> int:
    """``fl-sparse reproduce``: 0 when every run is complete, 1 when one failed, 2 for bad arguments, 130 on Ctrl-C."""
    if args.list:
        return _list()
    if not args.name:
        _log(f"fl-sparse reproduce: error: give a preset NAME: {', '.join(preset_names())}")
        return 2
    overrides: dict[str, Any] = {"quiet": bool(args.quiet)}
    if args.num_cpus is not None:
        overrides["num_cpus"] = args.num_cpus
    if args.num_gpus is not None:
        overrides["num_gpus"] = args.num_gpus
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    try:
        preset = load_preset(args.name)
        plan = expand(preset, budget=args.budget, seeds=args.seeds, non_iid=args.non_iid, out=args.out,
                      only=only, overrides=overrides)
    except ValueError as exc:
        _log(f"fl-sparse reproduce: error: {exc}")
        return 2
    seeds = len({p.seed for p in plan})
    folder = results_dir(args.out, preset.name, budget=args.budget, non_iid=args.non_iid)
    command = _command(args, seeds)
    if args.dry_run:
        defaults = asdict(RunConfig())
        # Every other setting that differs from the defaults (threshold, error_feedback, t_hat, value_bits,
        # alpha, ...) is added to a line: without them two settings of a preset printed the same line.
        shown = {"strategy", "model", "clients", "fraction", "partition", "rounds", "local_steps", "batch_size",
                 "lr", "ratio", "seed"}
        print(f"{preset.title}: {len(plan)} runs into {folder}/ ({command})")
        for i, p in enumerate(plan, 1):
            c = p.config
            status, why = run_status(p)
            more = _overrides_text(c, {**defaults, **{k: getattr(c, k) for k in shown}})
            print(f"[{i}/{len(plan)}] {p.label:28s} {c.strategy:20s} {c.model} clients={c.clients} "
                  f"fraction={c.fraction:g} {c.partition} rounds={c.rounds} H={c.local_steps} B={c.batch_size} "
                  f"lr={c.effective_lr:g} ratio={c.ratio:.10g}" + ("" if more == "(the base)" else f" {more}")
                  + f"  [{status}{': ' + why if why else ''}]")
        return 0
    _log(f"fl-sparse reproduce: {preset.title}: {len(plan)} runs ({len(plan) // max(seeds, 1)} settings x "
         f"{seeds} seeds, {args.budget} budget{', non-IID' if args.non_iid else ''}) into {folder}/")
    stop_requested.clear()  # a request left by an earlier command in this process is not this one's
    previous = signal.signal(signal.SIGINT, _interrupt) if runner is None else None
    try:
        outcome = run_plan(plan, runner=runner)
    except KeyboardInterrupt:
        _log("fl-sparse reproduce: interrupted; the same command continues where it stopped")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    report = None
    try:
        report = write_report(folder, preset, plan, command=command, budget=args.budget, non_iid=args.non_iid,
                              outcome=outcome)
    except (OSError, ValueError) as exc:
        _log(f"fl-sparse reproduce: cannot write the report in {folder}: {exc}")
        outcome.failed.append((plan[0], f"report: {exc}"))
    done = len(outcome.complete)
    _log(f"fl-sparse reproduce: {done} of {len(plan)} runs complete ({len(outcome.ran)} run now, "
         f"{len(outcome.skipped)} already done), {len(outcome.failed)} failed"
         + (f"; report: {report} and {folder / 'accuracy.png'}" if report else "; no complete run to report"))
    for planned, why in outcome.failed:
        _log(f"  failed: {planned.label}: {why}")
    if outcome.interrupted is not None:
        return 130
    return 1 if outcome.failed or done < len(plan) else 0
