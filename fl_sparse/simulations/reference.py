"""The seed papers' algorithms as one plain loop, without Flower.

This is the yardstick for the Flower strategies: with H = 1 and the same
seed, :func:`reference_run` and ``fl-sparse simulate`` must end on the same
parameters (tests check 1e-6) -- also with partial participation, unequal
(Dirichlet) partitions and q-bit values both ways -- and the speed benchmark
measures Flower's overhead against it. The per-round math is the same code
the client mod and the strategies run (:mod:`fl_sparse.algorithms`); only the
messaging (and with it the model sync) is left out.

Per round t (Algorithms 1 and 2 of the bidirectional top-K paper, H local
steps, weights p_q = n_q / Σ_{S_t} n)::

    S_t = the strategies' seeded sample of the clients (fraction of them)
    for every worker q in S_t (the others keep their error e_q):
        Δ_q = w − SGD_H(w)          same minibatches as the built-in client
        a_q = e_q + Δ_q;  s_q = Q(C(a_q));  e_q = a_q − s_q
    g = Σ_q p_q s_q
    bidirectional:  g = g + δ;  ĝ = Q(Top_K(g));  δ = g − ĝ    else ĝ = Q(g)
    w = w − ĝ

Without error feedback (``error_feedback=False``) e_q and δ stay 0: what
was not sent is dropped.

Local training runs on the intra-op threads a simulated client gets (Ray gives
an actor ``OMP_NUM_THREADS = max(floor(num_cpus), 1)`` unless the variable is
set): on some CPUs torch's float results depend on the thread count, and one
flipped near-tie in a top-r selection moves the model by far more than 1e-6.
"""

from __future__ import annotations

import fnmatch
import math
import os
import random

import torch

from fl_sparse import algorithms, codec
from fl_sparse.clients.app import local_training
from fl_sparse.clients.mod import client_generator_seed
from fl_sparse.compressors import TopK, build_compressor, hard_threshold_for_topk, torch_threads
from fl_sparse.flat import FlatLayout
from fl_sparse.memory import ErrorFeedback
from fl_sparse.server_app import RunConfig, _initial_model, _train_config
from fl_sparse.strategies.base import RUNNING_STATS
from fl_sparse.tasks.builtin import TaskSpec, get_task

__all__ = ["reference_run"]


def _uplink_spec(cfg: RunConfig, num_clients: int, numel: int) -> dict:
    if cfg.strategy in ("topk", "bidirectional-topk"):
        return {"name": "topk", "ratio": cfg.ratio}
    if cfg.strategy == "rtopk":
        return {"name": "rtopk", "ratio": cfg.ratio, "n_workers": num_clients}
    if cfg.strategy == "hard-threshold":
        lam = cfg.threshold if cfg.threshold is not None else hard_threshold_for_topk(TopK(ratio=cfg.ratio).k_for(numel))
        return {"name": "hard-threshold", "lam": lam * cfg.effective_lr}  # λ on a/γ: |a| ≥ γλ
    if cfg.strategy == "fedavg":
        return {"name": "none"}
    raise ValueError(f"no reference loop for strategy {cfg.strategy!r}")


def sample(seed: int, server_round: int, clients: int, fraction: float) -> list[int]:
    """The partitions the strategies sample in a round (:meth:`SparseFedAvg.sample`, nodes ordered by partition)."""
    size = min(max(int(clients * fraction), 1), clients)
    return sorted(random.Random(seed * 1_000_003 + server_round).sample(range(clients), size))


def client_threads(num_cpus: float) -> int:
    """Torch's intra-op threads in a simulated client: what Ray's worker sets ``OMP_NUM_THREADS`` to for an actor
    of ``num_cpus`` CPUs, or this process's count when the variable is set (Ray then leaves it alone)."""
    return torch.get_num_threads() if "OMP_NUM_THREADS" in os.environ else max(math.floor(num_cpus), 1)


def reference_run(cfg: RunConfig) -> torch.Tensor:
    """Final flat parameters of ``cfg`` run as a plain loop (clients' training on :func:`client_threads`)."""
    cfg.validate()
    with torch_threads(client_threads(cfg.num_cpus)):
        return _reference_loop(cfg)


def _reference_loop(cfg: RunConfig) -> torch.Tensor:
    model = _initial_model(cfg)
    layout = FlatLayout.from_state_dict(model.state_dict())
    w = layout.flatten_state_dict(model.state_dict()).clone()
    # As the strategies (exact_running_stats=True): BatchNorm's running statistics are not compressed
    # but averaged exactly with the weights p_q; the sparsifiers (and their k, r, lambda) see the rest.
    exact = torch.zeros(w.numel(), dtype=torch.bool)
    for name, start, end in layout.spans():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in RUNNING_STATS):
            exact[start:end] = True
    sparse_at, exact_at = torch.nonzero(~exact).flatten(), torch.nonzero(exact).flatten()
    if cfg.error_memory_dtype != "float32":
        raise ValueError(f"no reference loop for error_memory_dtype {cfg.error_memory_dtype!r} (float32 only)")
    config = _train_config(cfg)
    tasks = [get_task(TaskSpec.from_config(config, q, cfg.clients)) for q in range(cfg.clients)]  # as the clients
    d = sparse_at.numel()
    memories = [ErrorFeedback(d) for _ in tasks]
    server_memory = ErrorFeedback(d)
    downlink = TopK(ratio=cfg.downlink_ratio or cfg.ratio) if cfg.strategy == "bidirectional-topk" else None
    device = torch.device("cpu")
    # As build_strategy: dense FedAvg is the uncompressed baseline, whatever value_bits says.
    values = "fp32" if cfg.value_bits >= 32 or cfg.strategy == "fedavg" else f"q{int(cfg.value_bits)}"

    def quantize(sparse):
        return codec.lossy_roundtrip(sparse, values=values)

    for t in range(1, cfg.rounds + 1):
        chosen = sample(cfg.seed, t, cfg.clients, cfg.fraction)
        compressor = build_compressor(**_uplink_spec(cfg, len(chosen), d))
        sent, exact_after = [], []
        for q in chosen:
            task = tasks[q]
            task.model_at(w, device)
            local_training(task, config, t, device)
            trained = task.model_vector(device)
            step = (w - trained)[sparse_at]
            exact_after.append(trained[exact_at])
            gen = torch.Generator().manual_seed(client_generator_seed(cfg.seed, t, q))
            compress = lambda a, gen=gen: compressor(a, generator=gen)  # noqa: E731
            memory = memories[q] if cfg.error_feedback else ErrorFeedback(d)  # else e_q = 0 every round
            sent.append(algorithms.client_compress(step, memory, compress, quantize).sent)
        total = sum(tasks[q].num_examples for q in chosen)
        p = [tasks[q].num_examples / total for q in chosen]
        g = algorithms.weighted_sum(sent, p)
        server = server_memory if cfg.error_feedback else ErrorFeedback(d)
        w = w.clone()
        w[sparse_at] -= quantize(algorithms.server_compress(g, server, downlink, quantize)).to_dense()
        if exact_at.numel():
            w[exact_at] = sum(pq * e.to(torch.float64) for pq, e in zip(p, exact_after)).to(torch.float32)
    return w

