"""Client-level DP: clip, sum over the replies, divide by the planned sample size, noise."""

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx

from strategies.client_dp import ClientLevelDP

GLOBAL = np.zeros(2)


def _zero_noise(server_round):
    return lambda shape, std: np.zeros(shape)


def _configured(msgs, m=3, sigma=1.0, clip=1.0, noise=_zero_noise, strategy=None):
    dp = ClientLevelDP(strategy or FedAvg(min_train_nodes=1, min_available_nodes=3),
                       noise_multiplier=sigma, clipping_norm=clip, num_sampled_clients=m,
                       noise=noise)
    dp.configure_train(1, msgs.arrays(w=GLOBAL), ConfigRecord({}), msgs.FakeGrid([1, 2, 3]))
    return dp


def test_updates_are_clipped_summed_and_divided_by_the_planned_sample_size(msgs,
                                                                            task_identity):
    # Prepare: m = 3 planned, k = 2 replied, C = 1; weights by num-examples are unequal
    # (100 and 1) and must be ignored.
    dp = _configured(msgs)
    replies = [msgs.reply(1, {"w": np.array([3.0, 4.0])}, num_examples=100),  # norm 5 -> C
               msgs.reply(2, {"w": np.array([0.3, 0.4])}, num_examples=1)]   # norm 0.5

    arrays, _ = dp.aggregate_train(1, replies)

    # By hand: clip([3, 4]) = [0.6, 0.8]; (0.6 + 0.3, 0.8 + 0.4) / 3 = [0.3, 0.4].
    assert msgs.weights(arrays) == pytest.approx([0.3, 0.4])
    [release] = dp.releases
    assert (release.num_sampled, release.num_replied, release.server_round) == (3, 2, 1)
    assert release.noise_std == pytest.approx(1.0 * 1.0 / 3)


def test_the_noise_has_std_sigma_c_over_m(msgs, task_identity):
    # Prepare: sigma = 2, C = 1.5, m = 3, so std = 1.0; 20,000 coordinates, no update.
    def noise(server_round):
        rng = np.random.default_rng(server_round)
        return lambda shape, std: rng.normal(0.0, std, shape)

    dp = ClientLevelDP(FedAvg(min_train_nodes=1, min_available_nodes=3), noise_multiplier=2.0,
                       clipping_norm=1.5, num_sampled_clients=3, noise=noise)
    dp.configure_train(1, msgs.arrays(w=np.zeros(20_000)), ConfigRecord({}),
                       msgs.FakeGrid([1, 2, 3]))
    replies = [msgs.reply(n, {"w": np.zeros(20_000)}) for n in (1, 2, 3)]

    released = msgs.weights(dp.aggregate_train(1, replies)[0])

    # Sample std of 20,000 N(0, 1) draws: standard error ~0.005.
    assert released.std() == pytest.approx(1.0, abs=0.03)
    assert abs(released.mean()) < 0.03


@pytest.mark.parametrize("strategy", [FedMedian(), FedAdam()])
def test_aggregates_other_than_the_mean_are_refused(strategy):
    with pytest.raises(ValueError, match="needs the aggregate to be the mean"):
        ClientLevelDP(strategy, noise_multiplier=1.0, clipping_norm=1.0,
                      num_sampled_clients=3, noise=_zero_noise)


def test_fedprox_is_accepted_and_evaluation_keeps_its_weights(msgs, task_identity):
    inner = FedProx(proximal_mu=0.1, min_train_nodes=1, min_available_nodes=3)
    dp = _configured(msgs, strategy=inner)
    dp.aggregate_train(1, [msgs.reply(1, {"w": np.ones(2)}, num_examples=5)])

    # Federated evaluation is still weighted by num-examples: (1 * 0.2 + 3 * 0.6) / 4.
    metrics = dp.aggregate_evaluate(1, [msgs.reply(1, {}, num_examples=1, accuracy=0.2),
                                        msgs.reply(2, {}, num_examples=3, accuracy=0.6)])
    assert metrics["accuracy"] == pytest.approx(0.5)


def test_a_noiseless_release_is_refused():
    with pytest.raises(ValueError, match="noise_multiplier=0"):
        ClientLevelDP(FedAvg(), noise_multiplier=0.0, clipping_norm=1.0,
                      num_sampled_clients=3, noise=_zero_noise)


