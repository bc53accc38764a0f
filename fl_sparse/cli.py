"""``fl-sparse`` command line: ``simulate`` a run, ``compare`` run folders, ``reproduce`` a paper.

``fl-sparse simulate --strategy bidirectional-topk ... --out DIR`` runs one
experiment and writes its run folder; ``fl-sparse compare DIR... [--plot
FILE.png] [--markdown]`` prints one table of several (see
:mod:`fl_sparse.simulations.compare`); ``fl-sparse reproduce NAME`` runs a
paper's comparison (:mod:`fl_sparse.simulations.reproduce`).

``fl-sparse simulate --resume DIR [--rounds T]`` continues the run checkpointed
in ``DIR`` (a run with ``--out DIR``) with its own settings; only ``--rounds``
and how it runs (``--eval-every``, ``--checkpoint-every``,
``--max-failed-rounds``, ``--num-cpus``, ``--num-gpus``, ``--quiet``, ``--ray-address``) may be given.

``--ray-address HOST:PORT`` (or ``RAY_ADDRESS``) runs the clients on an existing
Ray cluster (docs/ray-cluster.md).
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import fields

from fl_sparse.server_app import RunConfig
from fl_sparse.strategies import STRATEGY_NAMES

__all__ = ["main", "build_parser"]

DATASETS = ("fashion-mnist", "mnist", "cifar10")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None (the help text says what an unset option means) and on/off flags."""

    def _get_help_string(self, action):
        if action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def _lr_help() -> str:
    from fl_sparse.server_app import MODEL_LR

    per_model = ", ".join(f"{m} {lr:g}" for m, lr in MODEL_LR.items())
    return f"local SGD learning rate (default: the model's own: {per_model})"


def _add_reproduce(sub) -> None:
    """``fl-sparse reproduce``, when :mod:`fl_sparse.simulations.reproduce` is there to run it."""
    try:
        from fl_sparse.simulations import reproduce
    except ImportError as exc:
        problem = str(exc)
        rep = sub.add_parser("reproduce", help="run a paper's comparison (unavailable: see its --help)",
                             description=f"unavailable: {problem}")
        rep.add_argument("rest", nargs=argparse.REMAINDER)
        rep.set_defaults(_reproduce_unavailable=problem)
        return
    rep = sub.add_parser(
        "reproduce",
        help="run one paper's comparison from its preset: runs, plots and a markdown table",
        formatter_class=_HelpFormatter,
    )
    reproduce.add_arguments(rep)


