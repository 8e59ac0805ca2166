"""Where a site's data comes from, and that augmentation keeps DP-SGD's accounting."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from clients.config import ClientTask, ConfigError, DatasetConfig, PrivacyConfig, TrainConfig
from clients.sitedata import load_site_data, server_test_data, site_source
from clients.train import dp_train_round
from privacy import compress, planned_poisson_schedule


def test_a_deployed_sites_node_config_names_its_file(tmp_path):
    cfg = DatasetConfig(name="csv", sites=("a.csv", "b.csv"))
    assert site_source(cfg, {}, 1) == (tmp_path.__class__("b.csv"), "csv")
    node = {"data-path": str(tmp_path / "mine.parquet"), "data-format": "parquet"}
    assert site_source(cfg, node, 1) == (tmp_path / "mine.parquet", "parquet")
    with pytest.raises(ConfigError, match="no file for client 2"):
        site_source(cfg, {}, 2)


def test_site_files_without_a_test_file_have_no_central_test_set():
    cfg = DatasetConfig(name="csv", sites=("a.csv",), labels=(0, 1), features=("x",))
    assert server_test_data(cfg, seed=0) is None


def test_a_site_file_is_read_cleaned_and_split(tmp_path):
    # Prepare: 40 clean rows, one NaN row, one duplicate, one unknown label.
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=40), "b": rng.normal(size=40),
                          "target": np.arange(40) % 2})
    extra = pd.DataFrame({"a": [np.nan, frame.a[0], 1.0], "b": [0.0, frame.b[0], 1.0],
                          "target": [0, frame.target[0], 7]})
    path = tmp_path / "site.csv"
    pd.concat([frame, extra]).to_csv(path, index=False)
    cfg = DatasetConfig(name="csv", sites=(str(path),), label_column="target", labels=(0, 1),
                        features=("a", "b"), val_fraction=0.25,
                        preprocess=({"name": "clean"},))

    data = load_site_data(cfg, node_config={}, partition_id=0, num_partitions=1, seed=0,
                          state_dir=tmp_path / "state")

    assert len(data.train) + len(data.val) == 40 and len(data.val) == 10
    assert data.report["clean"]["dropped"] == {"nonfinite": 1, "unknown_label": 1,
                                               "duplicate": 1}
    assert (tmp_path / "state" / "data_report.json").exists()


def test_augmented_training_accounts_exactly_the_planned_steps():
    cfg = DatasetConfig(preprocess=({"name": "augment", "crop": 1, "rotate": 10.0},))
    data = load_site_data(cfg, node_config={}, partition_id=0, num_partitions=3, seed=0)
    assert data.augment is not None
    task = ClientTask(dataset=cfg, train=TrainConfig(rounds=1, batch_size=64),
                      privacy=replace(PrivacyConfig(), accountant="rdp"))
    from clients.models import build_model

    model = build_model(task.model, (1, 8, 8), 10, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    result = dp_train_round(model, data.train, task, lr=0.5, noise_multiplier=1.0, history=[],
                            seed=0, device=torch.device("cpu"), augment=data.augment)

    q, steps, _ = planned_poisson_schedule(num_samples=len(data.train), batch_size=64,
                                           local_epochs=1, rounds=1)
    assert compress(result.history) == [(1.0, pytest.approx(q), steps)]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
