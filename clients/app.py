"""The fedpriv ClientApp (Flower Message API).

Each round the server sends the global model and a ``ConfigRecord`` holding
the flattened :class:`~clients.config.ClientTask` plus ``server-round`` and
``lr``. The client trains with DP-SGD on its own partition and replies with a
plain state dict, its metrics and the hash of its ledger charge. Its privacy
state is its own ledger (``clients.state``): σ, calibrated once per run, and
every release it ever made, which its ε cap bounds. A site whose next round
would cross its cap declines with a structured ``budget_exhausted`` reply.

Work that is a pure function of the run's settings (the bundled data pool and
its cut, σ calibration, ε of a history) is remembered by the worker process's
:class:`~clients.cache.WorkerCache`; it changes no value, only how often it is
computed.
"""

from __future__ import annotations

import functools
import hashlib
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.adversary import flip_labels, poison_update
from clients.allocator import keep_freed_memory
from clients.audit import attach_canary_block, site_canaries
from clients.cache import WorkerCache, worker_cache
from clients.charging import Caps, Refusal, caps_of, charge
from clients.config import ClientTask, ConfigError, from_flat
from clients.data import ArrayData
from clients.loaders import LoaderError
from clients.local_dp import local_release, privatize_update
from clients.models import build_model
from clients.noise import secure_gaussian
from clients.preprocess import STATISTICS_SENSITIVITY, PreprocessError, local_statistics
from clients.records import (
    array_record,
    charge_record,
    config_record,
    integer,
    number,
    numbers,
)
from clients.schema import SchemaError
from clients.sitedata import (
    CLIENT_CUT_KEY,
    STATS_MEAN_KEY,
    STATS_STD_KEY,
    SiteData,
    cleaned_features,
    load_site_data,
    statistics_step,
)
from clients.state import Site, run_history, site_history, site_of
from clients.train import dp_train_round, pick_device, plain_train_round, predict
from privacy import GaussianRelease, compress, planned_poisson_schedule
from privacy.budget import check_budget
from privacy.ledger import LedgerRow

__all__ = ["app", "ClientFailure", "derive_seed"]

app = ClientApp()
# Flower pickles `app` with every message, so nothing on it outlives a call. What a
# worker keeps between messages is its process's WorkerCache (clients.cache): each
# handler takes it from worker_cache() once per message and passes it down. It is
# created on a worker's first message, lives as long as the worker process, is
# bounded, and holds only pure results (never privacy state: that is the ledger).


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


def _load(task: ClientTask, site: Site, context: Context, config: ConfigRecord,
          cache: WorkerCache) -> tuple[SiteData, torch.device]:
    stats = None
    if STATS_MEAN_KEY in config:
        stats = (numbers(config, STATS_MEAN_KEY), numbers(config, STATS_STD_KEY))
    cut = str(config[CLIENT_CUT_KEY]) if config.get(CLIENT_CUT_KEY) else None
    data = cache.site_data(
        task.dataset, partition_id=site.partition_id, num_partitions=site.num_partitions,
        seed=task.train.seed, stats=stats, state_dir=site.state_dir,
        load=lambda: load_site_data(
            task.dataset, node_config=context.node_config, partition_id=site.partition_id,
            num_partitions=site.num_partitions, seed=task.train.seed, state_dir=site.state_dir,
            stats=stats, partition=functools.partial(cache.client_partition, cut=cut)))
    return data, pick_device(site.device)


def _model(task: ClientTask, data: ArrayData, arrays: ArrayRecord) -> torch.nn.Module:
    shape = tuple(data.x.shape[1:])
    model = build_model(task.model, shape, data.num_classes)  # type: ignore[arg-type]
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    return model


def _sigma(task: ClientTask, known: float | None, q: float, total_steps: int,
           prior: list[GaussianRelease], cache: WorkerCache) -> float:
    """This run's σ: read back from its first charge, else calibrated for the whole schedule.

    ``prior``: this run's earlier releases at other levels (the statistics
    round), composed in so that the site's total stays within the target.
    """
    if known is not None:
        return known
    return cache.noise_multiplier(
        target_epsilon=task.privacy.target_epsilon, delta=task.privacy.delta,
        sample_rate=q, steps=total_steps, accountant=task.privacy.accountant, prior=prior,
    )


