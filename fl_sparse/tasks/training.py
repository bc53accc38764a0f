"""Local SGD, evaluation, and the model <-> flat vector <-> ArrayRecord conversions.

The flat vector of a model is the concatenation, in ``state_dict`` order, of
every floating-point ``state_dict`` entry (weights, biases and float buffers
such as BatchNorm running statistics), each flattened and cast to float32.
Integer buffers (BatchNorm's ``num_batches_tracked``) are not part of it.
This is the same order as :class:`fl_sparse.flat.FlatLayout` over
``ArrayRecord(model.state_dict())``, which :func:`state_layout` returns, so a
vector taken from a model and one taken from the record it was sent as are
identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Union

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord
from torch import nn

from fl_sparse.flat import FlatLayout

__all__ = [
    "BatchSource",
    "PlainSGD",
    "arrayrecord_to_vector",
    "evaluate",
    "load_arrayrecord_",
    "local_sgd",
    "model_to_arrayrecord",
    "model_to_vector",
    "state_layout",
    "vector_to_arrayrecord",
    "vector_to_model_",
]

# ``h -> indices of minibatch h`` (e.g. ``BatchStream.window(start)``), or an
# iterable of index tensors, one per step.
BatchSource = Union[Callable[[int], torch.Tensor], Iterable[torch.Tensor]]


# ------------------------------------------------------------ training


class PlainSGD:
    """``torch.optim.SGD``'s update (no dampening, no Nesterov), without ``torch.optim``.

    Why: the first ``torch.optim.SGD(...)`` in a process imports
    ``torch._dynamo`` (about 1.4 s). Under ``flwr run`` every message is a new
    ClientApp process, so that import was paid on every round by every client,
    more than the H local steps themselves. The update is torch's
    single-tensor path, op for op (``tests/tasks/test_training.py`` checks it
    bit for bit against ``torch.optim.SGD``)::

        g = ∇ + weight_decay · p
        b = g (first step),  b = momentum · b + g (later)     [momentum > 0]
        p = p − lr · (b if momentum > 0 else g)
    """

    def __init__(self, params: list[torch.Tensor], *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        self.params = params
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.buffers: list[torch.Tensor | None] = [None] * len(params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            if self.weight_decay != 0:
                g = g.add(p, alpha=self.weight_decay)
            if self.momentum != 0:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = torch.clone(g).detach()
                else:
                    buf.mul_(self.momentum).add_(g)
                g = buf
            p.add_(g, alpha=-self.lr)


def local_sgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batches: BatchSource,
    steps: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    device: str | torch.device = "cpu",
    *,
    seed: int | None = None,
) -> dict[str, float | int]:
    """``steps`` minibatch SGD steps (:class:`PlainSGD`, ``torch.optim.SGD``'s update) on cross-entropy loss.

    ``batches`` gives the indices into ``images``/``labels`` of each step's
    minibatch: a callable ``h -> Tensor`` for ``h = 0 .. steps-1`` (e.g.
    :meth:`BatchStream.window`) or an iterable yielding at least ``steps``
    index tensors. The optimizer is created fresh for this call, so the
    momentum buffer starts at zero (one call = one round of H local steps).

    The model is moved to ``device`` and left in training mode. Dropout draws
    from the global torch RNG unless ``seed`` is given, in which case it draws
    from a private RNG state seeded with it (the global state is restored), so
    the call is a pure function of its inputs on CPU (for a fixed number of
    torch threads).

    Returns ``train_loss`` (mean per-example loss over the processed
    minibatches, measured before each step's update), ``num_examples``
    (examples processed, counting repeats) and ``num_steps``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if lr < 0 or momentum < 0 or weight_decay < 0:
        raise ValueError(
            f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    device = torch.device(device)
    if any(p.device != device for p in model.parameters()):
        model.to(device)  # skipped when already there: Module.to walks every submodule
    model.train()
    optimizer = PlainSGD(list(model.parameters()), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if callable(batches):
        get = batches
    else:
        iterator = iter(batches)

        def get(h: int) -> torch.Tensor:
            try:
                return next(iterator)
            except StopIteration:
                raise ValueError(f"batches ran out after {h} of {steps} steps") from None

    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    total_examples = 0

    def run() -> None:
        nonlocal total_loss, total_examples
        for h in range(steps):
            idx = torch.as_tensor(get(h), dtype=torch.int64)
            if idx.numel() == 0:
                raise ValueError(f"minibatch {h} is empty")
            x = images[idx].to(device, non_blocking=True)
            y = labels[idx].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach().double() * y.shape[0]
            total_examples += int(y.shape[0])

    if seed is None:
        run()
    else:
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if device.type == "cuda":
                torch.manual_seed(int(seed))
            else:
                # Same CPU stream as torch.manual_seed, without its lazy seeding of
                # CUDA/XPU/MTIA (each records a stack trace: ~0.5 ms per call).
                torch.default_generator.manual_seed(int(seed))
            run()
    mean = float(total_loss.item()) / total_examples if total_examples else float("nan")
    return {"train_loss": mean, "num_examples": total_examples, "num_steps": steps}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """``(mean cross-entropy loss, accuracy)`` over all examples, in eval mode.

    The model's train/eval mode is restored afterwards.
    """
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    n = int(labels.shape[0])
    if n == 0:
        raise ValueError("cannot evaluate on zero examples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    was_training = model.training
    model.to(device)
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    try:
        for start in range(0, n, batch_size):
            x = images[start : start + batch_size].to(device, non_blocking=True)
            y = labels[start : start + batch_size].to(device, non_blocking=True)
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(dim=1) == y).sum()
    finally:
        model.train(was_training)
    return float(loss_sum.item()) / n, float(correct.item()) / n


# -------------------------------------------------------- flat vectors


def _float_entries(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in model.state_dict().items() if v.is_floating_point()]


def state_layout(model: nn.Module) -> FlatLayout:
    """The :class:`~fl_sparse.flat.FlatLayout` of ``model``'s state_dict.

    Equal to ``FlatLayout.from_state_dict(model.state_dict())`` but without
    serializing the weights; integer buffers (with their current values) are
    its pass-through arrays.
    """
    names, shapes, dtypes, passthrough = [], [], [], []
    state = model.state_dict()
    for k, v in state.items():
        if v.is_floating_point():
            names.append(k)
            shapes.append(tuple(v.shape))
            dtypes.append(str(torch.empty(0, dtype=v.dtype).numpy().dtype))
        else:
            passthrough.append((k, v.detach().cpu().numpy().copy()))
    if not names:
        raise ValueError("the model has no floating-point state")
    return FlatLayout(tuple(names), tuple(shapes), tuple(dtypes), tuple(passthrough), tuple(state))


def model_to_vector(model: nn.Module) -> torch.Tensor:
    """A new float32 1-D tensor: every floating-point state_dict entry, in order."""
    parts = [v.detach().reshape(-1).to(torch.float32) for _, v in _float_entries(model)]
    if not parts:
        raise ValueError("the model has no floating-point state")
    return torch.cat(parts)


@torch.no_grad()
def vector_to_model_(model: nn.Module, vec: torch.Tensor) -> nn.Module:
    """Write ``vec`` (as laid out by :func:`model_to_vector`) into ``model`` in place.

    Parameters and float buffers keep their tensors (optimizers and hooks stay
    valid); integer buffers are untouched. Returns ``model``.
    """
    entries = _float_entries(model)
    total = sum(v.numel() for _, v in entries)
    if vec.dim() != 1 or vec.numel() != total:
        raise ValueError(
            f"vector has shape {tuple(vec.shape)}, the model needs ({total},)"
        )
    if not vec.is_floating_point():
        raise ValueError(f"vector must be floating point, got {vec.dtype}")
    offset = 0
    for _, v in entries:  # state_dict tensors share storage with the module's
        n = v.numel()
        v.copy_(vec[offset : offset + n].view(v.shape))
        offset += n
    return model


def model_to_arrayrecord(model: nn.Module) -> ArrayRecord:
    """``ArrayRecord(model.state_dict())`` (all entries, integer buffers included)."""
    return ArrayRecord(model.state_dict())


def load_arrayrecord_(model: nn.Module, record: ArrayRecord, *, strict: bool = True) -> nn.Module:
    """Load a record made by :func:`model_to_arrayrecord` into ``model`` in place."""
    state = record.to_torch_state_dict()
    model.load_state_dict(state, strict=strict)
    return model


def arrayrecord_to_vector(record: ArrayRecord, layout: FlatLayout | None = None) -> torch.Tensor:
    """The flat float32 vector of ``record`` (its floating-point arrays in record order).

    With ``layout`` the record is validated against it (names and shapes).
    For ``ArrayRecord(model.state_dict())`` this equals ``model_to_vector(model)``.
    """
    if layout is None:
        layout = FlatLayout.from_arrayrecord(record)
    return layout.flatten(record)


def vector_to_arrayrecord(vec: torch.Tensor, layout: FlatLayout | nn.Module) -> ArrayRecord:
    """An ArrayRecord with ``layout``'s arrays filled from ``vec``.

    ``layout`` may be a model (its :func:`state_layout` is used, so integer
    buffers carry the model's current values).
    """
    if isinstance(layout, nn.Module):
        layout = state_layout(layout)
    return layout.unflatten(vec)
