"""Accuracy against ε: fedpriv federated, central DP-SGD and non-private training.

* **fedpriv**: ``fedpriv simulate`` with ``num_clients`` clients (IID, and
  Dirichlet(α) over labels), all training every round; the accuracy is the run's
  own central evaluation (``summary.json``), the ε its own ledger's.
* **central DP-SGD**: the same model, batch size, learning rate, schedule,
  accountant and server EMA, trained by fedpriv's own round function
  (:func:`clients.train.dp_train_round`) on *one* client holding the pooled
  data, with σ calibrated once for all its epochs; evaluated on the same test
  split as the federated runs.
* **non-private**: the same model and data, plain SGD with momentum 0.9 (no
  clipping, no noise) for the same number of epochs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from simulations.benchmarks.suites import AccuracySpec
from simulations.benchmarks.throughput import fedpriv_command, run_monitored

__all__ = ["run_accuracy", "federated_result"]


def _config(spec: AccuracySpec, epsilon: float) -> Any:
    from server.app import compose_config

    cfg, _ = compose_config([
        f"dataset={spec.dataset}", f"model={spec.model}", f"train.rounds={spec.epochs}",
        "train.local_epochs=1", f"train.batch_size={spec.batch_size}", f"train.lr={spec.lr}",
        f"privacy.target_epsilon={epsilon}", f"privacy.delta={spec.delta}",
        "simulation.num_clients=1", "strategy.min_train_clients=1",
        "strategy.min_evaluate_clients=1", *spec.overrides])
    return cfg


def _pooled(cfg: Any) -> tuple[Any, Any]:
    """One client's training split of the pooled data and the server's test split,
    both through ``dataset.preprocess`` as in a federated run."""
    from clients.sitedata import load_site_data, server_test_data

    site = load_site_data(cfg.dataset, node_config={}, partition_id=0, num_partitions=1,
                          seed=cfg.train.seed)
    return site.train, server_test_data(cfg.dataset, cfg.train.seed)


def _central_dp(spec: AccuracySpec, epsilon: float, pooled: Any) -> dict[str, Any]:
    import torch

    from clients.app import derive_seed
    from clients.models import build_model
    from clients.train import dp_train_round, predict
    from privacy import calibrate_noise_multiplier, planned_poisson_schedule
    from privacy import epsilon as cumulative_epsilon
    from server.loop import lr_for_round

    cfg = _config(spec, epsilon)
    seed, pc = cfg.train.seed, cfg.privacy
    train, test = pooled
    q, _, total = planned_poisson_schedule(num_samples=len(train), batch_size=spec.batch_size,
                                           local_epochs=1, rounds=spec.epochs)
    sigma = calibrate_noise_multiplier(target_epsilon=epsilon, delta=spec.delta, sample_rate=q,
                                       steps=total, accountant=pc.accountant)
    model = build_model(cfg.model, tuple(train.x.shape[1:]), train.num_classes, seed=seed)
    device = torch.device("cpu")
    history: list[tuple[float, float, int]] = []
    ema: dict[str, torch.Tensor] | None = None
    for epoch in range(1, spec.epochs + 1):
        result = dp_train_round(model, train, cfg.task, lr=lr_for_round(cfg.train, epoch),
                                noise_multiplier=sigma, history=history,
                                seed=derive_seed(seed, epoch, "central"), device=device)
        history = result.history
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        decay = cfg.strategy.ema  # the server's moving average, as in the federated runs
        ema = weights if ema is None or decay == 0 else {
            k: decay * ema[k] + (1 - decay) * v if v.is_floating_point() else v
            for k, v in weights.items()}
    if ema is not None:
        model.load_state_dict(ema)
    probs = predict(model, test, device)
    return {"accuracy": float((probs.argmax(1) == test.y).mean()), "noise_multiplier": sigma,
            "epochs": spec.epochs, "examples": len(train),
            "epsilon": cumulative_epsilon(history=history, delta=spec.delta,
                                          accountant=pc.accountant)}


def _nonprivate(spec: AccuracySpec, pooled: Any) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from clients.models import build_model
    from clients.train import predict

    cfg = _config(spec, 3.0)
    seed = cfg.train.seed
    train, test = pooled
    model = build_model(cfg.model, tuple(train.x.shape[1:]), train.num_classes, seed=seed)
    loader = DataLoader(TensorDataset(torch.from_numpy(train.x), torch.from_numpy(train.y)),
                        batch_size=spec.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=spec.nonprivate_lr, momentum=0.9)
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    for _ in range(spec.epochs):
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            criterion(model(xb), yb).backward()
            opt.step()
    probs = predict(model, test, torch.device("cpu"))
    return {"accuracy": float((probs.argmax(1) == test.y).mean()), "epochs": spec.epochs,
            "lr": spec.nonprivate_lr, "momentum": 0.9}


def _federated(spec: AccuracySpec, partitioner: str, epsilon: float,
               work: Path) -> dict[str, Any]:
    run_dir = work / "run"
    run = run_monitored(fedpriv_command(
        dataset=spec.dataset, model=spec.model, clients=spec.num_clients,
        sampled=spec.num_clients, rounds=spec.rounds, run_dir=run_dir,
        batch_size=spec.batch_size, lr=spec.lr, round_timeout=spec.timeout_s,
        extra=(f"train.local_epochs={spec.local_epochs}", f"privacy.target_epsilon={epsilon}",
               f"privacy.delta={spec.delta}", f"dataset.partitioner={partitioner}",
               f"dataset.alpha={spec.alpha}", *spec.overrides)),
        work / "fedpriv.out", spec.timeout_s, run_dir / "metrics.jsonl", fresh=run_dir)
    if run.returncode != 0:
        raise RuntimeError(f"fedpriv simulate failed ({run.returncode}); see {run.log}:\n"
                           + run.log.read_text()[-3000:])
    return {**federated_result(run_dir), "wall_s": round(run.wall_s, 1)}


def federated_result(run_dir: Path) -> dict[str, Any]:
    """Accuracy and largest client ε of a finished fedpriv run (its ``summary.json``)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"accuracy": summary["accuracy"], "epsilon": summary["epsilon_sample_level_max"],
            "rounds_completed": summary["rounds_completed"]}


