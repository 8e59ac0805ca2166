"""Every model trains a DP-SGD round under Opacus' ghost clipping (the transformer included)."""

import numpy as np
import pytest
import torch

from clients.config import ClientTask, ModelConfig, PrivacyConfig, TrainConfig
from clients.data import ArrayData
from clients.models import MODELS, build_model
from clients.train import dp_train_round


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_trains_with_ghost_clipping(name):
    # Prepare
    rng = np.random.default_rng(0)
    data = ArrayData(rng.uniform(-1, 1, size=(32, 1, 8, 8)).astype(np.float32),
                     rng.integers(0, 10, size=32).astype(np.int64), 10)
    task = ClientTask(model=ModelConfig(name=name),
                      train=TrainConfig(rounds=1, local_epochs=1, batch_size=16),
                      privacy=PrivacyConfig(grad_sample_mode="ghost"))
    model = build_model(task.model, (1, 8, 8), 10, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Execute
    result = dp_train_round(model, data, task, lr=0.1, noise_multiplier=1.0, history=[],
                            seed=0, device=torch.device("cpu"))
    # Assert: it ran its steps and moved every weight, to finite values
    after = model.state_dict()
    assert result.steps == 2 and np.isfinite(result.train_loss)
    assert all(torch.isfinite(after[k]).all() and not torch.equal(after[k], before[k])
               for k in before)
