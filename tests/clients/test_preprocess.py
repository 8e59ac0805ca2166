"""Site preprocessing: cleaning counts, normalisation, noisy federated statistics,
per-sample augmentation (also under Opacus), splitting and the pipeline's config."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from clients.preprocess import (
    STATISTICS_SENSITIVITY,
    Augment,
    AugmentedDataset,
    Clean,
    NoisyStatistics,
    Normalize,
    Pipeline,
    PreprocessError,
    Split,
    build_pipeline,
    combine_statistics,
    local_statistics,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]

NAN, INF = float("nan"), float("inf")


def _clip_rows(v, clip):
    """Reference clipping: scale each row down to L2 norm <= clip."""
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v * np.minimum(1.0, clip / np.maximum(norms, 1e-300))


# ----------------------------------------------------------------------------- clean


def test_clean_counts_each_dropped_row_once_under_its_first_reason():
    # Prepare: worked out by hand. nonfinite: rows 1, 3 (also unknown), 7; unknown: 4, 6
    # (6 would also repeat 4); duplicate: 2 (of 0), 8 (of 5; 5 differs from 0 by its label).
    x = np.array([[1, 2], [NAN, 2], [1, 2], [3, INF], [5, 6],
                  [1, 2], [5, 6], [-INF, 0], [1, 2], [7, 8]], dtype=np.float64)
    y = np.array([0, 0, 0, -1, -1, 1, -1, 1, 1, 2])
    # Execute
    xo, yo, report = Clean().apply(x, y)
    # Assert
    assert report == {"rows_in": 10, "rows_out": 3,
                      "dropped": {"nonfinite": 3, "unknown_label": 2, "duplicate": 2}}
    np.testing.assert_array_equal(xo, [[1, 2], [1, 2], [7, 8]])
    np.testing.assert_array_equal(yo, [0, 1, 2])


def test_clean_can_keep_nonfinite_rows_and_duplicates_when_told():
    # Prepare
    x = np.array([[1.0], [NAN], [1.0]])
    y = np.array([0, 0, 0])
    # Execute
    xo, _, report = Clean(nonfinite=False, duplicates=False).apply(x, y)
    # Assert
    assert len(xo) == 3 and report["dropped"] == {"nonfinite": 0, "unknown_label": 0,
                                                  "duplicate": 0}


def test_clean_raises_when_every_row_is_dropped_and_gives_the_counts():
    # Prepare
    x = np.array([[NAN], [1.0], [2.0]])
    y = np.array([0, -1, -1])
    # Execute / Assert
    with pytest.raises(PreprocessError, match=r"all 3 rows .*nonfinite=1, unknown_label=2"):
        Clean().apply(x, y)


def test_clean_with_unknown_labels_error_names_the_count_and_raw_values():
    # Prepare
    x = np.arange(8, dtype=np.float64).reshape(4, 2)
    y = np.array([0, -1, 1, -1])
    raw = np.array(["cat", "zebra", "dog", "yak"], dtype=object)
    # Execute / Assert
    with pytest.raises(PreprocessError, match=r"2 of 4 rows .*'zebra', 'yak'"):
        Clean(unknown_labels="error").apply(x, y, raw_labels=raw)


def test_clean_rejects_an_unknown_policy():
    with pytest.raises(PreprocessError, match="unknown_labels='keep'"):
        Clean(unknown_labels="keep")


# ----------------------------------------------------------------------------- normalize


def test_normalize_schema_standardises_tabular_columns_and_image_channels():
    # Prepare: by hand, (1 - 2)/1 = -1, (30 - 20)/10 = 1; channel 0: (0.5 - 0.5)/0.25 = 0.
    tab = np.array([[1.0, 10.0], [3.0, 30.0]])
    img = np.stack([np.full((2, 2), 0.5), np.full((2, 2), 1.0)])[None]  # (1, 2, 2, 2)
    # Execute
    t = Normalize(mode="schema", mean=[2.0, 20.0], std=[1.0, 10.0]).apply(tab)
    i = Normalize(mode="schema", mean=[0.5, 0.0], std=[0.25, 0.0], min_std=0.5).apply(img)
    # Assert: channel 1's std 0 is floored at min_std 0.5 -> 1.0 / 0.5 = 2.
    np.testing.assert_allclose(t, [[-1.0, -1.0], [1.0, 1.0]])
    np.testing.assert_allclose(i[0, 0], np.zeros((2, 2)))
    np.testing.assert_allclose(i[0, 1], np.full((2, 2), 2.0))


def test_normalize_rejects_constants_of_the_wrong_length_and_bad_modes():
    with pytest.raises(PreprocessError, match="2 mean/std values for data with 3 features"):
        Normalize(mode="schema", mean=[0, 0], std=[1, 1]).apply(np.zeros((4, 3)))
    with pytest.raises(PreprocessError, match="mode schema needs mean"):
        Normalize(mode="schema")
    with pytest.raises(PreprocessError, match="needs clip"):
        Normalize(mode="federated")
    with pytest.raises(PreprocessError, match="only mode federated takes a clip"):
        Normalize(mode="none", clip=1.0)


def test_normalize_federated_refuses_to_run_before_the_statistics_round():
    # Prepare
    step = Normalize(mode="federated", clip=1.0)
    x = np.array([[1.0], [3.0]])
    # Execute / Assert
    with pytest.raises(PreprocessError, match="with_statistics"):
        step.apply(x)
    np.testing.assert_allclose(step.with_statistics([2.0], [1.0]).apply(x), [[-1.0], [1.0]])


# ----------------------------------------------------------------------------- statistics


def _sites(seed=0):
    rng = np.random.default_rng(seed)
    # Some rows have norm > clip = 2 (scale 1.5 in 3 dims), so clipping matters.
    return [rng.normal(0.5, 1.5, size=(n, 3)) for n in (40, 25, 60)]


def test_tiny_noise_gives_the_pooled_mean_and_variance_of_the_clipped_rows():
    # Prepare
    clip, sites = 2.0, _sites()
    pooled = np.concatenate([_clip_rows(s, clip) for s in sites])
    assert (np.linalg.norm(np.concatenate(sites), axis=1) > clip).sum() > 10
    # Execute
    parts = [local_statistics(s, clip=clip, noise_multiplier=1e-9,
                              rng=np.random.default_rng(i)) for i, s in enumerate(sites)]
    mean, var = combine_statistics(parts)
    # Assert
    np.testing.assert_allclose(mean, pooled.mean(axis=0), atol=1e-7)
    np.testing.assert_allclose(var, pooled.var(axis=0), atol=1e-7)


def test_image_statistics_are_the_pooled_per_channel_pixel_mean_and_variance():
    # Prepare: 2-channel images; each image scaled so its per-channel RMS vector has norm <= clip.
    rng, clip = np.random.default_rng(1), 0.8
    sites = [rng.uniform(0, 1, size=(n, 2, 3, 3)) for n in (10, 15)]
    clipped = []
    for s in sites:
        rms = np.sqrt((s**2).mean(axis=(2, 3)))
        scale = np.minimum(1.0, clip / np.linalg.norm(rms, axis=1))
        clipped.append(s * scale[:, None, None, None])
    pooled = np.concatenate(clipped)
    # Execute
    parts = [local_statistics(s, clip=clip, noise_multiplier=1e-9, rng=np.random.default_rng(0))
             for s in sites]
    mean, var = combine_statistics(parts)
    # Assert
    assert parts[0].dim == 2
    np.testing.assert_allclose(mean, pooled.mean(axis=(0, 2, 3)), atol=1e-7)
    np.testing.assert_allclose(var, pooled.var(axis=(0, 2, 3)), atol=1e-7)


def test_noise_on_the_sums_has_the_std_of_the_gaussian_mechanism():
    # Prepare: the release is exact sums + N(0, (σ·sqrt(3))²) in units of clip, clip², 1.
    sigma, clip, reps = 0.8, 2.0, 3000
    x = _sites()[0]
    c = _clip_rows(x, clip)
    exact_sum, exact_sq, n = c.sum(axis=0), (c**2).sum(axis=0), len(c)
    rng = np.random.default_rng(123)
    # Execute
    draws = [local_statistics(x, clip=clip, noise_multiplier=sigma, rng=rng) for _ in range(reps)]
    err_sum = np.array([d.sum for d in draws]) - exact_sum
    err_sq = np.array([d.sum_sq for d in draws]) - exact_sq
    err_n = np.array([d.count for d in draws]) - n
    # Assert: 5 standard errors; SE(mean) = sd/sqrt(R), SE(sample sd) ≈ sd/sqrt(2R).
    base = sigma * math.sqrt(3.0)
    for err, sd in ((err_sum, base * clip), (err_sq, base * clip**2), (err_n, base)):
        err = err.reshape(reps, -1)
        assert np.all(np.abs(err.mean(axis=0)) < 5 * sd / math.sqrt(reps))
        assert np.all(np.abs(err.std(axis=0, ddof=1) - sd) < 5 * sd / math.sqrt(2 * reps))


def test_a_given_noise_function_is_called_with_the_calibrated_std_and_used():
    # Prepare
    calls = []

    def zeros(shape, std):
        calls.append((shape, std))
        return np.zeros(shape)

    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    # Execute
    stats = local_statistics(x, clip=10.0, noise_multiplier=1.5, rng=None, noise=zeros)
    # Assert: one draw for [sum (2), sum_sq (2), count]; std = σ·sqrt(3) in scaled units.
    assert calls == [((5,), pytest.approx(1.5 * math.sqrt(3.0)))]
    assert stats.sum == (1.0, 1.0) and stats.sum_sq == (1.0, 1.0) and stats.count == 2.0
    assert STATISTICS_SENSITIVITY == pytest.approx(math.sqrt(3.0))


def test_one_huge_outlier_moves_the_sums_by_at_most_the_clip():
    # Prepare
    clip, x = 1.5, _sites()[1]
    with_outlier = np.vstack([x, [[1e6, -1e6, 3e5]]])

    def release(data):
        return local_statistics(data, clip=clip, noise_multiplier=1e-12,
                                rng=np.random.default_rng(0))

    # Execute
    a, b = release(x), release(with_outlier)
    # Assert: its first block is clipped to norm exactly clip, its squares to norm <= clip².
    d_sum = np.subtract(b.sum, a.sum)
    d_sq = np.subtract(b.sum_sq, a.sum_sq)
    assert np.linalg.norm(d_sum) == pytest.approx(clip, rel=1e-9)
    assert np.linalg.norm(d_sq) <= clip**2 * (1 + 1e-9)
    assert b.count - a.count == pytest.approx(1.0)


def test_local_statistics_needs_exactly_one_noise_source():
    with pytest.raises(PreprocessError, match="exactly one noise source"):
        local_statistics(np.ones((2, 2)), clip=1.0, noise_multiplier=1.0, rng=None)


def test_combine_rejects_a_non_positive_noisy_count():
    # Prepare
    parts = [NoisyStatistics((1.0,), (1.0,), -3.0, 5.0, 1.0, 1),
             NoisyStatistics((1.0,), (1.0,), 2.0, 5.0, 1.0, 1)]
    # Execute / Assert
    with pytest.raises(PreprocessError, match=r"count over 2 site\(s\) is -1 <= 0"):
        combine_statistics(parts)


def test_combine_floors_a_negative_variance_and_rejects_mixed_dims():
    # Prepare: sum_sq/count - mean² = 0 - 1 < 0 -> min_std².
    part = NoisyStatistics((100.0,), (0.0,), 100.0, 1e-6, 1.0, 1)
    # Execute
    _, var = combine_statistics([part], min_std=0.1)
    # Assert
    assert var[0] == pytest.approx(0.01)
    with pytest.raises(PreprocessError, match="different dims"):
        combine_statistics([part, NoisyStatistics((1.0, 1.0), (1.0, 1.0), 9.0, 1.0, 1.0, 2)])


def test_statistics_travel_through_a_flower_config_record():
    from flwr.app import ConfigRecord

    # Prepare
    stats = local_statistics(np.ones((3, 2)), clip=1.0, noise_multiplier=1.0,
                             rng=np.random.default_rng(0))
    # Execute
    back = NoisyStatistics.from_lists(ConfigRecord(stats.to_lists()))
    # Assert
    assert back == stats


# ----------------------------------------------------------------------------- augment


def _image(c=1, h=5, w=5):
    return torch.arange(c * h * w, dtype=torch.float32).reshape(c, h, w) + 1.0


def test_augment_with_nothing_switched_on_is_the_identity():
    # Prepare
    x = _image()[None].repeat(3, 1, 1, 1)
    data = AugmentedDataset(x, torch.zeros(3, dtype=torch.int64), Augment(),
                            generator=torch.Generator().manual_seed(0))
    # Execute / Assert
    for i in range(3):
        torch.testing.assert_close(data[i][0], x[i])


def test_augment_preserves_shapes_and_draws_independently_per_sample():
    # Prepare: two identical records in one batch.
    x = torch.rand(2, 3, 6, 7, generator=torch.Generator().manual_seed(1))
    x[1] = x[0]
    aug = Augment(crop=2, flip=True, rotate=30.0)
    data = aug.dataset(x, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(2))
    # Execute
    batch, labels = next(iter(DataLoader(data, batch_size=2)))
    # Assert
    assert batch.shape == (2, 3, 6, 7) and labels.tolist() == [0, 1]
    assert not torch.equal(batch[0], batch[1])


def test_augment_is_reproducible_under_the_same_seed():
    # Prepare
    x, aug = _image(2, 6, 6), Augment(crop=1, flip=True, rotate=15.0)
    # Execute
    a = [aug.transform(x, g) for g in [torch.Generator().manual_seed(7)] for _ in range(4)]
    b = [aug.transform(x, g) for g in [torch.Generator().manual_seed(7)] for _ in range(4)]
    # Assert
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v)


def test_flip_mirrors_left_right_about_half_the_time():
    # Prepare
    x, reps = _image(1, 3, 4), 400
    g = torch.Generator().manual_seed(3)
    # Execute
    outs = [Augment(flip=True).transform(x, g) for _ in range(reps)]
    # Assert: each output is x or its mirror (by indexing); the count is Binomial(400, 1/2).
    mirror = x[:, :, [3, 2, 1, 0]]
    flipped = sum(torch.equal(o, mirror) for o in outs)
    assert all(torch.equal(o, x) or torch.equal(o, mirror) for o in outs)
    assert abs(flipped - reps / 2) < 5 * math.sqrt(reps / 4)


def test_crop_is_a_window_of_the_zero_padded_image():
    # Prepare
    x, pad = _image(1, 4, 4), 2
    padded = np.zeros((1, 8, 8), dtype=np.float32)
    padded[:, pad:pad + 4, pad:pad + 4] = x.numpy()
    windows = [padded[:, i:i + 4, j:j + 4] for i in range(5) for j in range(5)]
    g = torch.Generator().manual_seed(4)
    # Execute
    outs = [Augment(crop=pad).transform(x, g).numpy() for _ in range(200)]
    # Assert: every output is one of the 25 windows, and many different ones occur.
    hits = [[k for k, win in enumerate(windows) if np.array_equal(o, win)] for o in outs]
    assert all(len(h) == 1 for h in hits)
    assert len({h[0] for h in hits}) > 15


def test_rotation_by_90_degrees_matches_numpy_rot90_counter_clockwise():
    from clients.preprocess import _rotate

    # Prepare
    x = _image(2, 4, 4)
    # Execute
    out = _rotate(x, 90.0).numpy()
    # Assert
    np.testing.assert_allclose(out, np.rot90(x.numpy(), k=1, axes=(1, 2)), atol=1e-5)


def test_augmented_dataset_trains_under_opacus_poisson_sampling():
    from opacus import PrivacyEngine

    # Prepare: n = 32, B = 8 -> q = 1/ceil(32/8) = 0.25 and 4 steps per epoch.
    torch.manual_seed(0)  # the model's initial weights only
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(6))
    data = Augment(crop=1, flip=True, rotate=10.0).dataset(
        x, y, generator=torch.Generator().manual_seed(7))
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True)
    # Execute
    for xb, yb in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    # Assert
    assert engine.accountant.history == [(1.0, 0.25, 4)]


# ----------------------------------------------------------------------------- split


def test_split_is_stratified_and_deterministic_by_seed():
    # Prepare: 50/50/20 rows, val 20% -> 10/10/4 per class in validation.
    y = np.repeat([0, 1, 2], [50, 50, 20])
    split = Split(0.2)
    # Execute
    train, val = split.indices(y, seed=11)
    again, other = split.indices(y, seed=11)[1], split.indices(y, seed=12)[1]
    # Assert
    assert np.bincount(y[val]).tolist() == [10, 10, 4]
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(120))
    np.testing.assert_array_equal(val, again)
    assert not np.array_equal(val, other)


def test_split_falls_back_to_unstratified_and_allows_no_validation():
    # Prepare: class 2 has one member, so stratification is impossible.
    y = np.array([0, 0, 0, 1, 1, 1, 2, 0, 1, 0])
    # Execute
    train, val = Split(0.3).indices(y, seed=0)
    all_train, none = Split(0.0).indices(y, seed=0)
    # Assert
    assert not Split(0.3).stratified(y)
    assert len(val) == 3 and len(train) == 7
    assert len(all_train) == 10 and len(none) == 0


# ----------------------------------------------------------------------------- pipeline


def test_build_pipeline_rejects_unknown_steps_keys_repeats_and_wrong_order():
    with pytest.raises(PreprocessError, match="unknown step name='shuffle'"):
        build_pipeline([{"name": "shuffle"}])
    with pytest.raises(PreprocessError, match=r"step 'augment' has no key 'zoom'"):
        build_pipeline([{"name": "augment", "zoom": 2}])
    with pytest.raises(PreprocessError, match="listed twice"):
        build_pipeline([{"name": "split"}, {"name": "split", "val_fraction": 0.2}])
    with pytest.raises(PreprocessError, match="'clean' must come before 'split'"):
        build_pipeline([{"name": "split"}, {"name": "clean"}])
    with pytest.raises(PreprocessError, match=r"preprocess\[0\] \(augment\): crop=-1"):
        build_pipeline([{"name": "augment", "crop": -1}])


def test_defaults_when_steps_are_absent():
    # Execute
    pipe = build_pipeline([])
    # Assert
    assert pipe == Pipeline(clean=None, normalize=None, augment=None, split=Split(0.1))


def test_augment_on_tabular_data_is_refused_at_run_time():
    # Prepare
    pipe = build_pipeline([{"name": "augment", "flip": True}])
    # Execute / Assert
    with pytest.raises(PreprocessError, match="augment applies to image data only"):
        pipe.run(np.zeros((4, 2)), np.zeros(4, dtype=np.int64), kind="tabular",
                 num_classes=2, seed=0)


def test_pipeline_report_and_normalised_train_and_val():
    # Prepare: 13 rows; row 12 has NaN (its 99 must not reach the ranges); rows 10-11 repeat.
    x = np.array([[i, 10.0 * i] for i in range(10)] + [[0.0, 0.0], [1.0, 10.0], [99.0, NAN]])
    y = np.array([0, 1] * 5 + [0, 1, 1])
    pipe = build_pipeline([
        {"name": "clean"},
        {"name": "normalize", "mode": "schema", "mean": [4.5, 45.0], "std": [2.0, 20.0]},
        {"name": "split", "val_fraction": 0.2},
    ])
    # Execute
    res = pipe.run(x, y, kind="tabular", num_classes=3, seed=0)
    # Assert
    assert res.report["clean"] == {"rows_in": 13, "rows_out": 10,
                                   "dropped": {"nonfinite": 1, "unknown_label": 0,
                                               "duplicate": 2}}
    assert res.report["summary"] == {"rows": 10, "class_histogram": [5, 5, 0],
                                     "feature_min": [0.0, 0.0], "feature_max": [9.0, 90.0]}
    assert res.report["split"]["train"] == 8 and res.report["split"]["val"] == 2
    assert res.train.x.dtype == np.float32 and res.train.num_classes == 3
    both = np.concatenate([res.train.x, res.val.x])
    expected = (np.array([[i, 10.0 * i] for i in range(10)]) - [4.5, 45.0]) / [2.0, 20.0]
    np.testing.assert_allclose(np.sort(both, axis=0), expected, rtol=1e-6)


def test_federated_pipeline_needs_statistics_and_uses_them():
    # Prepare: cleaning's output is the statistics round's input.
    pipe = build_pipeline([{"name": "normalize", "mode": "federated", "clip": 5.0,
                            "noise_multiplier": 2.0}, {"name": "split", "val_fraction": 0.0}])
    x = np.array([[1.0], [3.0]])
    y = np.array([0, 1])
    # Execute
    xc, yc, _ = pipe.clean_only(x, y)
    ready = pipe.with_statistics(np.array([2.0]), np.array([1.0]))
    res = ready.run(x, y, kind="tabular", num_classes=2, seed=0)
    # Assert
    assert pipe.needs_statistics and pipe.normalize is not None and pipe.normalize.clip == 5.0
    np.testing.assert_array_equal(xc, x)
    with pytest.raises(PreprocessError, match="statistics round has not happened"):
        pipe.run(x, y, kind="tabular", num_classes=2, seed=0)
    np.testing.assert_allclose(res.train.x, [[-1.0], [1.0]])


def test_image_report_gives_per_channel_ranges_and_augment_is_returned():
    # Prepare: channel 0 in [0, 0.5], channel 1 in [0.25, 1].
    rng = np.random.default_rng(0)
    x = np.stack([rng.uniform(0, 0.5, (6, 4, 4)), rng.uniform(0.25, 1, (6, 4, 4))], axis=1)
    x[0, 0, 0, 0], x[1, 0, 0, 0], x[2, 1, 0, 0], x[3, 1, 0, 0] = 0.0, 0.5, 0.25, 1.0
    y = np.array([0, 1, 0, 1, 0, 1])
    pipe = build_pipeline([{"name": "augment", "flip": True}])
    # Execute
    res = pipe.run(x, y, kind="image", num_classes=2, seed=0)
    # Assert
    assert res.report["summary"]["feature_min"] == [0.0, 0.25]
    assert res.report["summary"]["feature_max"] == [0.5, 1.0]
    assert res.augment == Augment(flip=True)
