"""FedProx's proximal term: added to the privatised gradient, never clipped with the data's."""

import numpy as np
import pytest
import torch
from torch import nn

from clients.train import add_proximal_term


def test_one_sgd_step_adds_mu_times_the_distance_to_the_anchor():
    # Prepare: w = [1, 2], gradient [0.5, 0.5], anchor [0, 0], mu = 0.1, lr = 1.
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = torch.optim.SGD([w], lr=1.0)
    add_proximal_term(opt, [torch.zeros(2)], mu=0.1)
    w.grad = torch.tensor([0.5, 0.5])

    opt.step()

    # By hand: w - lr * (g + mu * (w - anchor)) = [1 - 0.5 - 0.1, 2 - 0.5 - 0.2].
    torch.testing.assert_close(w.detach(), torch.tensor([0.4, 1.3]))


def test_the_term_survives_opacus_clipping_because_it_is_added_after_it():
    # Prepare: a linear model under Opacus with a clipping norm so small that the data's
    # gradient is ~0 after clipping, no noise, one full-batch step; anchor at zero.
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    add_proximal_term(opt, [torch.zeros_like(p) for p in w0], mu=0.2)
    rng = np.random.default_rng(0)
    data = TensorDataset(torch.from_numpy(rng.normal(size=(8, 3)).astype(np.float32)),
                         torch.from_numpy(rng.integers(0, 2, 8)))
    dp_model, dp_opt, loader = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=8),
        noise_multiplier=0.0, max_grad_norm=1e-9, poisson_sampling=False)

    for x, y in loader:
        dp_opt.zero_grad()
        nn.functional.cross_entropy(dp_model(x), y).backward()
        dp_opt.step()

    # Only the proximal step moved the weights: w1 = w0 - lr * mu * (w0 - 0) = 0.9 w0.
    for p, p0 in zip(model.parameters(), w0, strict=True):
        torch.testing.assert_close(p.detach(), 0.9 * p0, atol=1e-6, rtol=0)


def test_bad_arguments_are_refused():
    w = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="mu=0"):
        add_proximal_term(torch.optim.SGD([w], lr=1.0), [torch.zeros(2)], mu=0.0)
    with pytest.raises(ValueError, match="1 anchors for 2"):
        add_proximal_term(torch.optim.SGD([w, nn.Parameter(torch.zeros(1))], lr=1.0),
                          [torch.zeros(2)], mu=0.1)