@dataclass(frozen=True)
class _Plan:
    """One round's release at a site, checked against its cap and charged."""

    sigma: float
    planned: GaussianRelease
    run_history: list[GaussianRelease]
    lifetime: list[GaussianRelease]
    caps: Caps
    charge: LedgerRow

    @property
    def epsilon_run(self) -> float:
        """This run's sample-level ε at the site after the round (what it reports)."""
        return float(self.charge.charge.epsilon_reported or 0.0)


def _decline(msg: Message, site: Site, refusal: Refusal) -> Message:
    """The structured reply of a site whose budget cannot pay for this round."""
    check = refusal.check
    metrics = MetricRecord({
        "client": site.partition_id, "declined": 1, "num-examples": 0,
        "epsilon-spent": check.spent if check.spent is not None else -1.0,
        "epsilon-after": check.after,
        "epsilon-cap": check.cap if check.cap is not None else -1.0,
    })
    status = ConfigRecord({"status": "budget_exhausted", "site": site.name,
                           "binding-cap": refusal.binding, "reason": check.explain()})
    return Message(RecordDict({"metrics": metrics, "status": status}), reply_to=msg)


def _data_error(msg: Message, site: Site, ex: Exception) -> Message:
    """The structured reply of a site whose data failed to load or validate.

    The round goes on without it; the server logs the site and the reason. The
    reason names the file and the problem, never a record's content.
    """
    status = ConfigRecord({"status": "data_error", "site": site.name,
                           "reason": f"{type(ex).__name__}: {ex}"})
    metrics = MetricRecord({"client": site.partition_id, "declined": 1, "num-examples": 0})
    return Message(RecordDict({"metrics": metrics, "status": status}), reply_to=msg)


# What a site's own data can get wrong (a missing or corrupt file, a wrong schema,
# nothing left after cleaning): answered with a data_error reply, not a crash.
DATA_ERRORS: tuple[type[Exception], ...] = (LoaderError, PreprocessError, SchemaError)


