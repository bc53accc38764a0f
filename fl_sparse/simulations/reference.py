"""The seed papers' algorithms as one plain loop, without Flower.

This is the yardstick for the Flower strategies: with H = 1, full
participation and the same seed, :func:`reference_run` and
``fl-sparse simulate`` must end on the same parameters (tests check 1e-6),
and the speed benchmark measures Flower's overhead against it.

Per round t (Algorithms 1 and 2 of the bidirectional top-K paper, H local
steps, weights p_q = n_q / Σ n)::

    for every worker q:
        Δ_q = w − SGD_H(w)          same minibatches as the Flower client
        a_q = e_q + Δ_q;  s_q = C(a_q);  e_q = a_q − s_q
    g = Σ_q p_q s_q
    bidirectional:  g = g + δ;  ĝ = Top_K(g);  δ = g − ĝ    else ĝ = g
    w = w − ĝ
"""

from __future__ import annotations

import json

import torch

from fl_sparse.clients.app import client_generator_seed, takes_generator
from fl_sparse.tasks.builtin import TaskSpec, get_task
from fl_sparse.compressors import TopK, build_compressor
from fl_sparse.server_app import RunConfig, _initial_model
from fl_sparse.tasks import data as data_lib
from fl_sparse.tasks import training
from fl_sparse.flat import FlatLayout

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
        get_task(
            TaskSpec(cfg.dataset, cfg.model, cfg.partition, cfg.alpha, cfg.clients, q, cfg.seed)
        )
        for q in range(cfg.clients)
    ]
    total = sum(t.num_examples for t in tasks)
    p = [t.num_examples / total for t in tasks]
    errors = [torch.zeros_like(w) for _ in tasks]
    server_error = torch.zeros_like(w)
    spec = _uplink_spec(cfg, cfg.clients)
    compressor = build_compressor(**json.loads(json.dumps(spec)))
    downlink = TopK(ratio=cfg.downlink_ratio or cfg.ratio) if cfg.strategy == "bidirectional-topk" else None

    for t in range(1, cfg.rounds + 1):
        g = torch.zeros_like(w)
        for q, task in enumerate(tasks):
            task.model.load_state_dict(layout.to_state_dict(w.clone()), strict=True)
            start = (t - 1) * cfg.local_steps
            training.local_sgd(
                task.model,
                task.images,
                task.labels,
                lambda h, n=task.num_examples, q=q: data_lib.batch_indices(n, cfg.batch_size, cfg.seed, q, start + h),
                steps=cfg.local_steps,
                lr=cfg.lr,
                momentum=cfg.momentum,
                weight_decay=cfg.weight_decay,
                device=torch.device("cpu"),
                seed=client_generator_seed(cfg.seed, start, q),
            )
            step = w - layout.flatten_state_dict(task.model.state_dict())
            a = errors[q] + step
            if takes_generator(compressor):
                gen = torch.Generator().manual_seed(client_generator_seed(cfg.seed, t, q))
                s = compressor(a, generator=gen).to_dense()
            else:
                s = compressor(a).to_dense()
            errors[q] = a - s
            g += p[q] * s
        if downlink is not None:
            g = g + server_error
            sent = downlink(g).to_dense()
            server_error = g - sent
        else:
            sent = g
        w = w - sent
    return w
