"""sparse_quickstart: a Flower ServerApp running bidirectional top-K SGD."""

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fl_sparse.strategies import BidirectionalTopKSGD
from sparse_quickstart.task import Net, load_centralized_dataset, test

# The run config's defaults: the same as [tool.flwr.app.config] in pyproject.toml.
# `flwr run` passes those (and --run-config overrides) in context.run_config;
# flwr.simulation.run_simulation passes none, so they are repeated here.
DEFAULT_CONFIG = {
    "num-server-rounds": 5,
    "fraction-train": 1.0,
    "fraction-evaluate": 1.0,
    "ratio": 0.05,
    "local-epochs": 1,
    "learning-rate": 0.05,
    "batch-size": 32,
    "seed": 0,
    "results": "results.json",
}

# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""

    # Read run config
    cfg = {**DEFAULT_CONFIG, **context.run_config}
    num_rounds = int(cfg["num-server-rounds"])
    seed = int(cfg["seed"])

    # Load global model
    torch.manual_seed(seed)
    global_model = Net()
    arrays = ArrayRecord(global_model.state_dict())

    # Bidirectional top-K SGD: each client sends its top `ratio` share of the
    # entries of its (error-compensated) update, the server sends back the top
    # `ratio` share of the aggregate. Otherwise configured like FedAvg.
    strategy = BidirectionalTopKSGD(
        fraction_train=float(cfg["fraction-train"]),
        fraction_evaluate=float(cfg["fraction-evaluate"]),
        ratio=float(cfg["ratio"]),
        seed=seed,
    )

    # Start strategy, run it for `num_rounds`
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord(
            {
                "lr": float(cfg["learning-rate"]),
                "local-epochs": int(cfg["local-epochs"]),
                "batch-size": int(cfg["batch-size"]),
                "seed": seed,
            }
        ),
        evaluate_config=ConfigRecord({"batch-size": int(cfg["batch-size"]), "seed": seed}),
        num_rounds=num_rounds,
        evaluate_fn=lambda server_round, arrays: global_evaluate(server_round, arrays, seed),
    )

    # What each round cost and achieved
    dense_bytes = dense_model_bytes(arrays)
    rows = round_rows(result, dense_bytes)
    initial = result.evaluate_metrics_serverapp.get(0, {}).get("accuracy", float("nan"))
    print(f"\nDense model: {dense_bytes} B per client and direction; initial accuracy {initial:.3f}")
    for row in rows:
        print(
            f"round {row['round']}: uplink {row['uplink_bytes']} B from {row['clients']} clients "
            f"({row['uplink_fraction']:.1%} of dense), downlink {row['downlink_bytes']} B, "
            f"accuracy {row['accuracy']:.3f}"
        )

    # Save results and the final model to disk
    print(f"\nSaving results to {cfg['results']} and the final model to final_model.pt...")
    results = {"dense_bytes": dense_bytes, "initial_accuracy": initial, "rounds": rows}
    Path(cfg["results"]).write_text(json.dumps(results, indent=1))
    torch.save(result.arrays.to_torch_state_dict(), "final_model.pt")


def global_evaluate(server_round: int, arrays: ArrayRecord, seed: int = 0) -> MetricRecord:
    """Evaluate model on central data."""
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    test_loss, test_acc = test(model, load_centralized_dataset(seed), device)
    return MetricRecord({"accuracy": test_acc, "loss": test_loss})


def dense_model_bytes(arrays: ArrayRecord) -> int:
    """Bytes of the model's float arrays: what dense FedAvg sends per client and direction."""
    return sum(a.numpy().nbytes for a in arrays.values() if a.numpy().dtype.kind == "f")


def round_rows(result, dense_bytes: int) -> list[dict]:
    """One dict per round: bytes sent (from the strategy's train metrics) and accuracy."""
    rows = []
    for rnd, train in sorted(result.train_metrics_clientapp.items()):
        central = result.evaluate_metrics_serverapp.get(rnd, {})
        federated = result.evaluate_metrics_clientapp.get(rnd, {})
        clients = int(train["clients"])
        rows.append(
            {
                "round": int(rnd),
                "clients": clients,
                "uplink_bytes": int(train["uplink_bytes"]),
                "downlink_bytes": int(train["downlink_bytes"]),
                "uplink_fraction": train["uplink_bytes"] / (clients * dense_bytes),
                "train_loss": float(train["train_loss"]),
                "accuracy": float(central.get("accuracy", float("nan"))),
                "federated_accuracy": float(federated.get("eval_acc", float("nan"))),
            }
        )
    return rows
