"""The seed papers' algorithms as one plain loop, without Flower.

This is the yardstick for the Flower strategies: with H = 1, full
participation and the same seed, :func:`reference_run` and
``fl-sparse simulate`` must end on the same parameters (tests check 1e-6),
and the speed benchmark measures Flower's overhead against it. The per-round
math is the same code the client mod and the strategies run
(:mod:`fl_sparse.algorithms`); only the messaging is left out.

Per round t (Algorithms 1 and 2 of the bidirectional top-K paper, H local
steps, weights p_q = n_q / Σ n)::

    for every worker q:
        Δ_q = w − SGD_H(w)          same minibatches as the built-in client
        a_q = e_q + Δ_q;  s_q = C(a_q);  e_q = a_q − s_q
    g = Σ_q p_q s_q
    bidirectional:  g = g + δ;  ĝ = Top_K(g);  δ = g − ĝ    else ĝ = g
    w = w − ĝ
"""

from __future__ import annotations

import torch

from fl_sparse import algorithms
from fl_sparse.clients.app import local_training
from fl_sparse.clients.mod import client_generator_seed
from fl_sparse.compressors import TopK, build_compressor
from fl_sparse.flat import FlatLayout
from fl_sparse.memory import ErrorFeedback
from fl_sparse.server_app import RunConfig, _initial_model, _train_config
from fl_sparse.tasks.builtin import TaskSpec, get_task

__all__ = ["reference_run"]


def _uplink_spec(cfg: RunConfig, num_clients: int) -> dict:
    if cfg.strategy in ("topk", "bidirectional-topk"):
        return {"name": "topk", "ratio": cfg.ratio}
    if cfg.strategy == "rtopk":
        return {"name": "rtopk", "ratio": cfg.ratio, "n_workers": num_clients}
    if cfg.strategy == "hard-threshold":
        return {"name": "hard-threshold", "lam": cfg.threshold}
    if cfg.strategy == "fedavg":
        return {"name": "none"}
    raise ValueError(f"no reference loop for strategy {cfg.strategy!r}")


def reference_run(cfg: RunConfig) -> torch.Tensor:
    """Final flat parameters of ``cfg`` run as a plain loop (full participation only)."""
    cfg.validate()
    if cfg.fraction != 1.0:
        raise ValueError("the reference loop assumes full participation (fraction = 1)")
    model = _initial_model(cfg)
    layout = FlatLayout.from_state_dict(model.state_dict())
    w = layout.flatten_state_dict(model.state_dict()).clone()
    tasks = [
        get_task(TaskSpec(cfg.dataset, cfg.model, cfg.partition, cfg.alpha, cfg.clients, q, cfg.seed))
        for q in range(cfg.clients)
    ]
    total = sum(t.num_examples for t in tasks)
    p = [t.num_examples / total for t in tasks]
    memories = [ErrorFeedback(w.numel()) for _ in tasks]
    server_memory = ErrorFeedback(w.numel())
    compressor = build_compressor(**_uplink_spec(cfg, cfg.clients))
    downlink = TopK(ratio=cfg.downlink_ratio or cfg.ratio) if cfg.strategy == "bidirectional-topk" else None
    config = _train_config(cfg)
    device = torch.device("cpu")

    for t in range(1, cfg.rounds + 1):
        sent = []
        for q, task in enumerate(tasks):
            task.model_at(w, device)
            local_training(task, config, t, device)
            step = w - task.model_vector(device)
            gen = torch.Generator().manual_seed(client_generator_seed(cfg.seed, t, q))
            sent.append(algorithms.client_compress(step, memories[q], lambda a: compressor(a, generator=gen)).sent)
        g = algorithms.weighted_sum(sent, p)
        w = w - algorithms.server_compress(g, server_memory, downlink).to_dense()
    return w