def build_parser(*, _explicit_only: bool = False) -> argparse.ArgumentParser:
    """The ``fl-sparse`` parser (``_explicit_only``: flags left out are absent from the result)."""
    from fl_sparse.tasks.models import MODEL_NAMES

    d = RunConfig()
    parser = argparse.ArgumentParser(prog="fl-sparse", description="Communication-efficient federated learning on Flower.")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser(
        "simulate",
        help="run a federated experiment in Flower's Ray simulation engine",
        formatter_class=_HelpFormatter,
    )
    sim.add_argument("--strategy", choices=STRATEGY_NAMES, default=d.strategy, help="sparsification method")
    sim.add_argument("--dataset", choices=DATASETS, default=d.dataset, help="training data (Fashion-MNIST is read offline)")
    sim.add_argument("--model", choices=MODEL_NAMES, default=d.model, help="network (the seed papers' MLPs/CNNs, ResNet-18, VGG-19)")
    sim.add_argument("--clients", type=int, default=d.clients, help="number of clients (virtual SuperNodes)")
    sim.add_argument("--fraction", type=float, default=d.fraction, help="fraction of clients sampled per round")
    sim.add_argument("--partition", choices=("iid", "dirichlet", "shards"), default=d.partition, help="how data is split (flwr-datasets partitioners)")
    sim.add_argument("--alpha", type=float, default=d.alpha, help="Dirichlet concentration")
    sim.add_argument("--min-partition-size", type=int, default=d.min_partition_size,
                     help="Dirichlet: every client gets at least this many examples (flwr-datasets' option; "
                          "unset: 10 when the data allows, less for thousands of clients)")
    sim.add_argument("--self-balancing", action="store_true",
                     help="Dirichlet: flwr-datasets' self-balancing (stop filling clients above the mean size)")
    sim.add_argument("--rounds", type=int, default=d.rounds, help="communication rounds T")
    sim.add_argument("--local-steps", type=int, default=d.local_steps, help="H: local SGD steps per round")
    sim.add_argument("--batch-size", type=int, default=d.batch_size, help="minibatch size of local SGD")
    sim.add_argument("--lr", type=float, default=d.lr, help=_lr_help())
    sim.add_argument("--momentum", type=float, default=d.momentum, help="local SGD momentum (reset every round)")
    sim.add_argument("--weight-decay", type=float, default=d.weight_decay, help="local SGD weight decay")
    sim.add_argument("--ratio", type=float, default=d.ratio, help="uplink k/d")
    sim.add_argument("--downlink-ratio", type=float, default=None, help="downlink k/d of bidirectional-topk only (None: same as --ratio)")
    sim.add_argument("--threshold", type=float, default=None, help="lambda of hard-threshold only, in gradient units: a client sends the entries with "
                     "|error + update| >= lr * lambda (None: the paper's 1/(2 sqrt(k)) with k = ratio * d)")
    sim.add_argument("--value-bits", type=int, default=d.value_bits, help="q-bit value quantization; 32 = none")
    sim.add_argument("--add-drop-ratio", type=float, default=d.add_drop_ratio, help="phi_ad of ssgd-mv-ad only")
    sim.add_argument("--positions", choices=("raw", "block", "rice"), default=d.positions,
                     help="position code: raw int32, the majority-voting (SSGD-MV) paper's block code, "
                          "or Golomb-Rice (smallest)")
    sim.add_argument("--no-error-feedback", dest="error_feedback", action="store_false", default=d.error_feedback,
                     help="plain sparsification: clients keep no error memory (without the flag they do)")
    sim.add_argument("--error-memory-dtype", choices=("float32", "float16", "bfloat16"), default=d.error_memory_dtype,
                     help="dtype clients store their error memory in between rounds (computed in float32; "
                          "float16 clamps entries beyond +-65504)")
    sim.add_argument("--r-ratio", type=float, default=d.r_ratio,
                     help="rtopk: r/d, the top-r set the k entries are drawn from (None: the paper's rule)")
    sim.add_argument("--t-hat", type=int, default=d.t_hat,
                     help="adaptive-topk: the turning point t_hat (0-based round): k_t = (1+gamma)k before t_hat/2 and "
                          "from (t_hat+rounds)/2 on, (1-gamma)k between (None: estimated after round 1)")
    sim.add_argument("--seed", type=int, default=d.seed, help="seeds model init, data split and order, sampling")
    sim.add_argument("--out", default=None, metavar="DIR",
                     help="run folder: DIR/config.json, DIR/metrics.jsonl and DIR/metrics.csv (a line per round), "
                          "DIR/metrics.json and DIR/model.pt at the end, the checkpoint DIR/checkpoint.pt; "
                          "clients keep their state in DIR/client-state; a DIR that holds a run is refused (--resume DIR)")
    sim.add_argument("--diagnostics", action="store_true", help="estimate rho and rho-hat each round")
    sim.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate every N rounds")
    sim.add_argument("--num-cpus", type=float, default=d.num_cpus, help="CPUs per client actor")
    sim.add_argument("--num-gpus", type=float, default=d.num_gpus, help="GPUs per client actor (fractional ok)")
    sim.add_argument("--state-dir", default=None, help="client state folder (None: DIR/client-state with --out, else a temporary one, removed after the run)")
    sim.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                     help="join the Ray cluster at this address (as RAY_ADDRESS, which it overrides; unset: "
                          "$RAY_ADDRESS, else a local Ray); a cluster of several nodes needs --state-dir on a "
                          "filesystem every node mounts (docs/ray-cluster.md)")
    sim.add_argument("--max-failed-rounds", type=int, default=d.max_failed_rounds, help="stop after this many rounds in a row that accepted no client update")
    sim.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                     help="with --out: save DIR/checkpoint.pt every N rounds (also at the end and at a stop; 0: only then)")
    sim.add_argument("--resume", default=None, metavar="DIR",
                     help="continue the run saved in DIR (its own settings; --rounds T may raise the last round)")
    sim.add_argument("--quiet", action="store_true", help="no progress lines")
    if _explicit_only:
        for action in sim._actions:  # not set_defaults: it would store SUPPRESS as a parser-level default
            action.default = argparse.SUPPRESS

    from fl_sparse.simulations import compare

    cmp = sub.add_parser(
        "compare",
        help="one table (and a plot) of run folders; seeds of one setting as mean ± std",
        description="Compare run folders written by fl-sparse simulate --out DIR.",
    )
    compare.add_arguments(cmp)
    _add_reproduce(sub)
    return parser


