"""The naive baseline: the usual Flower + Opacus pattern, written here for comparison.

What most Flower + Opacus simulations do, and what ``simulation`` measures
fedpriv against. Every training call loads the data set and cuts its partition
again, builds the model, a new ``DataLoader`` and a new ``PrivacyEngine``
(whose ε is therefore that one call's, not the client's total: a known trap,
kept because it is the pattern), trains one epoch with a fixed noise
multiplier and replies. Client resources are Flower's defaults (2 CPUs per
client). The server is Flower's own ``FedAvg.start`` with a central evaluation
after each round, which also stamps the time.

Same data (``clients.data``'s bundled sets and partitions), model
(``clients.models``), batch size, learning rate and clipping as fedpriv.

Run as ``python -m simulations.benchmarks.naive SPEC_JSON OUT_JSON``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

__all__ = ["client_app", "make_server_app", "NOISE_MULTIPLIER"]

NOISE_MULTIPLIER = 1.0  # the pattern's hand-set σ (no calibration, no ledger)

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from clients.config import DatasetConfig, ModelConfig
    from clients.data import client_partition
    from clients.models import build_model

    cfg = msg.content["config"]
    pid, n = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    data, _ = client_partition(DatasetConfig(name=str(cfg["dataset"])), pid, n, 0)
    model = build_model(ModelConfig(name=str(cfg["model"])), tuple(data.x.shape[1:]),
                        data.num_classes)
    arrays = msg.content["arrays"]
    model.load_state_dict(arrays.to_torch_state_dict())  # type: ignore[union-attr]
    loader = DataLoader(TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y)),
                        batch_size=int(cfg["batch-size"]))  # type: ignore[arg-type]
    optimizer = torch.optim.SGD(model.parameters(), lr=float(cfg["lr"]))  # type: ignore[arg-type]
    engine = PrivacyEngine()
    dp_model, dp_opt, dp_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=float(cfg["max-grad-norm"]))  # type: ignore[arg-type]
    criterion = torch.nn.CrossEntropyLoss()
    dp_model.train()
    for xb, yb in dp_loader:
        dp_opt.zero_grad()
        out = dp_model(xb)
        loss = criterion(out, yb) if len(yb) else out.sum() * 0.0
        loss.backward()
        dp_opt.step()
    epsilon = engine.get_epsilon(float(cfg["delta"]))  # type: ignore[arg-type]
    reply = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"num-examples": len(data), "epsilon": float(epsilon)}),
    })
    return Message(reply, reply_to=msg)


class _CountingFedAvg(FedAvg):
    """Flower's FedAvg, counting the updates that arrived without an error."""

    updates: list[int]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
        replies = list(replies)
        self.updates.append(sum(1 for r in replies if not r.has_error()))
        return super().aggregate_train(server_round, replies)


def make_server_app(spec: dict[str, Any], marks: list[float], updates: list[int]) -> ServerApp:
    """FedAvg over ``spec['clients']`` nodes, ``spec['sampled']`` per round.

    ``marks`` gets a time stamp after each central evaluation (round 0 included),
    ``updates`` the number of good replies of each round.
    """
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        import torch

        from clients.config import DatasetConfig, ModelConfig
        from clients.data import server_test_split
        from clients.models import build_model
        from clients.train import predict

        _, test = server_test_split(DatasetConfig(name=spec["dataset"]), 0)
        model = build_model(ModelConfig(name=spec["model"]), tuple(test.x.shape[1:]),
                            test.num_classes)
        n, k = spec["clients"], spec["sampled"]
        strategy = _CountingFedAvg(fraction_train=k / n, min_train_nodes=k,
                                   fraction_evaluate=0.0, min_evaluate_nodes=0,
                                   min_available_nodes=n)
        strategy.updates = updates

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            probs = predict(model, test, torch.device("cpu"))
            marks.append(time.perf_counter())  # round r ends with its evaluation
            return MetricRecord({"accuracy": float((probs.argmax(1) == test.y).mean())})

        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                       num_rounds=spec["rounds"], evaluate_fn=central,
                       train_config=ConfigRecord({
                           "dataset": spec["dataset"], "model": spec["model"],
                           "batch-size": spec["batch_size"], "lr": spec["lr"],
                           "max-grad-norm": spec["max_grad_norm"], "delta": spec["delta"]}))

    return server_app


def main(spec: dict[str, Any], out_path: str) -> None:
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    marks: list[float] = []
    updates: list[int] = []
    t0 = time.perf_counter()
    run_simulation(server_app=make_server_app(spec, marks, updates), client_app=client_app,
                   num_supernodes=spec["clients"], backend_name="ray",
                   # Flower's default client resources (2 CPUs each); quiet Ray logs only.
                   backend_config={"init_args": {"logging_level": "ERROR",
                                                 "log_to_driver": False}})
    expected = [spec["sampled"]] * spec["rounds"]
    if len(marks) != spec["rounds"] + 1 or updates != expected:
        raise RuntimeError(f"naive run: {len(marks) - 1} of {spec['rounds']} rounds, "
                           f"updates per round {updates} (expected {expected}); see the log")
    rounds = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    with open(out_path, "w") as fh:
        json.dump({"round_s": rounds, "updates": updates, "wall_s": time.perf_counter() - t0},
                  fh)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), sys.argv[2])
