"""The seed papers' methods as small subclasses of :class:`SparseFedAvg`.

* :class:`TopKSGD` – unidirectional top-K SGD (bidirectional paper, Algorithm 1).
* :class:`BidirectionalTopKSGD` – Algorithm 2: the server keeps δ and sends Top_K(g + δ).
* :class:`RTopKSGD` – rTop-k: top-r then a uniformly random k of them, k/r = 1/n.
* :class:`RandomKSGD` – random-k: a uniformly random k of the d entries (the rTop-k paper's baseline).
* :class:`HardThresholdSGD` – send every entry with |a| ≥ γλ (λ on a/γ, in gradient units).
* :class:`AdaptiveTopKSGD` – AdapTop-K: k_t varies per round under a fixed total budget.
"""

from __future__ import annotations

import math
from logging import WARNING
from typing import Any

from flwr.common.logger import log

from fl_sparse.compressors import TopK, adaptive_k_budgeted, adaptive_k_t_hat, hard_threshold_for_topk
from fl_sparse.strategies.arguments import count_argument, flag_argument, is_number, positive_argument, ratio_argument
from fl_sparse.strategies.base import SparseFedAvg, with_fedavg_signature

__all__ = [
    "DenseFedAvg",
    "TopKSGD",
    "BidirectionalTopKSGD",
    "RTopKSGD",
    "RandomKSGD",
    "HardThresholdSGD",
    "AdaptiveTopKSGD",
]


def _budget(ratio: float | None, k: int | None) -> dict[str, Any]:
    if (ratio is None) == (k is None):
        raise ValueError("give exactly one of ratio or k")
    return {"ratio": ratio_argument("ratio", ratio)} if ratio is not None else {"k": count_argument("k", k)}