def _interrupt(signum, frame) -> None:
    """First Ctrl-C: finish the round in progress, save, stop. A second one: stop now."""
    from fl_sparse.server_app import stop_requested

    if stop_requested.is_set():
        raise KeyboardInterrupt
    stop_requested.set()
    print("\nfl-sparse: stopping after this round (Ctrl-C again to stop at once)...", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "compare":
        from fl_sparse.simulations import compare

        return compare.run(args)
    if args.command == "reproduce":
        problem = getattr(args, "_reproduce_unavailable", None)
        if problem is not None:
            print(f"fl-sparse reproduce: unavailable: {problem}", file=sys.stderr)
            return 2
        from fl_sparse.simulations import reproduce

        return int(reproduce.run(args))
    if args.command == "simulate":
        from fl_sparse.simulations.runner import RayClusterError, simulate

        from fl_sparse.server_app import RunFailed, RunInterrupted, preflight

        from fl_sparse.server_app import resume_config

        names = {f.name for f in fields(RunConfig)}
        try:
            if args.resume is not None:
                given = vars(build_parser(_explicit_only=True).parse_args(argv))
                overrides = {k: v for k, v in given.items() if k in names and k != "resume"}
                cfg = resume_config(args.resume, **overrides)
            else:
                cfg = RunConfig(**{k: v for k, v in vars(args).items() if k in names})
                given = vars(build_parser(_explicit_only=True).parse_args(argv))
                if "add_drop_ratio" in given and cfg.strategy != "ssgd-mv-ad":  # its default is a number: seen here only
                    raise ValueError("add-drop-ratio is ssgd-mv-ad's phi_ad; leave it out for other strategies")
            split = preflight(cfg)  # everything checkable, before Ray starts
        except ValueError as exc:
            print(f"fl-sparse simulate: error: {exc}", file=sys.stderr)
            return 2
        if not cfg.quiet:
            print(
                f"fl-sparse: {cfg.strategy} on {cfg.dataset} ({cfg.model}), {cfg.clients} clients "
                f"({cfg.partition}), {cfg.rounds} rounds of H={cfg.local_steps}, lr {cfg.effective_lr:g}, "
                f"ratio {cfg.ratio}, {cfg.positions} positions"
                + (f", continuing the run in {cfg.resume}" if cfg.resume else "")
                + "; starting Flower's simulation engine...",
                file=sys.stderr,
                flush=True,
            )
            print(f"fl-sparse: data: {split}", file=sys.stderr, flush=True)
        from fl_sparse.server_app import stop_requested

        stop_requested.clear()  # a request left by an earlier command in this process is not this run's
        previous = signal.signal(signal.SIGINT, _interrupt)
        try:
            rows = simulate(cfg)
        except RunInterrupted as exc:
            saved = f"; metrics, model and checkpoint saved in {cfg.out} (continue: fl-sparse simulate --resume {cfg.out})"
            print(f"fl-sparse simulate: {exc}" + (saved if cfg.out else ""), file=sys.stderr)
            return 130
        except RayClusterError as exc:  # before training: unreachable, too small, no shared state folder
            print(f"fl-sparse simulate: error: {exc}", file=sys.stderr)
            return 2
        except RunFailed as exc:
            print(f"fl-sparse simulate: failed: {exc}", file=sys.stderr)
            if cfg.out:
                print(f"metrics so far: {cfg.out}/metrics.jsonl", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("fl-sparse simulate: interrupted", file=sys.stderr)
            return 130
        finally:
            signal.signal(signal.SIGINT, previous)
        last = rows[-1]
        acc = last.get("test_accuracy")
        print(
            f"done: {len(rows)} rounds, final test accuracy "
            f"{acc:.4f}" if isinstance(acc, float) else f"done: {len(rows)} rounds",
        )
        if cfg.out:
            print(f"run folder: {cfg.out} (config.json, metrics.jsonl, metrics.csv, metrics.json, model.pt); "
                  f"compare runs: fl-sparse compare {cfg.out} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
