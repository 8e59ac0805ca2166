"""What leaves a site: only model arrays and the declared metrics, never raw records.

A real simulation (Flower's Ray engine, fedpriv's ClientApp unchanged) over two
CSV sites with federated normalisation, so a site answers all three message
types: the statistics query, training and evaluation. The server's Grid is
wrapped (``record_replies.py``) to describe every reply that reaches it.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.export import export_sites

pytestmark = pytest.mark.slow

RECORDER = Path(__file__).with_name("record_replies.py")
NUM_FEATURES = 64  # digits: 8 x 8 pixels

# The contract, written out: what each reply may carry.
TRAIN_METRICS = {"num-examples", "client", "train_loss", "epsilon", "delta",
                 "noise_multiplier", "sample_rate", "steps", "total_steps", "max_grad_norm",
                 "epsilon-cap", "can-afford-next"}
EVAL_METRICS = {"num-examples", "client", "accuracy", "loss"}
# A ledger charge (privacy.ledger.Charge's fields) plus the site's row number and hash.
LEDGER_KEYS = {"run_id", "round", "site", "level", "noise_multiplier", "clipping_norm",
               "sample_rate", "steps", "delta", "sampling", "relation", "mechanism",
               "noise_generator", "num_records", "epsilon_cap", "epsilon_reported",
               "accountant", "source", "seq", "hash", "binding-cap"}
STATISTICS_KEYS = {"sum", "sum_sq", "count", "noise_multiplier", "clip"}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("messages")
    paths = export_sites("digits", "csv", 2, root / "data")
    overrides = [
        "dataset=csv", "dataset.sites=[" + ",".join(str(p) for p in paths) + "]",
        "dataset.labels=[0,1,2,3,4,5,6,7,8,9]", f"dataset.test_path={root}/data/test.csv",
        "dataset.preprocess=[{name: clean},{name: normalize, mode: federated, clip: 5.0, "
        "noise_multiplier: 5.0}]",
        "train.rounds=1", "output.progress=false",
    ]
    out = subprocess.run([sys.executable, str(RECORDER), str(root), *overrides],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads((root / "replies.json").read_text())
    return data["sent"], data["replies"]


def _scalar(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_ledger(record):
    assert record["kind"] == "config"
    assert set(record["values"]) <= LEDGER_KEYS, set(record["values"]) - LEDGER_KEYS
    for key, value in record["values"].items():
        assert _scalar(value) or (isinstance(value, str) and len(value) <= 256), (key, value)


def test_every_reply_type_was_seen_and_none_failed(recorded):
    _, replies = recorded
    assert {r["type"] for r in replies} == {"query", "train", "evaluate"}
    assert len(replies) == 2 * 3  # two sites, three messages each
    assert not [r for r in replies if "error" in r]


def test_training_replies_carry_the_model_arrays_metrics_and_charge_only(recorded):
    sent, replies = recorded
    # The arrays a site returns have exactly the keys, shapes and dtypes the server sent.
    model = next(m for m in sent if m["type"] == "train")["records"]["arrays"]["arrays"]
    for reply in (r for r in replies if r["type"] == "train"):
        records = reply["records"]
        assert set(records) == {"arrays", "metrics", "ledger"}
        assert records["arrays"]["arrays"] == model
        metrics = records["metrics"]["values"]
        assert set(metrics) <= TRAIN_METRICS, set(metrics) - TRAIN_METRICS
        assert all(_scalar(v) for v in metrics.values()), metrics
        _check_ledger(records["ledger"])


def test_evaluation_replies_carry_declared_scalar_metrics_only(recorded):
    _, replies = recorded
    for reply in (r for r in replies if r["type"] == "evaluate"):
        assert set(reply["records"]) == {"metrics"}
        metrics = reply["records"]["metrics"]["values"]
        assert set(metrics) <= EVAL_METRICS, set(metrics) - EVAL_METRICS
        assert all(_scalar(v) for v in metrics.values()), metrics


def test_statistics_replies_carry_noised_sums_of_fixed_size_only(recorded):
    _, replies = recorded
    for reply in (r for r in replies if r["type"] == "query"):
        records = reply["records"]
        assert set(records) == {"statistics", "ledger"}
        stats = records["statistics"]["values"]
        assert set(stats) == STATISTICS_KEYS
        # One sum per feature, whatever the number of records: no record leaves.
        assert len(stats["sum"]) == len(stats["sum_sq"]) == NUM_FEATURES
        assert all(len(stats[k]) == 1 for k in ("count", "noise_multiplier", "clip"))
        assert not float(stats["count"][0]).is_integer()  # the count is noised too
        _check_ledger(records["ledger"])
