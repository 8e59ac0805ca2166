"""One round of local DP-SGD (Opacus) and plain evaluation.

The privacy state of a client is its accountant history, a list of
``(noise_multiplier, sample_rate, steps)``. It is passed in, extended by this
round's steps, and returned; the caller charges it to the site's ledger and
asks :func:`privacy.epsilon` for the cumulative ε. A fresh ``PrivacyEngine`` per
round is fine *because* its accountant is loaded with that whole history first.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from clients.canary import CanaryDataset, canary_weights, masked_loss, with_canaries
from clients.config import ClientTask
from clients.data import ArrayData
from clients.preprocess import Augment
from privacy import Release

__all__ = ["RoundResult", "add_proximal_term", "dp_train_round", "grad_sample_mode_for",
           "plain_train_round", "predict", "pick_device"]


@dataclass(frozen=True)
class RoundResult:
    history: list[Release]
    steps: int
    sample_rate: float
    train_loss: float
    noise_generator: str
    canary_block: np.ndarray | None = None  # audit=sample: the block's final values


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy``, quiet about read-only arrays (the worker cache shares its
    arrays read-only; training and prediction never write to their inputs)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _tensors(data: ArrayData) -> TensorDataset:
    return TensorDataset(_as_tensor(data.x), _as_tensor(data.y))


def add_proximal_term(optimizer: torch.optim.Optimizer, anchors: list[torch.Tensor],
                      mu: float) -> None:
    """FedProx (Li et al. 2020): add μ(w − w_global) to each gradient before every step.

    Equivalent to adding μ/2·||w − w_global||² to the loss, but applied where it
    is private: ``optimizer`` is the plain optimizer that Opacus' ``DPOptimizer``
    wraps, whose step runs *after* per-sample clipping and noise. The term
    depends only on the model (itself a function of earlier private releases)
    and on the public global weights, never on a record, so adding it after the
    Gaussian mechanism is post-processing and costs no privacy.

    Put in the loss instead, it would be wrong: Opacus replaces ``p.grad`` with
    the clipped, noised sum of the per-sample gradients its hooks computed from
    the layers' activations, so a term that does not pass through a layer's
    forward is silently dropped (hooks mode); and one that did would be clipped
    with each sample's gradient and shrunk by 1/B, which is no longer FedProx.
    (Like ``weight_decay``, which the plain optimizer also applies after the
    noise.)
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(params) != len(anchors):
        raise ValueError(f"{len(anchors)} anchors for {len(params)} parameters")
    if not mu > 0:
        raise ValueError(f"mu={mu}: must be > 0")

    def hook(opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        with torch.no_grad():
            for p, anchor in zip(params, anchors, strict=True):
                if p.grad is not None:
                    p.grad.add_(p.detach() - anchor, alpha=mu)

    optimizer.register_step_pre_hook(hook)


# Layers torch's ExpandedWeights (torch.nn.utils._expanded_weights) has per-sample
# gradient rules for: the functional calls of their forward passes.
EW_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.GroupNorm, nn.LayerNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)


def _seed_default_generator(seed: int, device: torch.device) -> None:
    """Seed torch's default generator for ``device``: the CPU's, or every device's.

    On the CPU only the CPU's: ``torch.manual_seed`` also queues a seed for each
    accelerator kind not started yet, formatting the call stack for each, which
    took 3 ms a call in a Ray worker (8 % of a client's training call).
    """
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def grad_sample_mode_for(model: nn.Module, mode: str, *, canaries: bool = False) -> str:
    """The Opacus ``grad_sample_mode`` that trains ``model`` for ``privacy.grad_sample_mode``.

    ``auto`` picks, by the layers that hold trainable weights:

    * ghost clipping (Li et al. 2022; Opacus' ``ghost``) when every one is an
      ``nn.Linear``: it needs no per-sample gradients and measured 2-4x faster
      than per-sample hooks there (``docs/benchmarks.md``);
    * otherwise torch's ExpandedWeights (Opacus' ``ew``) when every one is a
      layer ExpandedWeights computes per-sample gradients for
      (:data:`EW_LAYERS`: convolutions, embeddings, norms, linear): it
      computes them in the backward pass itself, in place of the batch
      gradient; measured on Fashion-MNIST (two runs), the transformer's
      DP-SGD epoch costs 1.50-1.72x a plain one with it against 1.94-2.14x
      with hooks, the CNN's 1.31x against 1.52-1.65x;
    * per-sample hooks otherwise, and whenever canaries train with the model
      (``audit=sample``: their grad sampler is registered for hooks).

    Every mode clips every record's whole gradient to the same norm and draws
    the same noise, so the choice changes the speed, not the result or the
    accounting (the tests train the same weights in each).
    """
    if mode != "auto":
        return mode
    if canaries:
        return "hooks"
    owners = [m for m in model.modules()
              if any(p.requires_grad for p in m.parameters(recurse=False))]
    if not owners:
        return "hooks"
    if all(isinstance(m, nn.Linear) for m in owners):
        return "ghost"
    # Exact types: a subclass may change forward in a way ExpandedWeights does not see.
    return "ew" if all(type(m) in EW_LAYERS for m in owners) else "hooks"


