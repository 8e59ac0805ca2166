"""Local DP: the update is clipped as Flower's LocalDpMod clips it, then noised with std σC."""

import numpy as np
import pytest
import torch

from clients.local_dp import local_release, privatize_update
from privacy import epsilon

GLOBAL = {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0])}


def test_an_update_above_the_bound_is_scaled_to_it_by_hand():
    # u = ([4, 1] - [1, 1], [4] - [0]) = ([3, 0], [4]): norm 5, C = 1 -> u / 5.
    trained = {"w": torch.tensor([4.0, 1.0]), "b": torch.tensor([4.0])}

    out = privatize_update(trained, GLOBAL, clipping_norm=1.0, noise_multiplier=1e-9,
                           noise_generator="torch", seed=0)

    assert out["w"].tolist() == pytest.approx([1.6, 1.0], abs=1e-6)
    assert out["b"].tolist() == pytest.approx([0.8], abs=1e-6)


def test_clipping_matches_flowers_local_dp_mod(monkeypatch):
    # Prepare: the same update through Flower's LocalDpMod with (almost) no noise.
    from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
    from flwr.clientapp.mod import LocalDpMod
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)  # Message() reads the process's run

    rng = np.random.default_rng(0)
    start = {"w": rng.normal(size=(4, 3)).astype(np.float32)}
    trained = {"w": start["w"] + rng.normal(size=(4, 3)).astype(np.float32)}
    mod = LocalDpMod(clipping_norm=0.5, sensitivity=0.5, epsilon=1e12, delta=1e-5)
    msg = Message(RecordDict({"arrays": ArrayRecord({"w": Array(start["w"])})}), dst_node_id=1,
                  message_type="train")

    def handler(m, ctx):
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(trained["w"])})}),
                       reply_to=m)

    flower = mod(msg, Context(1, 1, {}, RecordDict(), {}), handler).content["arrays"]["w"]
    ours = privatize_update({k: torch.from_numpy(v) for k, v in trained.items()},
                            {k: torch.from_numpy(v) for k, v in start.items()},
                            clipping_norm=0.5, noise_multiplier=1e-12,
                            noise_generator="torch", seed=0)["w"]

    np.testing.assert_allclose(ours.numpy(), flower.numpy(), atol=1e-6)


def test_the_noise_has_std_sigma_times_c():
    zeros = {"w": torch.zeros(20_000)}
    out = privatize_update(zeros, zeros, clipping_norm=0.5, noise_multiplier=4.0,
                           noise_generator="torch", seed=3)["w"].numpy()
    assert out.std() == pytest.approx(2.0, abs=0.05)  # sigma * C = 2; s.e. ~0.01
    again = privatize_update(zeros, zeros, clipping_norm=0.5, noise_multiplier=4.0,
                             noise_generator="torch", seed=3)["w"].numpy()
    assert np.array_equal(out, again)


def test_a_local_release_is_accounted_as_replace_one_at_twice_the_sensitivity():
    # sigma relative to C, against sensitivity 2C: add/remove-one at sigma / 2, q = 1.
    rounds = [local_release(4.0)] * 5
    assert epsilon(history=rounds, delta=1e-5, accountant="rdp") == pytest.approx(
        epsilon(history=[(2.0, 1.0, 5)], delta=1e-5, accountant="rdp"))