def run_accuracy(spec: AccuracySpec, work: Path) -> dict[str, Any]:
    """The ``accuracy_vs_epsilon`` section.

    ε = 3 (the targets' ε) runs first; ``work/partial.json`` is rewritten after
    every training run, so a long suite shows what it has so far.
    """
    import warnings

    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"opacus\.")
    result: dict[str, Any] = {
        "method": (f"`{spec.dataset}`, `{spec.model}` {list(spec.overrides)}, batch "
                   f"{spec.batch_size}, lr {spec.lr}, δ = {spec.delta:g}. fedpriv: "
                   f"{spec.num_clients} clients, {spec.rounds} rounds × {spec.local_epochs} "
                   f"local epoch(s), partitions {list(spec.partitioners)} (Dirichlet "
                   f"α={spec.alpha}); central DP-SGD: one client with the pooled data, "
                   f"{spec.epochs} epochs, fedpriv's DP-SGD round "
                   f"and server EMA; non-private: plain SGD (lr {spec.nonprivate_lr}, momentum "
                   f"0.9), {spec.epochs} epochs; accuracy on the server's held-out test split"),
        "dataset": spec.dataset, "model": spec.model, "num_clients": spec.num_clients,
        "delta": spec.delta,
        "federated": {p: {} for p in spec.partitioners}, "central": {}, "nonprivate": None,
    }
    work.mkdir(parents=True, exist_ok=True)

    prepared: list[Any] = []

    def pooled() -> Any:
        """The pooled data and the test split, prepared once (scattering features
        take minutes for Fashion-MNIST) for every central and non-private run."""
        if not prepared:
            prepared.append(_pooled(_config(spec, 3.0)))
        return prepared[0]

    def save() -> None:
        (work / "partial.json").write_text(json.dumps(result, indent=2) + "\n")

    for eps in sorted(set(spec.epsilons) | set(spec.federated_epsilons),
                      key=lambda e: (abs(e - 3.0), e)):
        key = str(float(eps))
        if eps in spec.federated_epsilons:
            for partitioner in spec.partitioners:
                result["federated"][partitioner][key] = _federated(
                    spec, partitioner, eps, work / f"{partitioner}-eps{eps:g}")
                save()
        if eps in spec.epsilons:
            result["central"][key] = _central_dp(spec, eps, pooled())
            save()
        if result["nonprivate"] is None:
            result["nonprivate"] = _nonprivate(spec, pooled())
            save()
    result["central"] = dict(sorted(result["central"].items(), key=lambda kv: float(kv[0])))
    for partitioner, by_eps in result["federated"].items():
        result["federated"][partitioner] = dict(sorted(by_eps.items(),
                                                       key=lambda kv: float(kv[0])))
    return result