@with_fedavg_signature
class DenseFedAvg(SparseFedAvg):
    """Uncompressed baseline: clients send their whole update, the server the whole aggregate.

    Runs through the same client and wire path as the sparse strategies, so
    per-round costs compare like with like.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, uplink={"name": "none"}, downlink=None, **kwargs)


@with_fedavg_signature
class TopKSGD(SparseFedAvg):
    """Unidirectional top-K SGD (Algorithm 1 of the bidirectional paper).

    Worker q: a_q = ε_q + α g_q; ε_q ← a_q − Top_K(a_q); send Top_K(a_q).
    Server:   g_t = Σ_q p_q Top_K(a_q); send g_t (a union of supports) to all.
    """

    def __init__(self, *args: Any, ratio: float | None = 0.001, k: int | None = None, **kwargs: Any) -> None:
        if k is not None:
            ratio = None
        super().__init__(*args, uplink={"name": "topk", **_budget(ratio, k)}, downlink=None, **kwargs)


@with_fedavg_signature
class BidirectionalTopKSGD(SparseFedAvg):
    """Bidirectional top-K SGD (Algorithm 2 of the bidirectional paper).

    Server: g_t = Σ_q p_q Top_K(a_q) + δ_{t−1};  δ_t = g_t − Top_K(g_t);
    send Top_K(g_t). The downlink K defaults to the uplink K.
    """

    def __init__(
        self,
        *args: Any,
        ratio: float | None = 0.001,
        k: int | None = None,
        downlink_ratio: float | None = None,
        downlink_k: int | None = None,
        **kwargs: Any,
    ) -> None:
        if k is not None:
            ratio = None
        uplink = {"name": "topk", **_budget(ratio, k)}  # checked first: a bad ratio or k is named as given
        if downlink_ratio is None and downlink_k is None:
            downlink_ratio, downlink_k = ratio, k
        elif downlink_k is not None:
            downlink_ratio = None
        downlink = (
            TopK(count_argument("downlink_k", downlink_k)) if downlink_k is not None
            else TopK(ratio=ratio_argument("downlink_ratio", downlink_ratio))
        )
        kwargs.setdefault("server_error_feedback", True)
        super().__init__(*args, uplink=uplink, downlink=downlink, **kwargs)


@with_fedavg_signature
class RTopKSGD(SparseFedAvg):
    """rTop-k with error compensation (rTop-k paper, Algorithm 1).

    Each worker takes its top-r entries, then sends a uniformly random k of
    them. The pool size r is ``r`` (entries), or ``r_ratio`` (r = ⌈r_ratio·d⌉,
    fixed once the model size d is known), or, with neither, the paper's choice
    k/r = 1/n, n being the number of clients sampled this round. r is capped
    at d and is at least k.
    """

    def __init__(
        self,
        *args: Any,
        ratio: float | None = 0.001,
        k: int | None = None,
        r: int | None = None,
        r_ratio: float | None = None,
        **kwargs: Any,
    ) -> None:
        if k is not None:
            ratio = None
        if r is not None and r_ratio is not None:
            raise ValueError("give at most one of r and r_ratio")
        # The package's argument checks: numpy's ints and floats are numbers, a bool is not.
        self.r = None if r is None else count_argument("r", r)
        self.r_ratio = None if r_ratio is None else ratio_argument("r_ratio", r_ratio)
        super().__init__(*args, uplink={"name": "rtopk", **_budget(ratio, k), "n_workers": 1}, downlink=None, **kwargs)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "r": self.r, "r_ratio": self.r_ratio}

    def uplink_spec(self, server_round: int, num_clients: int) -> dict[str, Any]:
        spec = dict(self.uplink)
        r = self.r
        if r is None and self.r_ratio is not None and self.state.model is not None:
            r = math.ceil(round(self.r_ratio * self.state.model.numel(), 9))
        if r is not None:
            spec.pop("n_workers", None)
            spec["r"] = max(int(r), spec.get("k", 1))
        else:
            spec["n_workers"] = max(1, int(num_clients))
        return spec


@with_fedavg_signature
class RandomKSGD(SparseFedAvg):
    """Random-k with error compensation: each worker sends a uniformly random k of its d entries.

    The rTop-k paper's third baseline (its Tables I–III). Worker q:
    a_q = ε_q + Δ_q; send a_q on a uniformly random k-subset S (values
    unscaled); ε_q ← a_q − a_q|_S. The subset is drawn from a generator seeded
    by (seed, round, partition), like rTop-k's: a fixed seed gives the same
    masks, and every client and round draws its own.
    """

    def __init__(self, *args: Any, ratio: float | None = 0.001, k: int | None = None, **kwargs: Any) -> None:
        if k is not None:
            ratio = None
        super().__init__(*args, uplink={"name": "randomk", **_budget(ratio, k)}, downlink=None, **kwargs)


@with_fedavg_signature
class HardThresholdSGD(SparseFedAvg):
    """Hard-threshold sparsifier with error feedback (hard-threshold paper, Algorithm 1).

    The paper's worker step, with γ the learning rate::

        p = e + γ g;   Δ = γ · C_λ(p / γ);   e ← p − Δ      C_λ(x)_i = x_i if |x_i| ≥ λ, else 0

    λ is a threshold on ``p / γ``, in gradient units (Remark 1: for an absolute
    compressor, unlike top-K, it matters that C sees ``p / γ`` and not ``p``), and
    the tuning rule λ = 1/(2√k) assumes those units. Here ``p`` is the client's
    ``a = e + Δ`` (Δ = w − w', γ times the sum of its H steps' gradients), so a
    client sends every entry with ``|a_i| ≥ γ·λ``: the uplink spec carries ``lam =
    γ·λ`` (:class:`~fl_sparse.compressors.HardThreshold` thresholds what it is
    given, in either direction).

    Parameters
    ----------
    threshold : float, optional
        λ, in gradient units. ``None`` uses the paper's rule for matching a
        top-K budget, λ = 1/(2√k) with k = ⌈ratio·d⌉
        (:func:`fl_sparse.compressors.hard_threshold_for_topk`), fixed once the
        model size is known.
    ratio : float
        k/d of the rule (unused when ``threshold`` is given).
    lr : float, optional
        The clients' learning rate γ. ``None``: each round's train config
        ``"lr"`` (what the built-in experiments and the README's app send), so a
        learning-rate schedule in the train config is followed round by round.
    """

    def __init__(
        self, *args: Any, threshold: float | None = None, ratio: float = 0.001, lr: float | None = None, **kwargs: Any
    ) -> None:
        if threshold is not None and not (is_number(threshold) and math.isfinite(threshold) and threshold >= 0.0):
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
        self.threshold = None if threshold is None else float(threshold)
        self.ratio = ratio_argument("ratio", ratio)
        self.lr = None if lr is None else positive_argument("lr", lr)
        self._round_lr = self.lr  # γ of the round being configured (prepare_round sets it)
        super().__init__(*args, uplink={"name": "hard-threshold", "lam": self.threshold or 0.0}, downlink=None, **kwargs)
        self._threshold_given = self.threshold

    def options(self) -> dict[str, Any]:
        # "threshold_on": earlier fl-sparse applied λ to a itself; a run saved then is not continued with λ on a/γ.
        return {**super().options(), "threshold": self._threshold_given, "ratio": self.ratio, "lr": self.lr,
                "threshold_on": "a/lr"}

    def prepare_round(self, server_round: int, num_clients: int, config) -> dict[str, Any]:
        self._round_lr = self.lr if self.lr is not None else _learning_rate(config)
        return super().prepare_round(server_round, num_clients, config)

    def uplink_spec(self, server_round: int, num_clients: int) -> dict[str, Any]:
        if self.threshold is None and self.state.model is not None:
            k = TopK(ratio=self.ratio).k_for(self.state.model.numel())
            self.threshold = hard_threshold_for_topk(k)
        gamma = self._round_lr if self._round_lr is not None else 1.0  # before any round: λ as given
        return {"name": "hard-threshold", "lam": (self.threshold or 0.0) * gamma}


def _learning_rate(config) -> float:
    """γ from a train config's ``"lr"``, or a ValueError that says how to give it."""
    lr = config.get("lr") if config is not None else None
    if lr is None:
        raise ValueError(
            "HardThresholdSGD needs the clients' learning rate: the paper's threshold applies to "
            "(error + lr * gradient) / lr, in gradient units. Pass lr=... to HardThresholdSGD, "
            "or put 'lr' in the train config"
        )
    return positive_argument("the train config's 'lr'", lr)


@with_fedavg_signature
class AdaptiveTopKSGD(SparseFedAvg):
    """AdapTop-K (adaptive-topk paper, Algorithms 1 and 2): k_t under a fixed budget T·k.

    Round t = 0..T−1 sends k_t = (1+γ)k for t < t̂/2 and t ≥ (t̂+T)/2, and
    (1−γ)k in between (:func:`fl_sparse.compressors.adaptive_k_schedule`),
    re-planned from what was spent (:func:`fl_sparse.compressors.adaptive_k_budgeted`)
    so that Σ_t k_t = T·k exactly even when t̂ is estimated after round 1. ``t_hat`` is the paper's hyper-parameter; when it
    is ``None`` it is estimated after round 1 with the paper's formula
    (:func:`fl_sparse.compressors.adaptive_k_t_hat`, Lemma 3 / Lemma 8) from
    F(w_0) ≈ the clients' mean round-1 training loss, η = ``lr`` and the
    problem constants ``mu``, ``L``, ``sigma_sq`` (defaults are rough guesses
    for small networks; pass your own or pass ``t_hat``). Round 1 is in the
    early high phase either way. With ``error_feedback=False`` clients keep
    no error memory (Algorithm 1, "without error compensation").
    """

    fixed_options = {"client_error_feedback": "error_feedback= (the clients' error memory)"}

    def __init__(
        self,
        *args: Any,
        ratio: float = 0.001,
        num_rounds: int,
        gamma: float = 0.5,
        t_hat: int | None = None,
        error_feedback: bool = True,
        lr: float = 0.05,
        mu: float = 0.01,
        L: float = 1.0,
        sigma_sq: float = 1.0,
        **kwargs: Any,
    ) -> None:
        num_rounds = count_argument("num_rounds", num_rounds)
        if not (is_number(gamma) and 0.0 <= gamma <= 1.0):
            raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
        if t_hat is not None and count_argument("t_hat", t_hat, minimum=0) > num_rounds:
            raise ValueError(f"t_hat must be in [0, num_rounds], got {t_hat}")
        self.ratio = ratio_argument("ratio", ratio)
        self.num_rounds = num_rounds
        self.gamma = float(gamma)
        self.t_hat = self._t_hat_given = None if t_hat is None else int(t_hat)
        self.planned: dict[int, int] = {}  # round index t -> k_t
        self._t_hat_estimate: int | None = None  # t̂ of the paper's formula, before clipping to num_rounds
        self.estimate = {"eta": positive_argument("lr", lr), "mu": positive_argument("mu", mu),
                         "L": positive_argument("L", L), "sigma_sq": positive_argument("sigma_sq", sigma_sq)}
        error_feedback = flag_argument("error_feedback", error_feedback)
        super().__init__(
            *args,
            uplink={"name": "topk", "ratio": self.ratio},
            downlink=None,
            client_error_feedback=error_feedback,
            **kwargs,
        )

    def _t_hat(self, server_round: int, numel: int, k: int) -> int:
        if self._t_hat_estimate is not None:
            # The paper's t̂ (Lemma 3 / 8) does not depend on T: a run continued with another
            # num_rounds clips the estimate to its own T, not to the T of the run that made it.
            self.t_hat = min(self._t_hat_estimate, self.num_rounds)
            return self.t_hat
        if self.t_hat is not None:
            return self.t_hat
        first = self.state.round_metrics.get(1, {})
        f0 = first.get("train_loss")
        if server_round == 1 or f0 is None or f0 != f0:
            return self.num_rounds  # before F(w_0) is known: round 1 is early-phase anyway
        try:  # F(w_0) comes from the clients' reported losses: untrusted
            estimate = adaptive_k_t_hat(
                d=numel, k=k, f0=float(f0),
                error_compensation=self.client_error_feedback, **self.estimate,
            )
        except (ValueError, OverflowError):
            estimate = self.num_rounds
        self._t_hat_estimate = max(int(estimate), 0)
        self.t_hat = min(self._t_hat_estimate, self.num_rounds)
        self.state.round_metrics.setdefault(server_round, {"round": server_round})["t_hat"] = self.t_hat
        if self.t_hat >= self.num_rounds:
            # The paper's point is more k early *and* late; with t̂ = T there is no late phase.
            log(WARNING, "AdapTop-K: the estimated t_hat is %s >= num_rounds (%d), so k_t = (1+gamma)k for the "
                "first half of the rounds and (1-gamma)k after, with no late high phase. The estimate's "
                "constants (mu=%g, L=%g, sigma_sq=%g) are rough guesses: pass t_hat= to choose the turning point",
                self._t_hat_estimate, self.num_rounds,
                self.estimate["mu"], self.estimate["L"], self.estimate["sigma_sq"])
        return self.t_hat

    def initialize(self, arrays) -> None:
        super().initialize(arrays)
        self.t_hat = self._t_hat_given
        self._t_hat_estimate = None
        self.planned = {}

    def options(self) -> dict[str, Any]:
        """The base's, plus γ, the given t̂ and the estimate's constants (not ``num_rounds``: a run may be extended)."""
        return {**super().options(), "gamma": self.gamma, "t_hat": self._t_hat_given, "estimate": dict(self.estimate)}

    def state_dict(self) -> dict[str, Any]:
        """The base's state plus t̂ (given or estimated) and the k_t planned so far."""
        return {**super().state_dict(), "adaptive_topk": {"t_hat": self.t_hat, "planned": dict(self.planned),
                                                        "t_hat_estimate": self._t_hat_estimate}}

    def _load_state(self, state: dict[str, Any]) -> None:
        """The base's, then t̂ and the plan. With another ``num_rounds`` than the saved run's, the rounds
        not yet planned share the budget ``num_rounds · k`` (the plan so far stays) and an estimated
        t̂ is clipped to the new ``num_rounds``; a budget the saved rounds already spent is an error
        at the next round, naming the ``num_rounds`` needed."""
        super()._load_state(state)
        try:
            extra = state["adaptive_topk"]
            self.t_hat = None if extra["t_hat"] is None else int(extra["t_hat"])
            self.planned = {int(t): int(k) for t, k in extra["planned"].items()}
            estimate = extra.get("t_hat_estimate")  # absent in a state saved before it was kept
            self._t_hat_estimate = None if estimate is None else int(estimate)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a complete AdapTop-K state: {type(exc).__name__}: {exc}") from None

    def uplink_spec(self, server_round: int, num_clients: int) -> dict[str, Any]:
        """k_t of the budgeted schedule: Σ_{t<T} k_t = T·k exactly, whatever t̂ turns out to be.

        Round 1 runs before t̂ can be estimated (it needs F(w_0)); the rounds
        after it re-plan the remaining budget T·k − spent
        (:func:`fl_sparse.compressors.adaptive_k_budgeted`). Rounds past
        ``num_rounds`` are outside the budget and send k.
        """
        if self.state.model is None:
            return dict(self.uplink)
        numel = self.state.model.numel()
        k = TopK(ratio=self.ratio).k_for(numel)
        t = server_round - 1
        if t >= self.num_rounds:
            return {"name": "topk", "k": k}
        if t not in self.planned:  # asked twice for a round (a retried configure_train): same k_t
            spent = sum(k for r, k in self.planned.items() if r < t)
            # t̂ was clipped to the num_rounds of the run that estimated it: a run resumed with
            # fewer rounds clips it to its own (t̂ >= T: no late high phase, as when estimated so)
            t_hat = min(self._t_hat(server_round, numel, k), self.num_rounds)
            k_t = adaptive_k_budgeted(t, self.num_rounds, k, self.gamma, t_hat, spent, d=numel)
            if k_t < 1:
                raise ValueError(
                    f"AdapTop-K: rounds 1..{t} already sent {spent} entries per client, the whole budget "
                    f"num_rounds * k = {self.num_rounds} * {k} = {self.num_rounds * k}: a resumed run needs "
                    f"num_rounds >= {-(-(spent + 1) // k)} (round {server_round} would send no entry)"
                )
            self.planned[t] = k_t
        return {"name": "topk", "k": int(self.planned[t])}