def _constant_noise(server_round):
    """Every draw is std itself: the noise term is visible in the figures."""
    return lambda shape, std: np.full(shape, std)


def test_canary_clients_are_released_in_a_separate_block(msgs, task_identity):
    # Prepare: m = 3 planned, k = 2 replied, C = 2, sigma = 1.5, so the noise std of the
    # release is sigma C / m = 1.0; canaries 0 and 2 of 4 are in.
    dp = ClientLevelDP(FedAvg(min_train_nodes=1, min_available_nodes=3), noise_multiplier=1.5,
                       clipping_norm=2.0, num_sampled_clients=3, noise=_constant_noise,
                       canaries=np.array([1, 0, 1, 0]))
    dp.configure_train(1, msgs.arrays(w=GLOBAL), ConfigRecord({}), msgs.FakeGrid([1, 2, 3]))
    replies = [msgs.reply(1, {"w": np.array([3.0, 4.0])}),   # norm 5 -> [1.2, 1.6]
               msgs.reply(2, {"w": np.array([0.0, 1.0])})]   # norm 1, kept

    arrays, _ = dp.aggregate_train(1, replies)

    # By hand: model = ([1.2, 1.6] + [0, 1]) / 3 + 1.0 = [1.4, 1.8666...];
    # block = (C b_j) / 3 + 1.0 = [2/3 + 1, 1, 2/3 + 1, 1].
    assert list(arrays.keys()) == ["w"]  # the block never reaches the model
    assert msgs.weights(arrays) == pytest.approx([1.4, 2.6 / 3 + 1.0])
    [(rnd, block)] = dp.canary_releases
    assert rnd == 1
    assert block == pytest.approx([5 / 3, 1.0, 5 / 3, 1.0])
    assert dp.canary_sum() == pytest.approx([2.0, 0.0, 2.0, 0.0])


def test_canaries_change_neither_the_model_nor_the_release_record(msgs, task_identity):
    # Prepare: the same seeded noise with and without 500 canaries.
    def noise(server_round):
        rng = np.random.default_rng(server_round)
        return lambda shape, std: rng.normal(0.0, std, shape)

    def release(canaries):
        dp = ClientLevelDP(FedAvg(min_train_nodes=1, min_available_nodes=3),
                           noise_multiplier=1.0, clipping_norm=1.0, num_sampled_clients=3,
                           noise=noise, canaries=canaries)
        dp.configure_train(1, msgs.arrays(w=np.zeros(50)), ConfigRecord({}),
                           msgs.FakeGrid([1, 2, 3]))
        replies = [msgs.reply(n, {"w": np.full(50, 0.1 * n)}) for n in (1, 2, 3)]
        return msgs.weights(dp.aggregate_train(1, replies)[0]), dp.releases

    bits = np.random.default_rng(7).random(500) < 0.5

    # Execute
    plain, plain_releases = release(None)
    audited, audited_releases = release(bits)

    # Assert: the block's noise is drawn after the model's.
    np.testing.assert_array_equal(plain, audited)
    assert plain_releases == audited_releases


def test_the_block_has_the_release_noise(msgs, task_identity):
    # Prepare: sigma = 2, C = 1.5, m = 3 (std 1.0); 20,000 canaries, none in.
    def noise(server_round):
        rng = np.random.default_rng(server_round)
        return lambda shape, std: rng.normal(0.0, std, shape)

    dp = ClientLevelDP(FedAvg(min_train_nodes=1, min_available_nodes=3), noise_multiplier=2.0,
                       clipping_norm=1.5, num_sampled_clients=3, noise=noise,
                       canaries=np.zeros(20_000))
    dp.configure_train(1, msgs.arrays(w=GLOBAL), ConfigRecord({}), msgs.FakeGrid([1, 2, 3]))

    dp.aggregate_train(1, [msgs.reply(1, {"w": np.ones(2)})])
    [(_, block)] = dp.canary_releases

    # Sample std of 20,000 N(0, 1) draws: standard error ~0.005.
    assert block.std() == pytest.approx(1.0, abs=0.03)
    assert abs(block.mean()) < 0.03


def test_bad_canary_bits_are_refused():
    with pytest.raises(ValueError, match="need 1-D 0/1 membership bits"):
        ClientLevelDP(FedAvg(), noise_multiplier=1.0, clipping_norm=1.0,
                      num_sampled_clients=3, noise=_zero_noise, canaries=np.array([0.5, 1]))
