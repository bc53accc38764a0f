"""A user's own Flower app, made sparse by ``SparseMod`` and nothing else.

The ClientApp below is written as Flower's quickstart writes one, with its
own small CNN (BatchNorm included: an integer ``num_batches_tracked``
buffer) and its own synthetic data. The only fl-sparse line on the client is
``mods=[SparseMod()]``. It runs through Flower's real simulation engine with
bidirectional top-K and with SSGD-MV-AD, and, with H = 1, in-process against
a hand-written loop of the paper's Algorithm 2.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from torch import nn

from fl_sparse import protocol
from fl_sparse.clients import SparseMod
from fl_sparse.strategies import BidirectionalTopKSGD, SSGDMajorityVote
from inprocess import InProcessGrid

NUM_CLIENTS = 3
CLASSES = 4


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.hidden = nn.Linear(16 * 4 * 4, 32)  # d ≈ 8,500: headers do not dominate a 10 % payload
        self.fc = nn.Linear(32, CLASSES)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(F.relu(self.hidden(x.flatten(1))))


def make_model(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN()


def load_data(partition_id: int, n: int = 64):
    """Class-dependent blobs on an 8x8 image; partitions differ in size (unequal weights)."""
    gen = torch.Generator().manual_seed(100 + partition_id)
    n = n + 16 * partition_id
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    x = torch.randn(n, 1, 8, 8, generator=gen) * 0.5
    for c in range(CLASSES):
        x[y == c, 0, 2 * c : 2 * c + 2, :] += 2.0
    return x, y


def held_out_data():
    gen = torch.Generator().manual_seed(999)
    y = torch.randint(0, CLASSES, (256,), generator=gen)
    x = torch.randn(256, 1, 8, 8, generator=gen) * 0.5
    for c in range(CLASSES):
        x[y == c, 0, 2 * c : 2 * c + 2, :] += 2.0
    return x, y


# ------------------------------------------------------------------ the user's ClientApp
def user_train(msg: Message, context: Context) -> Message:
    """Flower quickstart style: nothing sparse in here."""
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    config = msg.content["config"]
    x, y = load_data(int(context.node_config["partition-id"]))
    optimizer = torch.optim.SGD(model.parameters(), lr=float(config["lr"]))
    model.train()
    for step in range(int(config["local-steps"])):
        idx = torch.arange(step * 16, step * 16 + 16) % len(y)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"train_loss": loss.item(), "num-examples": len(y)}),
        }
    )
    return Message(content=content, reply_to=msg)


def make_client_app(state_dir: str) -> ClientApp:
    app = ClientApp(mods=[SparseMod(state_dir=state_dir)])
    app.train()(user_train)
    return app


def accuracy(arrays: ArrayRecord) -> float:
    model = make_model()
    model.load_state_dict(arrays.to_torch_state_dict())
    model.eval()
    x, y = held_out_data()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def dense_bytes(arrays: ArrayRecord) -> int:
    """What the float parameters take as raw float32 (no container headers)."""
    return sum(4 * a.numpy().size for a in arrays.values() if a.numpy().dtype.kind == "f")


# ------------------------------------------------------------------ Flower's simulation engine
def _run_simulation(strategy, rounds: int, state_dir: str):
    from flwr.simulation import run_simulation

    initial = ArrayRecord(make_model().state_dict())
    results = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        results["result"] = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=rounds,
            train_config=ConfigRecord({"lr": 0.1, "local-steps": 3}),
        )

    run_simulation(
        server_app=server_app,
        client_app=make_client_app(state_dir),
        num_supernodes=NUM_CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    return initial, results["result"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "make_strategy",
    [
        lambda: BidirectionalTopKSGD(ratio=0.1, fraction_evaluate=0.0, min_available_nodes=NUM_CLIENTS, seed=1),
        lambda: SSGDMajorityVote(
            ratio=0.1, add_drop_ratio=0.02, fraction_evaluate=0.0, min_available_nodes=NUM_CLIENTS, seed=1
        ),
    ],
    ids=["bidirectional-topk", "ssgd-mv-ad"],
)
def test_users_quickstart_app_learns_sparse_in_flowers_simulation(make_strategy, tmp_path):
    strategy = make_strategy()
    initial, result = _run_simulation(strategy, rounds=6, state_dir=str(tmp_path))
    rounds = result.train_metrics_clientapp
    assert sorted(rounds) == list(range(1, 7))
    # Every client's reply was accepted, every round.
    per_round = {t: {k: strategy.state.round_metrics[t].get(k) for k in ("clients", "accepted", "failures", "vote_accepted", "vote_failures")} for t in rounds}
    assert all(strategy.state.round_metrics[t]["accepted"] == NUM_CLIENTS for t in rounds), per_round
    # It learns: clearly better on held-out data than the initial model.
    before, after = accuracy(initial), accuracy(result.arrays)
    assert after > max(0.8, before + 0.2), (before, after)
    # The user's own metric was aggregated and reported beside the byte counts.
    assert all(math.isfinite(rounds[t]["train_loss"]) for t in rounds)
    # Bytes shrink as configured: each upload is about 10 % of the entries (plus positions),
    # far below a dense model; after round 1 the downlink is sparse too.
    dense = dense_bytes(initial)
    for t in range(2, 7):
        assert rounds[t]["uplink_bytes"] / NUM_CLIENTS < 0.35 * dense, rounds[t]
        assert rounds[t]["downlink_bytes"] / NUM_CLIENTS < 0.35 * dense, rounds[t]
    assert rounds[1]["downlink_bytes"] >= NUM_CLIENTS * 0.9 * dense  # first contact: the dense model
    # The BatchNorm counter is an exact array: it came back averaged, not compressed.
    assert int(result.arrays["bn.num_batches_tracked"].numpy()) > 0


# ------------------------------------------------------------------ H = 1 against the paper's loop
def _plain_bidirectional(rounds: int, k_ratio: float) -> dict[str, torch.Tensor]:
    """Algorithm 2 of the bidirectional top-K paper, written out by hand (no fl-sparse code)."""
    model = make_model()
    names = [n for n, t in model.state_dict().items() if t.is_floating_point()]
    w = torch.cat([model.state_dict()[n].reshape(-1).float() for n in names])
    counter = model.state_dict()["bn.num_batches_tracked"].clone()
    d = w.numel()
    k = math.ceil(k_ratio * d)
    sizes = [len(load_data(q)[1]) for q in range(NUM_CLIENTS)]
    p = [n / sum(sizes) for n in sizes]
    errors = [torch.zeros(d) for _ in range(NUM_CLIENTS)]
    delta = torch.zeros(d)

    def topk(a):
        out = torch.zeros_like(a)
        idx = torch.topk(a.abs(), k).indices
        out[idx] = a[idx]
        return out

    for _ in range(rounds):
        g = torch.zeros(d)
        counters = []
        for q in range(NUM_CLIENTS):
            offset, state = 0, {}
            for n, t in model.state_dict().items():
                if t.is_floating_point():
                    state[n] = w[offset : offset + t.numel()].view_as(t).clone()
                    offset += t.numel()
                else:
                    state[n] = counter.clone()
            arrays = ArrayRecord(state)
            reply = user_train(
                Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": 0.1, "local-steps": 1})}),
                        metadata=_meta()),
                Context(run_id=1, node_id=q, node_config={"partition-id": q}, state=RecordDict(), run_config={}),
            )
            trained = reply.content["arrays"].to_torch_state_dict()
            w_after = torch.cat([trained[n].reshape(-1).float() for n in names])
            a = errors[q] + (w - w_after)
            s = topk(a)
            errors[q] = a - s
            g += p[q] * s
            counters.append(trained["bn.num_batches_tracked"])
        g = g + delta
        sent = topk(g)
        delta = g - sent
        w = w - sent
        counter = torch.round(sum(pq * c.double() for pq, c in zip(p, counters))).to(counter.dtype)
    return {"w": w, "counter": counter}


def _meta():
    import time

    from flwr.app.metadata import Metadata

    return Metadata(run_id=1, message_id="x", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                    group_id="", created_at=time.time(), ttl=60.0, message_type="train")


def test_mod_path_equals_the_papers_loop_with_h1(tmp_path):
    """H = 1, unequal partitions, 4 rounds: the mod + strategy end where Algorithm 2 ends (1e-6).

    Algorithm 2 compresses every float entry: BatchNorm's running statistics too (not the default)."""
    strategy = BidirectionalTopKSGD(ratio=0.05, fraction_evaluate=0.0, min_available_nodes=NUM_CLIENTS,
                                    exact_running_stats=False)
    grid = InProcessGrid(make_client_app(str(tmp_path)), NUM_CLIENTS)
    initial = ArrayRecord(make_model().state_dict())
    result = strategy.start(grid, initial, num_rounds=4, train_config=ConfigRecord({"lr": 0.1, "local-steps": 1}))
    expected = _plain_bidirectional(rounds=4, k_ratio=0.05)
    final = result.arrays.to_torch_state_dict()
    names = [n for n, t in final.items() if t.is_floating_point()]
    got = torch.cat([final[n].reshape(-1).float() for n in names])
    assert not torch.equal(got, strategy.state.layout.flatten(initial)), "the model must have moved"
    torch.testing.assert_close(got, expected["w"], rtol=0, atol=1e-6)
    assert torch.equal(final["bn.num_batches_tracked"], expected["counter"])


def test_user_function_sees_its_own_records_only(tmp_path):
    """No fl-sparse record reaches the user's function; its config arrives untouched."""
    seen = []

    def spy(msg: Message, context: Context) -> Message:
        seen.append(msg.content)
        return user_train(msg, context)

    app = ClientApp(mods=[SparseMod(state_dir=str(tmp_path))])
    app.train()(spy)
    strategy = BidirectionalTopKSGD(ratio=0.1, fraction_evaluate=0.0, min_available_nodes=2)
    grid = InProcessGrid(app, 2)
    initial = ArrayRecord(make_model().state_dict())
    strategy.start(grid, initial, num_rounds=2, train_config=ConfigRecord({"lr": 0.1, "local-steps": 1, "note": "x"}))
    assert len(seen) == 4
    for content in seen:
        assert not any(protocol.is_protocol_key(k) for k in content)
        assert dict(content["config"]) == {"lr": 0.1, "local-steps": 1, "note": "x", "server-round": content["config"]["server-round"]}
        arrays = content["arrays"]
        assert list(arrays.keys()) == list(initial.keys())
        assert all(arrays[n].shape == initial[n].shape and arrays[n].dtype == initial[n].dtype for n in initial)