def _make_private(model: nn.Module, data: ArrayData, task: ClientTask, *, lr: float,
                  noise_multiplier: float, history: list[Release], seed: int,
                  augment: Augment | None = None, proximal_mu: float = 0.0,
                  canaries: np.ndarray | None = None, mode: str) -> tuple:
    """Opacus' engine, in Opacus ``grad_sample_mode`` ``mode``, its accountant loaded
    with the whole history."""
    from opacus import PrivacyEngine

    from clients.poisson import hold_no_batch

    pcfg, tcfg = task.privacy, task.train
    generator = torch.Generator().manual_seed(seed)
    dataset: Dataset = _tensors(data)
    if augment is not None and not augment.is_identity:
        # Per-sample augmentation inside the dataset: each record still yields one
        # clipped gradient per step, so the Poisson accounting is unchanged.
        dataset = augment.dataset(_as_tensor(data.x), _as_tensor(data.y),
                                  generator=torch.Generator().manual_seed(seed + 1))
    if canaries is not None:  # included canaries are records: Poisson-sampled alike
        dataset = CanaryDataset(dataset, canaries)
    loader = DataLoader(dataset, batch_size=tcfg.batch_size, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=tcfg.momentum,
                                weight_decay=tcfg.weight_decay)
    if proximal_mu > 0:  # anchored at the global model this round starts from
        add_proximal_term(optimizer, [p.detach().clone() for p in model.parameters()],
                          proximal_mu)
    criterion = nn.CrossEntropyLoss()
    # Opacus warns that secure_mode is off; the run records the generator used.
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    engine = PrivacyEngine(accountant=pcfg.accountant)
    engine.accountant.history = list(history)
    private = engine.make_private(
        module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=pcfg.max_grad_norm,
        poisson_sampling=True, grad_sample_mode=mode,
    )
    if mode == "ghost":
        dp_model, dp_opt, dp_crit, dp_loader = private
    else:
        (dp_model, dp_opt, dp_loader), dp_crit = private, criterion
    return engine, dp_model, dp_opt, dp_crit, hold_no_batch(dp_loader)