def _plan_and_charge(task: ClientTask, site: Site, run_id: str, server_round: int,
                     n: int, cache: WorkerCache) -> _Plan | Refusal:
    """Check the site's cap, then commit this round's DP-SGD charge to its ledger."""
    pc, tc = task.privacy, task.train
    q, per_round, total = planned_poisson_schedule(
        num_samples=n, batch_size=tc.batch_size, local_epochs=tc.local_epochs,
        rounds=tc.rounds)
    caps = caps_of(site, pc)
    with site.ledger() as ledger:
        known_sigma, run_hist = run_history(ledger, run_id, site.name)
        other_levels = [r.charge.release() for r in ledger.rows(run_id=run_id, site=site.name)
                        if r.charge.level != "sample"]
        sigma = _sigma(task, known_sigma, q, total, other_levels, cache)
        planned = GaussianRelease(sigma, q, per_round)
        lifetime = site_history(ledger, site.name)
        row = charge(ledger, site=site, pc=pc, caps=caps, run_id=run_id,
                     server_round=server_round, level="sample", release=planned,
                     clipping_norm=pc.max_grad_norm, num_records=n, memo=cache.epsilon)
    if isinstance(row, Refusal):
        return row
    return _Plan(sigma, planned, run_hist, lifetime, caps, row)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model with DP-SGD on this client's data.

    Order matters: check the site's budget, charge its ledger (committed),
    train, and only then let the update leave (write-ahead charging).
    """
    with _report_failures(context.node_config.get("partition-id", "?")):
        keep_freed_memory()  # this worker's activations, reused call to call
        cache = worker_cache()
        config = config_record(msg.content)
        task = from_flat(ClientTask, dict(config))
        server_round = integer(config, "server-round")
        if server_round > task.train.rounds:
            raise ConfigError(
                f"server-round={server_round}: beyond the {task.train.rounds} rounds "
                "this client's noise was calibrated for"
            )
        site = site_of(context, config)
        try:
            data, device = _load(task, site, context, config, cache)
        except DATA_ERRORS as ex:
            return _data_error(msg, site, ex)
        train_data = data.train
        pc = task.privacy
        attacking = _attacking(task, site, context)
        if attacking and task.adversary.name == "label_flip":
            train_data = flip_labels(train_data)
        # audit=sample: the site's included canaries are records too, charged with them.
        canaries = site_canaries(task, site.partition_id, site.num_partitions)
        records = len(train_data) + (canaries.included if canaries is not None else 0)
        if "sample" not in pc.levels:
            return _train_without_sample_dp(msg, context, task, site, train_data, attacking,
                                            cache)
        plan = _plan_and_charge(task, site, str(context.run_id), server_round, records, cache)
        if isinstance(plan, Refusal):
            return _decline(msg, site, plan)
        local = _charge_local(task, site, str(context.run_id), server_round, records, cache)
        if isinstance(local, Refusal):
            return _decline(msg, site, local)
        # Charged and committed: from here a crash over-counts, never under-counts.
        model = _model(task, train_data, array_record(msg.content))
        torch.set_num_threads(max(1, integer(config, "num-threads")))
        result = dp_train_round(
            model, train_data, task,
            lr=number(config, "lr"), noise_multiplier=plan.sigma,
            history=[(r.noise_multiplier, r.sample_rate, r.steps) for r in plan.run_history],
            # The ledger row number makes every charged release draw fresh noise: a
            # re-run round, or a second run at the same site with the same seed,
            # never reuses noise (reused noise cancels out of a difference).
            seed=derive_seed(task.train.seed, server_round, site.partition_id, plan.charge.seq),
            device=device,
            noise_generator=pc.noise_generator, augment=data.augment,
            # FedProx: the server's strategy sends its mu with the round's config.
            proximal_mu=number(config, "proximal-mu") if "proximal-mu" in config else 0.0,
            canaries=canaries.membership if canaries is not None else None,
        )
        _check_charged(plan, result.history)
        weights = model.to("cpu").state_dict()
        if local is not None:
            weights = _local_dp(weights, msg, task, site, server_round, local)
        if attacking and task.adversary.name != "label_flip":
            weights = poison_update(weights, array_record(msg.content).to_torch_state_dict(),
                                    task.adversary,
                                    seed=derive_seed(task.train.seed, server_round,
                                                     site.partition_id, "adversary"))
        reply = _reply(msg, site, task, plan, len(train_data), result.train_loss,
                       ArrayRecord(weights), cache)
        if local is not None:
            reply.content["ledger-local"] = charge_record(local)
        return attach_canary_block(reply, result.canary_block)


def _charge_local(task: ClientTask, site: Site, run_id: str, server_round: int,
                  n: int, cache: WorkerCache) -> LedgerRow | Refusal | None:
    """Local DP (``privacy.levels`` has ``local``): check the cap, then commit this round's
    release to the site's ledger, before anything is trained or sent."""
    pc = task.privacy
    if "local" not in pc.levels:
        return None
    with site.ledger() as ledger:
        return charge(ledger, site=site, pc=pc, caps=caps_of(site, pc), run_id=run_id,
                      server_round=server_round, level="local",
                      release=local_release(pc.local_noise_multiplier),
                      clipping_norm=pc.local_clipping_norm, num_records=n, memo=cache.epsilon)


def _local_dp(weights: dict[str, torch.Tensor], msg: Message, task: ClientTask, site: Site,
              server_round: int, row: LedgerRow) -> dict[str, torch.Tensor]:
    """The charged local release: the update clipped and noised (``clients.local_dp``)."""
    pc = task.privacy
    return privatize_update(
        weights, array_record(msg.content).to_torch_state_dict(),
        clipping_norm=pc.local_clipping_norm, noise_multiplier=pc.local_noise_multiplier,
        noise_generator=pc.noise_generator,
        seed=derive_seed(task.train.seed, server_round, site.partition_id, row.seq, "local"))


