"""The fedpriv ClientApp (Flower Message API).

Each round the server sends the global model and a ``ConfigRecord`` holding
the flattened :class:`~clients.config.ClientTask` plus ``server-round`` and
``lr``. The client trains with DP-SGD on its own partition and replies with a
plain state dict and its metrics. Its privacy state (σ, calibrated once, and
the accountant history) lives in ``context.state`` across rounds, and in the
node config's ``state-dir`` on disk when one is given (``clients.state``).
"""

from __future__ import annotations

import hashlib
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.config import ClientTask, ConfigError, from_flat
from clients.data import ArrayData, client_partition
from clients.models import build_model
from clients.records import array_record, config_record, integer, number
from clients.state import PrivacyState, load_state, save_state
from clients.train import dp_train_round, pick_device, predict
from privacy import calibrate_noise_multiplier, planned_poisson_schedule

__all__ = ["app", "ClientFailure", "derive_seed"]

app = ClientApp()


class ClientFailure(RuntimeError):
    """Carries the client's full traceback to the server (Flower keeps only str(ex))."""


@contextmanager
def _report_failures(partition: object) -> Iterator[None]:
    try:
        yield
    except Exception as ex:
        raise ClientFailure(
            f"client {partition} failed:\n{traceback.format_exc()}"
        ) from ex


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from the run seed, round and client id (stable across processes)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _site(context: Context) -> tuple[int, int, str]:
    cfg = context.node_config
    if "partition-id" not in cfg or "num-partitions" not in cfg:
        raise ConfigError(
            "node config must set 'partition-id' and 'num-partitions' "
            f"(got keys {sorted(cfg)})"
        )
    return integer(cfg, "partition-id"), integer(cfg, "num-partitions"), str(
        cfg.get("device", "auto"))


def _load(task: ClientTask, context: Context) -> tuple[int, ArrayData, ArrayData, torch.device]:
    pid, num, device = _site(context)
    train, val = client_partition(task.dataset, pid, num, task.train.seed)
    return pid, train, val, pick_device(device)


def _model(task: ClientTask, data: ArrayData, arrays: ArrayRecord) -> torch.nn.Module:
    shape = tuple(data.x.shape[1:])
    model = build_model(task.model, shape, data.num_classes)  # type: ignore[arg-type]
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    return model


def _privacy_state(context: Context, task: ClientTask, n: int) -> PrivacyState:
    """The client's state; σ is calibrated on first use for the whole planned schedule."""
    known = load_state(context)
    if known is not None:
        return known
    tc = task.train
    q, _, total = planned_poisson_schedule(
        num_samples=n, batch_size=tc.batch_size, local_epochs=tc.local_epochs, rounds=tc.rounds
    )
    sigma = calibrate_noise_multiplier(
        target_epsilon=task.privacy.target_epsilon, delta=task.privacy.delta,
        sample_rate=q, steps=total, accountant=task.privacy.accountant,
    )
    return PrivacyState(sigma)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model with DP-SGD on this client's data."""
    with _report_failures(context.node_config.get("partition-id", "?")):
        config = config_record(msg.content)
        task = from_flat(ClientTask, dict(config))
        server_round = integer(config, "server-round")
        if server_round > task.train.rounds:
            raise ConfigError(
                f"server-round={server_round}: beyond the {task.train.rounds} rounds "
                "this client's noise was calibrated for"
            )
        pid, train_data, _, device = _load(task, context)
        model = _model(task, train_data, array_record(msg.content))
        state = _privacy_state(context, task, len(train_data))
        sigma = state.noise_multiplier
        torch.set_num_threads(max(1, integer(config, "num-threads")))
        result = dp_train_round(
            model, train_data, task,
            lr=number(config, "lr"), noise_multiplier=sigma, history=state.history,
            seed=derive_seed(task.train.seed, server_round, pid), device=device,
        )
        # Persist the spend before the update leaves this function.
        save_state(context, PrivacyState(sigma, result.history))
        metrics = MetricRecord({
            "num-examples": len(train_data),
            "client": pid,
            "train_loss": result.train_loss,
            "epsilon": result.epsilon,
            "delta": task.privacy.delta,
            "noise_multiplier": sigma,
            "sample_rate": result.sample_rate,
            "steps": result.steps,
            "total_steps": sum(k for _, _, k in result.history),
        })
        arrays = ArrayRecord(model.to("cpu").state_dict())
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this client's local validation split."""
    with _report_failures(context.node_config.get("partition-id", "?")):
        task = from_flat(ClientTask, dict(config_record(msg.content)))
        pid, _, val, device = _load(task, context)
        model = _model(task, val, array_record(msg.content))
        probs = predict(model, val, device)
        correct = float((probs.argmax(1) == val.y).sum()) if len(val) else 0.0
        nll = -torch.log(torch.from_numpy(probs[range(len(val)), val.y]).clamp_min(1e-12))
        metrics = MetricRecord({
            "num-examples": len(val),
            "client": pid,
            "accuracy": correct / max(1, len(val)),
            "loss": float(nll.mean()) if len(val) else 0.0,
        })
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)