def dp_train_round(
    model: nn.Module,
    data: ArrayData,
    task: ClientTask,
    *,
    lr: float,
    noise_multiplier: float,
    history: list[Release],
    seed: int,
    device: torch.device,
    noise_generator: str = "torch",
    augment: Augment | None = None,
    proximal_mu: float = 0.0,
    canaries: np.ndarray | None = None,
) -> RoundResult:
    """Train ``model`` in place for ``task.train.local_epochs`` epochs of DP-SGD.

    Poisson sampling with rate ``1 / ceil(n / batch_size)``, per-sample
    clipping to ``max_grad_norm`` and Gaussian noise of std
    ``noise_multiplier * max_grad_norm`` (Abadi et al. 2016), drawn from
    ``noise_generator`` (:mod:`clients.noise`). ``proximal_mu`` > 0 adds
    FedProx's proximal term (:func:`add_proximal_term`). ``canaries``
    (``audit=sample``, :mod:`clients.audit`): the membership bits of the site's
    canaries; the included ones join the data set and a block of one coordinate
    per canary, starting at 0, trains with the model (hooks mode only); its
    final values are ``canary_block``. ``model`` itself stays the real model.
    """
    from clients.noise import use_noise_generator

    if noise_generator == "secure":
        seed = int.from_bytes(os.urandom(8), "big") >> 1
    _seed_default_generator(seed, device)  # Opacus draws its noise from it
    trained = model if canaries is None else with_canaries(
        model, len(canaries), magnitude=task.privacy.max_grad_norm)
    trained.to(device).train()
    losses: list[float] = []
    with warnings.catch_warnings():
        # Opacus' hooks fire on the first layer although the input needs no grad.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        mode = grad_sample_mode_for(trained, task.privacy.grad_sample_mode,
                                    canaries=canaries is not None)
        engine, dp_model, dp_opt, dp_crit, dp_loader = _make_private(
            trained, data, task, lr=lr, noise_multiplier=noise_multiplier, history=history,
            seed=seed, augment=augment, proximal_mu=proximal_mu, canaries=canaries, mode=mode)
        generator = use_noise_generator(dp_opt, noise_generator)
        for _ in range(task.train.local_epochs):
            for *inputs, yb in dp_loader:  # (x, y), or (x, canary_ids, y) with canaries
                inputs, yb = [t.to(device) for t in inputs], yb.to(device)
                dp_opt.zero_grad(set_to_none=True)
                if not len(yb) and mode == "ew":
                    # ExpandedWeights refuses a batch of 0. No record, no gradient: the
                    # step adds the noise alone, as the other modes' steps do.
                    for p in dp_opt.params:
                        p.grad_sample = p.new_zeros((0, *p.shape))
                    dp_opt.step()
                    continue
                out = dp_model(*inputs)
                # An empty Poisson batch still costs a step: noise only.
                if canaries is not None:
                    loss = masked_loss(out, yb, inputs[1])
                else:
                    loss = dp_crit(out, yb) if len(yb) else out.sum() * 0.0
                loss.backward()
                dp_opt.step()
                if len(yb):
                    losses.append(float(loss.detach()))
    # Detach Opacus' hooks and per-sample buffers: `model` is a plain module again.
    dp_model._close()
    new_history = [(float(s), float(q), int(n)) for s, q, n in engine.accountant.history]
    return RoundResult(
        history=new_history,
        steps=sum(n for _, _, n in new_history) - sum(n for _, _, n in history),
        sample_rate=float(dp_loader.sample_rate),
        train_loss=float(np.mean(losses)) if losses else float("nan"),
        noise_generator=generator,
        canary_block=None if canaries is None else canary_weights(trained),
    )


def plain_train_round(model: nn.Module, data: ArrayData, task: ClientTask, *, lr: float,
                      seed: int, device: torch.device, proximal_mu: float = 0.0) -> float:
    """Train ``model`` in place with plain minibatch SGD (no per-sample clipping, no noise).

    For runs without sample-level DP (``privacy.levels`` without ``sample``):
    the update is then protected only at the site level, by client-level or
    local DP. Shuffled batches from a generator seeded with ``seed``. Returns
    the mean training loss.
    """
    tcfg = task.train
    model.to(device).train()
    loader = DataLoader(_tensors(data), batch_size=tcfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=tcfg.momentum,
                                weight_decay=tcfg.weight_decay)
    if proximal_mu > 0:
        add_proximal_term(optimizer, [p.detach().clone() for p in model.parameters()],
                          proximal_mu)
    criterion = nn.CrossEntropyLoss()
    losses = []
    for _ in range(tcfg.local_epochs):
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(xb.to(device)), yb.to(device))
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    return float(np.mean(losses)) if losses else float("nan")


# predict's batch on the CPU: the CNN's activations at 256 images (13 MB a layer) stay
# in the cache, at 1,024 they do not. Measured over Fashion-MNIST's 12,000 test
# images on one thread: the CNN 4.6 s at 1,024, 2.5 s at 256 (the same probabilities,
# to the bit); the MLP and the transformer the same at both. GPUs keep 1,024.
PREDICT_BATCH_CPU, PREDICT_BATCH = 256, 1024


@torch.no_grad()
def predict(model: nn.Module, data: ArrayData, device: torch.device,
            batch_size: int | None = None) -> np.ndarray:
    """Class probabilities, shape ``(N, num_classes)``."""
    if batch_size is None:
        batch_size = PREDICT_BATCH_CPU if device.type == "cpu" else PREDICT_BATCH
    model.to(device).eval()
    x = _as_tensor(data.x)
    out = []
    for start in range(0, len(x), batch_size):  # slices: no per-record indexing
        xb = x[start:start + batch_size].to(device)
        out.append(torch.softmax(model(xb), dim=1).cpu().numpy())
    if not out:
        return np.zeros((0, data.num_classes), dtype=np.float32)
    return np.concatenate(out).astype(np.float64)