def _train_without_sample_dp(msg: Message, context: Context, task: ClientTask, site: Site,
                             train_data: ArrayData, attacking: bool,
                             cache: WorkerCache) -> Message:
    """A round without DP-SGD: plain SGD, then local DP if configured (client-level DP,
    if configured, happens at the server). The reply carries the local charge, or
    only the site's name when the site itself releases nothing noised."""
    config = config_record(msg.content)
    server_round = integer(config, "server-round")
    pc = task.privacy
    local = _charge_local(task, site, str(context.run_id), server_round, len(train_data),
                          cache)
    if isinstance(local, Refusal):
        return _decline(msg, site, local)
    model = _model(task, train_data, array_record(msg.content))
    torch.set_num_threads(max(1, integer(config, "num-threads")))
    loss = plain_train_round(
        model, train_data, task, lr=number(config, "lr"),
        seed=derive_seed(task.train.seed, server_round, site.partition_id, "plain"),
        device=pick_device(site.device),
        proximal_mu=number(config, "proximal-mu") if "proximal-mu" in config else 0.0)
    weights = model.to("cpu").state_dict()
    if local is not None:
        weights = _local_dp(weights, msg, task, site, server_round, local)
    if attacking and task.adversary.name != "label_flip":
        weights = poison_update(weights, array_record(msg.content).to_torch_state_dict(),
                                task.adversary, seed=derive_seed(
                                    task.train.seed, server_round, site.partition_id,
                                    "adversary"))
    cap = caps_of(site, pc).cap
    metrics = MetricRecord({
        "num-examples": len(train_data), "client": site.partition_id, "train_loss": loss,
        "epsilon": 0.0, "delta": pc.delta, "noise_multiplier": 0.0, "sample_rate": 1.0,
        "steps": 0, "total_steps": 0, "max_grad_norm": pc.max_grad_norm,
        "epsilon-local": float(local.charge.epsilon_reported or 0.0) if local else 0.0,
        "epsilon-cap": cap if cap is not None else -1.0, "can-afford-next": 1,
    })
    identity = charge_record(local) if local is not None else ConfigRecord({"site": site.name})
    return Message(RecordDict({"arrays": ArrayRecord(weights), "metrics": metrics,
                               "ledger" if local is not None else "site": identity}),
                   reply_to=msg)


def _attacking(task: ClientTask, site: Site, context: Context) -> bool:
    """Whether this client is a simulated adversary (``adversary.*``); a deployed site
    (one with its own ``state-dir``) refuses to be one."""
    if not task.adversary.attacks(site.partition_id):
        return False
    if context.node_config.get("state-dir"):
        raise ConfigError(f"adversary.name={task.adversary.name!r}: simulated attacks run in "
                          "simulation only; this deployed site refuses to attack")
    return True


def _check_charged(plan: _Plan, history: list[tuple[float, float, int]]) -> None:
    """Withhold the update unless what Opacus' accountant saw is exactly what was charged."""
    charged = compress([*plan.run_history, plan.planned])
    if sorted(compress(history)) != sorted(charged):
        raise RuntimeError(
            f"Opacus accounted {compress(history)} but the ledger charged {charged} "
            "(sigma, q, steps); the update is withheld"
        )


def _reply(msg: Message, site: Site, task: ClientTask, plan: _Plan, n: int, train_loss: float,
           arrays: ArrayRecord, cache: WorkerCache) -> Message:
    pc = task.privacy
    next_round = None if plan.caps.cap is None else check_budget(
        spent=[*plan.lifetime, plan.planned], planned=[plan.planned], cap=plan.caps.cap,
        delta=pc.delta, accountant=pc.accountant, memo=cache.epsilon)
    metrics = MetricRecord({
        "num-examples": n,
        "client": site.partition_id,
        "train_loss": train_loss,
        "epsilon": plan.epsilon_run,
        "delta": pc.delta,
        "noise_multiplier": plan.sigma,
        "sample_rate": plan.planned.sample_rate,
        "steps": plan.planned.steps,
        "total_steps": sum(r.steps for r in plan.run_history) + plan.planned.steps,
        "max_grad_norm": pc.max_grad_norm,
        "epsilon-cap": plan.caps.cap if plan.caps.cap is not None else -1.0,
        "can-afford-next": int(next_round is None or next_round.allowed),
    })
    ledger_info = charge_record(plan.charge)
    ledger_info["binding-cap"] = plan.caps.binding
    return Message(RecordDict({"arrays": arrays, "metrics": metrics, "ledger": ledger_info}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this client's local validation split."""
    with _report_failures(context.node_config.get("partition-id", "?")):
        keep_freed_memory()
        cache = worker_cache()
        task = from_flat(ClientTask, dict(config_record(msg.content)))
        config = config_record(msg.content)
        site = site_of(context, config)
        try:
            data, device = _load(task, site, context, config, cache)
        except DATA_ERRORS as ex:
            return _data_error(msg, site, ex)
        val = data.val
        model = _model(task, val, array_record(msg.content))
        probs = predict(model, val, device)
        correct = float((probs.argmax(1) == val.y).sum()) if len(val) else 0.0
        nll = -torch.log(torch.from_numpy(probs[range(len(val)), val.y]).clamp_min(1e-12))
        metrics = MetricRecord({
            "num-examples": len(val),
            "client": site.partition_id,
            "accuracy": correct / max(1, len(val)),
            "loss": float(nll.mean()) if len(val) else 0.0,
        })
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The statistics round: clipped, Gaussian-noised feature sums of this site's data.

    Charged (level ``statistics``) before the sums leave, like any release;
    declined, like a training round, when the site's cap cannot pay for it.
    """
    with _report_failures(context.node_config.get("partition-id", "?")):
        cache = worker_cache()
        config = config_record(msg.content)
        task = from_flat(ClientTask, dict(config))
        step = statistics_step(task.dataset)
        if step is None:
            raise ConfigError("statistics query, but dataset.preprocess has no "
                              "normalize step with mode=federated")
        site = site_of(context, config)
        try:
            x, n = cleaned_features(task.dataset, node_config=context.node_config,
                                    partition_id=site.partition_id,
                                    num_partitions=site.num_partitions, seed=task.train.seed,
                                    partition=cache.client_partition)
        except DATA_ERRORS as ex:
            return _data_error(msg, site, ex)
        pc = task.privacy
        sigma, clip = float(step["noise_multiplier"]), float(step["clip"])
        release = GaussianRelease(sigma, 1.0, 1, sampling="none")
        with site.ledger() as ledger:
            row = charge(ledger, site=site, pc=pc, caps=caps_of(site, pc),
                         run_id=str(context.run_id), server_round=0, level="statistics",
                         release=release, clipping_norm=STATISTICS_SENSITIVITY, num_records=n,
                         memo=cache.epsilon)
        if isinstance(row, Refusal):
            return _decline(msg, site, row)
        if pc.noise_generator == "secure":
            stats = local_statistics(x, clip=clip, noise_multiplier=sigma, rng=None,
                                     noise=lambda shape, std: secure_gaussian(
                                         shape, std, dtype=torch.float64).numpy())
        else:
            seed = derive_seed(task.train.seed, 0, site.partition_id, row.seq)
            stats = local_statistics(x, clip=clip, noise_multiplier=sigma,
                                     rng=np.random.default_rng(seed))
        return Message(RecordDict({"statistics": ConfigRecord(dict(stats.to_lists())),  # type: ignore[arg-type]
                                   "ledger": charge_record(row)}), reply_to=msg)


@app.query("identify")
def identify(msg: Message, context: Context) -> Message:
    """The site's name and partition id, which the server's seeded client selection is
    keyed on (``strategies.selection``); nothing about its data."""
    with _report_failures(context.node_config.get("partition-id", "?")):
        site = site_of(context, config_record(msg.content))
        return Message(RecordDict({"site": ConfigRecord({"site": site.name,
                                                         "client": site.partition_id})}),
                       reply_to=msg)
