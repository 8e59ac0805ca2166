"""A site's own preprocessing: clean, normalise, augment and split its records.

A :class:`Pipeline` is built once from the hydra list ``dataset.preprocess``::

    - {name: clean}
    - {name: normalize, mode: federated, clip: 3.0, noise_multiplier: 2.0}
    - {name: scatter, J: 2, L: 8}      # or augment; not both
    - {name: augment, crop: 2, flip: false, rotate: 10}
    - {name: split, val_fraction: 0.1}

Steps run in that order, each at most once. Cleaning, fixed ("schema")
normalisation, scattering features, augmentation and splitting look only at the
site's own records and release nothing, so they cost no privacy. Federated normalisation releases
once: every site sends clipped, Gaussian-noised sums (:func:`local_statistics`),
which must be charged to its ledger before they leave. The pipeline's
``report`` (class histogram, feature ranges) is *not* private: it is for the
site's own logs and must never be sent.

Inputs are plain arrays: ``x`` float64 with records on the first axis
(tabular ``(N, F)`` with NaN for a missing value, images ``(N, C, H, W)``) and
``y`` int64 class indices, ``-1`` for a label outside the task's label set.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch.nn import functional
from torch.utils.data import Dataset

from clients.data import ArrayData

__all__ = [
    "KINDS",
    "STATISTICS_SENSITIVITY",
    "STEP_KEYS",
    "Augment",
    "AugmentedDataset",
    "Clean",
    "NoisyStatistics",
    "Normalize",
    "Pipeline",
    "PipelineResult",
    "PreprocessError",
    "Scatter",
    "Split",
    "build_pipeline",
    "combine_statistics",
    "local_statistics",
]

KINDS = ("tabular", "image")
NORMALIZE_MODES = ("schema", "federated", "none")
UNKNOWN_LABEL_POLICIES = ("drop", "error")
# The order steps run in; a config must list them in this order.
STEP_KEYS: dict[str, tuple[str, ...]] = {
    "clean": ("nonfinite", "duplicates", "unknown_labels"),
    "normalize": ("mode", "mean", "std", "clip", "min_std", "noise_multiplier"),
    "scatter": ("J", "L", "batch"),
    "augment": ("crop", "flip", "rotate"),
    "split": ("val_fraction",),
}
# Add/remove-one L2 sensitivity of the statistics release in its scaled units:
# three blocks, each of norm <= 1 (see local_statistics).
STATISTICS_SENSITIVITY = math.sqrt(3.0)
NoiseFn = Callable[[tuple[int, ...], float], Any]


class PreprocessError(ValueError):
    """A preprocessing step is misconfigured, or the data cannot go through it."""


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise PreprocessError(f"{name}={value!r}: must be true or false")
    return bool(value)


def _real(name: str, value: Any, *, low: float = -math.inf, high: float = math.inf,
          open_low: bool = False) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = math.isfinite(value) and low <= value <= high and not (open_low and value == low)
    if not ok:
        side = "(" if open_low else "["
        raise PreprocessError(f"{name}={value!r}: must be a number in {side}{low}, {high}]")
    return float(value)


def _reals(name: str, value: Any) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise PreprocessError(f"{name}={value!r}: must be a list of numbers")
    return tuple(_real(f"{name}[{i}]", v) for i, v in enumerate(np.asarray(value).ravel()))


def _records(x: Any, y: Any, raw_labels: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Check that ``x`` and ``y`` describe the same records; return float64 / int64 copies."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
    if x.ndim < 2:
        raise PreprocessError(f"x has shape {x.shape}: expected (records, features...)")
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise PreprocessError(f"y has shape {y.shape} and dtype {y.dtype}: expected "
                              f"{x.shape[0]} integer class indices (-1 for unknown)")
    if raw_labels is not None and len(raw_labels) != x.shape[0]:
        raise PreprocessError(f"raw_labels has {len(raw_labels)} entries for {x.shape[0]} rows")
    return x, y.astype(np.int64)


def _per_feature(x: np.ndarray) -> np.ndarray:
    """``(N, d, P)``: tabular features as d = F channels of one value, images as C channels."""
    if x.ndim == 2:
        return x[:, :, None]
    if x.ndim == 4:
        return x.reshape(x.shape[0], x.shape[1], -1)
    raise PreprocessError(f"x has shape {x.shape}: expected tabular (N, F) or images (N, C, H, W)")


# ----------------------------------------------------------------------------- clean


@dataclass(frozen=True)
class Clean:
    """Drop rows that cannot be trained on.

    Attributes
    ----------
    nonfinite : drop rows with NaN or ±inf in any feature.
    duplicates : drop exact repeats (same features and label), keeping the first.
    unknown_labels : ``"drop"`` rows whose label is outside the label set
        (``y == -1``), or ``"error"``: refuse the file.
    """

    nonfinite: bool = True
    duplicates: bool = True
    unknown_labels: str = "drop"

    def __post_init__(self) -> None:
        _bool("nonfinite", self.nonfinite)
        _bool("duplicates", self.duplicates)
        if self.unknown_labels not in UNKNOWN_LABEL_POLICIES:
            raise PreprocessError(f"unknown_labels={self.unknown_labels!r}: choose one of "
                                  f"{list(UNKNOWN_LABEL_POLICIES)}")

    def apply(self, x: np.ndarray, y: np.ndarray, raw_labels: Any = None
              ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Return the kept ``(x, y)`` and ``{"rows_in", "rows_out", "dropped": {...}}``.

        A dropped row is counted once, under the first reason that applies, in
        the order ``nonfinite``, ``unknown_label``, ``duplicate``.

        Raises
        ------
        PreprocessError
            If ``unknown_labels="error"`` and some label is unknown (the message
            names how many and, given ``raw_labels``, which raw values), or if
            no row is left.
        """
        x, y = _records(x, y, raw_labels)
        n = len(y)
        flat = x.reshape(n, -1)
        unknown = y == -1
        if self.unknown_labels == "error" and unknown.any():
            raise PreprocessError(_unknown_message(unknown, raw_labels))
        nonfinite = ~np.isfinite(flat).all(axis=1) if self.nonfinite else np.zeros(n, bool)
        unknown &= ~nonfinite
        keep = ~(nonfinite | unknown)
        repeat = np.zeros(n, bool)
        if self.duplicates and keep.any():
            rows = np.column_stack([flat[keep], y[keep].astype(np.float64)])
            first = np.unique(rows, axis=0, return_index=True)[1]  # stable: first occurrence
            later = np.ones(len(rows), bool)
            later[first] = False
            repeat[np.flatnonzero(keep)] = later
        keep &= ~repeat
        dropped = {"nonfinite": int(nonfinite.sum()), "unknown_label": int(unknown.sum()),
                   "duplicate": int(repeat.sum())}
        if not keep.any():
            counts = ", ".join(f"{k}={v}" for k, v in dropped.items())
            raise PreprocessError(f"all {n} rows were dropped by cleaning: {counts}")
        return x[keep], y[keep], {"rows_in": n, "rows_out": int(keep.sum()), "dropped": dropped}


def _unknown_message(unknown: np.ndarray, raw_labels: Any) -> str:
    if raw_labels is None:
        values = "raw values not given"
    else:
        distinct = list(dict.fromkeys(np.asarray(raw_labels, dtype=object)[unknown].tolist()))
        more = f" and {len(distinct) - 10} more" if len(distinct) > 10 else ""
        values = "raw values " + ", ".join(repr(v) for v in distinct[:10]) + more
    return (f"{int(unknown.sum())} of {len(unknown)} rows have a label outside the label set "
            f"({values}); fix the schema's labels or set unknown_labels: drop")


# ----------------------------------------------------------------------------- normalize


@dataclass(frozen=True)
class Normalize:
    """Per-feature standardisation ``(x - mean) / max(std, min_std)``.

    Tabular data is standardised per column, images per channel.

    Attributes
    ----------
    mode : ``"schema"``: ``mean`` and ``std`` are given in the config.
        ``"federated"``: they come from the statistics round
        (:func:`local_statistics`, :func:`combine_statistics`) and are set with
        :meth:`with_statistics`. ``"none"``: leave the features as they are.
    mean, std : one value per feature (tabular) or channel (image).
    clip : federated only: the L2 clipping norm of a record's contribution to
        the statistics (see :func:`local_statistics`).
    min_std : floor on the divisor, so a constant feature does not blow up.
    noise_multiplier : federated only: σ of the statistics release, if the
        config sets it here (else the caller chooses it).
    """

    mode: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    clip: float | None = None
    min_std: float = 1e-6
    noise_multiplier: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in NORMALIZE_MODES:
            raise PreprocessError(f"mode={self.mode!r}: choose one of {list(NORMALIZE_MODES)}")
        for key in ("mean", "std"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, _reals(key, getattr(self, key)))
        mean, std = self.mean or (), self.std or ()
        if (self.mean is None) != (self.std is None) or len(mean) != len(std) or self.mean == ():
            raise PreprocessError(f"mean={self.mean} and std={self.std}: give both, of equal "
                                  "length (one value per feature or channel)")
        if self.std is not None:
            for i, s in enumerate(self.std):
                _real(f"std[{i}]", s, low=0.0)
        object.__setattr__(self, "min_std", _real("min_std", self.min_std, low=0.0, open_low=True))
        federated = self.mode == "federated"
        for key in ("clip", "noise_multiplier"):
            value = getattr(self, key)
            if value is not None and not federated:
                raise PreprocessError(f"{key}={value!r}: only mode federated takes a {key}")
            if value is not None:
                object.__setattr__(self, key, _real(key, value, low=0.0, open_low=True))
        if federated and self.clip is None:
            raise PreprocessError("mode federated needs clip (> 0), the L2 clipping norm of a "
                                  "record's contribution to the statistics")
        if self.mode == "schema" and self.mean is None:
            raise PreprocessError("mode schema needs mean and std (one value per feature/channel, "
                                  "or one value for all)")
        if self.mode == "none" and self.mean is not None:
            raise PreprocessError(f"mean={self.mean}: mode none takes no mean or std")

    @property
    def needs_statistics(self) -> bool:
        """Federated mode still waiting for the statistics round's result."""
        return self.mode == "federated" and self.mean is None

    def with_statistics(self, mean: Any, std: Any) -> Normalize:
        """This step with the federated ``mean`` and ``std`` (not the variance) filled in."""
        if self.mode != "federated":
            raise PreprocessError(f"with_statistics: normalize mode={self.mode!r} takes its "
                                  "constants from the config, not from the statistics round")
        return replace(self, mean=_reals("mean", mean), std=_reals("std", std))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Standardise ``x`` (tabular ``(N, F)`` or images ``(N, C, H, W)``)."""
        if self.mode == "none":
            return x
        if self.mean is None or self.std is None:
            raise PreprocessError("normalize mode federated: the statistics round has not "
                                  "happened; call with_statistics(mean, std) first")
        dim = _per_feature(x).shape[1]
        mean, std_ = np.asarray(self.mean), np.asarray(self.std)
        if len(self.mean) == 1 and self.mode == "schema":
            # One constant for every feature/channel, e.g. pixels [0, 1] -> [-1, 1].
            mean, std_ = np.full(dim, mean[0]), np.full(dim, std_[0])
        elif len(self.mean) != dim:
            what = "features" if x.ndim == 2 else "channels"
            raise PreprocessError(f"normalize: {len(self.mean)} mean/std values for data with "
                                  f"{dim} {what}")
        shape = (1, dim) + (1,) * (x.ndim - 2)
        std = np.maximum(std_, self.min_std)
        return (x - mean.reshape(shape)) / std.reshape(shape)


# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class NoisyStatistics:
    """One site's noisy release, in the data's own units.

    Attributes
    ----------
    sum, sum_sq : noisy Σ of the clipped first moments and second moments, one
        entry per feature (tabular) or channel (image).
    count : noisy number of records.
    noise_multiplier, clip : the mechanism's σ and clipping norm.
    dim : number of features or channels.
    """

    sum: tuple[float, ...]
    sum_sq: tuple[float, ...]
    count: float
    noise_multiplier: float
    clip: float
    dim: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "sum", _reals("sum", self.sum))
        object.__setattr__(self, "sum_sq", _reals("sum_sq", self.sum_sq))
        object.__setattr__(self, "count", _real("count", self.count))
        for key in ("noise_multiplier", "clip"):
            object.__setattr__(self, key, _real(key, getattr(self, key), low=0.0, open_low=True))
        if isinstance(self.dim, bool) or not isinstance(self.dim, (int, np.integer)):
            raise PreprocessError(f"dim={self.dim!r}: must be an integer")
        if not len(self.sum) == len(self.sum_sq) == self.dim >= 1:
            raise PreprocessError(f"sum has {len(self.sum)} and sum_sq {len(self.sum_sq)} "
                                  f"entries; expected dim={self.dim} (>= 1) each")

    def to_lists(self) -> dict[str, list[float]]:
        """Lists of floats, as a Flower ``ConfigRecord`` holds them."""
        return {"sum": list(self.sum), "sum_sq": list(self.sum_sq), "count": [self.count],
                "noise_multiplier": [self.noise_multiplier], "clip": [self.clip]}

    @classmethod
    def from_lists(cls, record: Mapping[str, Any]) -> NoisyStatistics:
        """Inverse of :meth:`to_lists`; raises ``KeyError``/``PreprocessError`` if malformed."""
        scalars = {}
        for key in ("count", "noise_multiplier", "clip"):
            value = _reals(key, record[key])
            if len(value) != 1:
                raise PreprocessError(f"{key}={list(value)}: expected one number")
            scalars[key] = value[0]
        total = _reals("sum", record["sum"])
        return cls(total, _reals("sum_sq", record["sum_sq"]), dim=len(total), **scalars)


def _clipped_moments(x: np.ndarray, clip: float) -> tuple[np.ndarray, np.ndarray]:
    """Per record, its first and second moments per feature/channel after clipping."""
    per = _per_feature(x)
    if not np.isfinite(per).all():
        raise PreprocessError("local_statistics: x has NaN or inf; clean it first")
    second = np.mean(per**2, axis=2)  # (N, d): the square of the per-channel RMS
    norm = np.sqrt(second.sum(axis=1))
    scale = np.where(norm > clip, clip / np.where(norm > clip, norm, 1.0), 1.0)
    return scale[:, None] * per.mean(axis=2), scale[:, None] ** 2 * second


def local_statistics(x: np.ndarray, *, clip: float, noise_multiplier: float,
                     rng: np.random.Generator | None, noise: NoiseFn | None = None
                     ) -> NoisyStatistics:
    """A site's clipped, Gaussian-noised sums for federated normalisation.

    Each record contributes a first moment ``v`` and second moment ``s`` per
    feature: for tabular data ``v`` is the row and ``s = v∘v``; for an image
    with C channels, ``v_c`` is the mean and ``s_c`` the mean of the squares of
    channel c's pixels (C entries each), so that the combined result is the
    pooled per-pixel mean and variance of every channel. A record is clipped
    (scaled down, as in Abadi et al., "Deep Learning with Differential
    Privacy", CCS 2016) so that its per-channel RMS vector ``r`` (``r_c² = s_c``;
    tabular: ``r = |v|``) has ``‖r‖₂ ≤ clip``.

    Sensitivity. Adding or removing one record changes the scaled release
    ``[Σv / clip, Σs / clip², n]`` by ``[v / clip, s / clip², 1]``. By
    Cauchy–Schwarz ``|v_c| ≤ r_c``, so ``‖v‖₂ ≤ ‖r‖₂ ≤ clip``; since
    ``s_c = r_c² ≥ 0``, ``‖s‖₂ ≤ ‖s‖₁ = ‖r‖₂² ≤ clip²``. Each block has L2 norm
    at most 1 and the whole vector at most ``Δ = sqrt(3)`` (reached by one
    non-zero feature of size ``clip``). The Gaussian mechanism (Dwork & Roth,
    "The Algorithmic Foundations of Differential Privacy", 2014, Sect. 3.5 and
    App. A) adds N(0, (σ·Δ)²) to every coordinate, one release of one mechanism.

    Ledger: charge level ``statistics`` with ``noise_multiplier=σ``,
    ``clipping_norm=sqrt(3)`` (:data:`STATISTICS_SENSITIVITY`, the sensitivity
    in the scaled units), ``sample_rate=1``, ``steps=1``, ``sampling="none"``,
    ``relation="add_remove"``; it composes with the site's DP-SGD releases,
    which see the same records.

    Parameters
    ----------
    x : tabular ``(N, F)`` or images ``(N, C, H, W)``, finite (cleaned).
    clip : clipping norm (> 0), in the data's units.
    noise_multiplier : σ (> 0): noise std over sensitivity.
    rng : numpy generator for the noise (``rng.normal``); give it or ``noise``.
    noise : ``noise(shape, std)`` returning an array of N(0, std²) draws, e.g. a
        CSPRNG (``clients.noise.secure_gaussian`` with ``dtype=torch.float64``).

    Returns
    -------
    NoisyStatistics
        The noisy sums de-scaled to the data's units: the noise std is
        ``σ·sqrt(3)·clip`` on ``sum``, ``σ·sqrt(3)·clip²`` on ``sum_sq`` and
        ``σ·sqrt(3)`` on ``count``.
    """
    clip = _real("clip", clip, low=0.0, open_low=True)
    sigma = _real("noise_multiplier", noise_multiplier, low=0.0, open_low=True)
    if (rng is None) == (noise is None):
        raise PreprocessError("local_statistics: pass exactly one noise source, rng (a numpy "
                              "Generator) or noise(shape, std)")
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise PreprocessError(f"rng={rng!r}: must be a numpy.random.Generator")
    first, second = _clipped_moments(np.asarray(x, dtype=np.float64), clip)
    d = first.shape[1]
    scaled = np.concatenate([first.sum(0) / clip, second.sum(0) / clip**2, [first.shape[0]]])
    std = sigma * STATISTICS_SENSITIVITY
    if noise is not None:
        z = np.asarray(noise(scaled.shape, std), dtype=np.float64)
    elif rng is not None:  # exactly one of the two, checked above
        z = rng.normal(0.0, std, size=scaled.shape)
    if z.shape != scaled.shape or not np.isfinite(z).all():
        raise PreprocessError(f"noise returned shape {z.shape} (finite: {np.isfinite(z).all()}); "
                              f"expected {scaled.shape}, finite")
    out = scaled + z
    return NoisyStatistics(tuple(out[:d] * clip), tuple(out[d:2 * d] * clip**2), float(out[-1]),
                           sigma, clip, d)


def combine_statistics(parts: Sequence[NoisyStatistics], *, min_std: float = 1e-6
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Global ``(mean, variance)`` per feature/channel from the sites' noisy sums.

    ``mean = Σsum / Σcount`` and ``variance = Σsum_sq / Σcount - mean²``, the
    latter floored at ``min_std²`` because noise can make it negative. Returns
    the variance, not the standard deviation. Post-processing of the released
    sums, so it costs no further privacy (Dwork & Roth 2014, Prop. 2.1).

    Raises
    ------
    PreprocessError
        If there are no parts, their dims differ, or the noisy total count is
        <= 0 (too much noise for too few records). Warns (RuntimeWarning) when
        the count is under ten times its own noise std.
    """
    if not parts:
        raise PreprocessError("combine_statistics: no site statistics to combine")
    dims = sorted({p.dim for p in parts})
    if len(dims) != 1:
        raise PreprocessError(f"combine_statistics: sites sent different dims {dims}")
    count = sum(p.count for p in parts)
    if not count > 0:
        raise PreprocessError(f"the noisy record count over {len(parts)} site(s) is {count:.4g} "
                              "<= 0: too much noise for too few records; lower the statistics "
                              "noise multiplier or use normalize mode schema")
    count_noise = STATISTICS_SENSITIVITY * math.sqrt(sum(p.noise_multiplier**2 for p in parts))
    if count < 10 * count_noise:
        warnings.warn(f"the noisy record count {count:.4g} is under 10x its noise std "
                      f"{count_noise:.3g}: the normalisation constants are mostly noise",
                      RuntimeWarning, stacklevel=2)
    mean = np.sum([p.sum for p in parts], axis=0) / count
    variance = np.sum([p.sum_sq for p in parts], axis=0) / count - mean**2
    return mean, np.maximum(variance, _real("min_std", min_std, low=0.0) ** 2)


# ----------------------------------------------------------------------------- scatter


def _scattering(shape: tuple[int, int], j: int, angles: int) -> torch.nn.Module:
    # kymatio 0.3's ``kymatio.torch`` also imports its 3-D transform, which needs
    # ``scipy.special.sph_harm`` (gone from SciPy 1.17); the 2-D front end does not.
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    return ScatteringTorch2D(J=j, shape=shape, L=angles)


@dataclass(frozen=True)
class Scatter:
    """Fixed wavelet scattering features of images (kymatio's ``Scattering2D``).

    Each channel of an ``H x W`` image becomes ``1 + J·L + L²·J(J-1)/2``
    channels of ``H/2^J x W/2^J`` (J=2, L=8: 81 channels of 7 x 7 for 28 x 28),
    the averaged moduli of Morlet wavelet transforms at ``J`` scales and ``L``
    angles (Mallat, "Group Invariant Scattering", 2012; Bruna & Mallat 2013).
    The filters are fixed, not learnt from any data, so the features of a
    record depend on that record alone: the step costs no privacy, and DP-SGD
    on a model over these features is DP-SGD on the model over the images with
    a fixed first layer. Tramèr & Boneh ("Differentially Private Learning
    Needs Better Features (or Much More Data)", ICLR 2021) train a linear model
    on them (``model=linear`` with ``norm_groups``) to their best private
    accuracy on Fashion-MNIST.

    Attributes
    ----------
    J : number of scales (>= 1); ``2^J`` must not exceed the image's height or width.
    L : number of angles (>= 1).
    batch : images transformed at once (memory only; the result is the same).
    """

    J: int = 2
    L: int = 8
    batch: int = 512

    def __post_init__(self) -> None:
        for key in ("J", "L", "batch"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise PreprocessError(f"{key}={value!r}: must be an integer >= 1")

    @property
    def channels_per_channel(self) -> int:
        """Output channels for each input channel: ``1 + J·L + L²·J(J-1)/2``."""
        return 1 + self.J * self.L + self.L**2 * self.J * (self.J - 1) // 2

    def _check(self, shape: Sequence[int]) -> tuple[int, int, int]:
        if len(shape) != 3:
            raise PreprocessError(f"scatter applies to images (C, H, W); got records of shape "
                                  f"{tuple(shape)}")
        c, h, w = (int(d) for d in shape)
        if min(h, w) < 2**self.J:
            raise PreprocessError(f"scatter J={self.J}: the images are {h} x {w}, smaller "
                                  f"than 2^J = {2**self.J}; lower J")
        return c, h, w

    def output_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """The feature shape ``(C', H', W')`` of one ``(C, H, W)`` image."""
        c, h, w = self._check(shape)
        out = _scattering((h, w), self.J, self.L)(torch.zeros(1, 1, h, w))
        return c * self.channels_per_channel, int(out.shape[-2]), int(out.shape[-1])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The float32 features ``(N, C', H', W')`` of images ``(N, C, H, W)``."""
        c, h, w = self._check(np.shape(x)[1:])
        transform = _scattering((h, w), self.J, self.L)
        parts = []
        with torch.no_grad():
            for start in range(0, len(x), self.batch):
                chunk = torch.as_tensor(np.asarray(x[start:start + self.batch]),
                                        dtype=torch.float32)
                out = transform(chunk)  # (n, C, K, H', W')
                parts.append(out.reshape(len(chunk), c * out.shape[2], *out.shape[-2:]).numpy())
        if not parts:
            return np.zeros((0, *self.output_shape((c, h, w))), dtype=np.float32)
        return np.concatenate(parts)


# ----------------------------------------------------------------------------- augment


@dataclass(frozen=True)
class Augment:
    """Random image transforms, drawn afresh for every sample each time it is read.

    Attributes
    ----------
    crop : zero-pad by this many pixels, then crop back to H x W at a random offset.
    flip : mirror left-right with probability 1/2.
    rotate : rotate by a uniform angle in [-rotate, rotate] degrees
        (positive: counter-clockwise as displayed), bilinear, zeros outside.
    """

    crop: int = 0
    flip: bool = False
    rotate: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.crop, bool) or not isinstance(self.crop, (int, np.integer)) \
                or self.crop < 0:
            raise PreprocessError(f"crop={self.crop!r}: must be an integer >= 0")
        _bool("flip", self.flip)
        object.__setattr__(self, "rotate", _real("rotate", self.rotate, low=0.0, high=180.0))

    @property
    def is_identity(self) -> bool:
        return self.crop == 0 and not self.flip and self.rotate == 0.0

    def transform(self, sample: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One augmented copy of a ``(C, H, W)`` sample, drawing from ``generator``."""
        if self.crop:
            _, h, w = sample.shape
            padded = functional.pad(sample, (self.crop,) * 4)
            top, left = torch.randint(0, 2 * self.crop + 1, (2,), generator=generator).tolist()
            sample = padded[:, top:top + h, left:left + w]
        if self.flip and torch.rand(1, generator=generator).item() < 0.5:
            sample = sample.flip(-1)
        if self.rotate:
            angle = (2.0 * torch.rand(1, generator=generator).item() - 1.0) * self.rotate
            sample = _rotate(sample, angle)
        return sample

    def dataset(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, *,
                generator: torch.Generator) -> AugmentedDataset:
        """Wrap a training split (e.g. ``PipelineResult.train``'s arrays)."""
        return AugmentedDataset(torch.as_tensor(x), torch.as_tensor(y), self, generator=generator)


def _rotate(sample: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate a ``(C, H, W)`` sample about its centre, counter-clockwise as displayed."""
    _, h, w = sample.shape
    a = math.radians(degrees)
    cos, sin = math.cos(a), math.sin(a)
    # affine_grid maps output to input in coordinates normalised to [-1, 1] per axis;
    # the h/w factors make the rotation rigid in pixels for non-square images.
    theta = torch.tensor([[[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]]], dtype=sample.dtype)
    grid = functional.affine_grid(theta, [1, *sample.shape], align_corners=False)
    return functional.grid_sample(sample[None], grid, mode="bilinear", padding_mode="zeros",
                                  align_corners=False)[0]


class AugmentedDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A map-style dataset of ``(image, label)`` that augments each sample when read.

    Every ``__getitem__`` draws a fresh transform for that one sample from
    ``generator``, so two records in one batch, or one record in two steps, get
    independent augmentations. This keeps DP-SGD's per-sample accounting true:
    each record still contributes exactly one clipped gradient per step, of
    one (randomly transformed) copy of itself, and nothing mixes records.
    Opacus' Poisson sampling replaces the DataLoader's batch sampler and indexes
    this dataset, which is why it is map-style. Use ``num_workers=0``: worker
    processes would each get a copy of ``generator`` and repeat its draws.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augment: Augment, *,
                 generator: torch.Generator) -> None:
        if x.ndim != 4 or not x.is_floating_point():
            raise PreprocessError(f"AugmentedDataset: x has shape {tuple(x.shape)} and dtype "
                                  f"{x.dtype}; expected float images (N, C, H, W)")
        if y.shape != (x.shape[0],):
            raise PreprocessError(f"AugmentedDataset: y has shape {tuple(y.shape)}; expected "
                                  f"({x.shape[0]},)")
        if not isinstance(generator, torch.Generator):
            raise PreprocessError(f"generator={generator!r}: must be a seeded torch.Generator")
        self.x, self.y, self.augment, self.generator = x, y, augment, generator

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.augment.transform(self.x[index], self.generator), self.y[index]


# ----------------------------------------------------------------------------- split


@dataclass(frozen=True)
class Split:
    """Seeded train/validation split, stratified by class when that is possible."""

    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "val_fraction",
                           _real("val_fraction", self.val_fraction, low=0.0, high=1.0))
        if self.val_fraction == 1.0:
            raise PreprocessError("val_fraction=1.0: must be in [0, 1)")

    def stratified(self, y: np.ndarray) -> bool:
        """Every class has >= 2 rows and both parts can hold every class."""
        n, counts = len(y), np.unique(y, return_counts=True)[1]
        n_val = math.ceil(self.val_fraction * n)
        return n > 0 and counts.min() >= 2 and min(n_val, n - n_val) >= len(counts)

    def indices(self, y: np.ndarray, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Sorted ``(train, val)`` row indices; ``val`` is empty for ``val_fraction=0``."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise PreprocessError(f"seed={seed!r}: must be an integer")
        idx = np.arange(len(y))
        if self.val_fraction == 0.0:
            return idx, idx[:0]
        n_val = math.ceil(self.val_fraction * len(y))
        if n_val >= len(y):
            raise PreprocessError(f"split val_fraction={self.val_fraction}: {len(y)} row(s) "
                                  "leave none for training")
        stratify = y if self.stratified(y) else None
        from sklearn.model_selection import train_test_split  # only when a site splits

        train, val = train_test_split(idx, test_size=n_val, random_state=int(seed),
                                      stratify=stratify)
        return np.sort(train), np.sort(val)


# ----------------------------------------------------------------------------- pipeline


@dataclass(frozen=True)
class PipelineResult:
    """Train and validation data (float32), the augmentation to apply, and the site report."""

    train: ArrayData
    val: ArrayData
    augment: Augment | None
    report: dict[str, Any]


@dataclass(frozen=True)
class Pipeline:
    """The configured steps; an absent step does nothing (absent split: ``Split(0.1)``)."""

    clean: Clean | None = None
    normalize: Normalize | None = None
    scatter: Scatter | None = None
    augment: Augment | None = None
    split: Split = field(default_factory=Split)

    def output_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of one record after the pipeline, given its shape before."""
        return self.scatter.output_shape(shape) if self.scatter is not None else tuple(shape)

    @property
    def needs_statistics(self) -> bool:
        """Normalisation is federated (True even once :meth:`with_statistics` was applied)."""
        return self.normalize is not None and self.normalize.mode == "federated"

    def with_statistics(self, mean: Any, std: Any) -> Pipeline:
        """This pipeline with the statistics round's ``mean`` and ``std`` filled in."""
        if self.normalize is None or not self.needs_statistics:
            raise PreprocessError("with_statistics: the pipeline has no normalize step with "
                                  "mode federated")
        return replace(self, normalize=self.normalize.with_statistics(mean, std))

    def clean_only(self, x: np.ndarray, y: np.ndarray, raw_labels: Any = None
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """The cleaned, not yet normalised ``(x, y, report)``: the statistics round's input."""
        x, y = _records(x, y, raw_labels)
        if len(y) == 0:
            raise PreprocessError("no records to preprocess")
        if self.clean is None:
            zeros = {"nonfinite": 0, "unknown_label": 0, "duplicate": 0}
            return x, y, {"rows_in": len(y), "rows_out": len(y), "dropped": zeros}
        return self.clean.apply(x, y, raw_labels)

    def run(self, x: np.ndarray, y: np.ndarray, *, kind: str, num_classes: int, seed: int,
            raw_labels: Any = None) -> PipelineResult:
        """Clean, summarise, normalise and split one site's records.

        ``report`` has an entry per step (``rows_in``, ``rows_out``, and what it
        did) and ``summary``: the class histogram and per-feature (tabular) or
        per-channel (image) min/max after cleaning, before normalisation. The
        report is not private; keep it at the site.
        """
        if kind not in KINDS:
            raise PreprocessError(f"kind={kind!r}: choose one of {list(KINDS)}")
        if np.ndim(x) != (2 if kind == "tabular" else 4):
            raise PreprocessError(f"x has shape {np.shape(x)}: {kind} data must be "
                                  + ("(N, F)" if kind == "tabular" else "(N, C, H, W)"))
        for step in ("scatter", "augment"):
            if getattr(self, step) is not None and kind != "image":
                raise PreprocessError(f"{step} applies to image data only; this data is {kind}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
                or num_classes < 1:
            raise PreprocessError(f"num_classes={num_classes!r}: must be an integer >= 1")
        if self.normalize is not None and self.normalize.needs_statistics:
            raise PreprocessError("normalize mode federated: the statistics round has not "
                                  "happened; call with_statistics(mean, std) first")
        x, y, cleaned = self.clean_only(x, y, raw_labels)
        bad = (y < 0) | (y >= num_classes)
        if bad.any():
            raise PreprocessError(f"{int(bad.sum())} rows have labels outside [0, {num_classes}) "
                                  f"(e.g. {y[bad][:5].tolist()}); add a clean step or fix them")
        n = len(y)
        report: dict[str, Any] = {"clean": cleaned, "summary": _summary(x, y, num_classes)}
        if self.normalize is not None:
            x = self.normalize.apply(x)
            report["normalize"] = {"rows_in": n, "rows_out": n, "mode": self.normalize.mode,
                                   "mean": self.normalize.mean, "std": self.normalize.std}
        if self.scatter is not None:
            x = self.scatter.apply(x)
            report["scatter"] = {"rows_in": n, "rows_out": n, "J": self.scatter.J,
                                 "L": self.scatter.L, "shape": list(x.shape[1:])}
        if self.augment is not None:  # applied at training time, per sample
            report["augment"] = {"rows_in": n, "rows_out": n, "crop": self.augment.crop,
                                 "flip": self.augment.flip, "rotate": self.augment.rotate}
        train, val = self.split.indices(y, seed=seed)
        report["split"] = {"rows_in": n, "rows_out": n, "train": len(train), "val": len(val),
                           "stratified": bool(len(val)) and self.split.stratified(y)}
        data = ArrayData(x.astype(np.float32), y, num_classes)
        return PipelineResult(data.subset(train), data.subset(val), self.augment, report)


def _summary(x: np.ndarray, y: np.ndarray, num_classes: int) -> dict[str, Any]:
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    with warnings.catch_warnings():  # an all-NaN column (clean off) gives NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanmin(x, axis=axes), np.nanmax(x, axis=axes)
    return {"rows": len(y), "class_histogram": np.bincount(y, minlength=num_classes).tolist(),
            "feature_min": low.tolist(), "feature_max": high.tolist()}


_STEPS: dict[str, Any] = {"clean": Clean, "normalize": Normalize, "scatter": Scatter,
                          "augment": Augment, "split": Split}


def build_pipeline(steps: Sequence[Mapping[str, Any]] | None) -> Pipeline:
    """Build a :class:`Pipeline` from ``dataset.preprocess``.

    Raises
    ------
    PreprocessError
        For an unknown step or key (naming both), a step listed twice or out of
        the order clean, normalize, scatter, augment, split, scatter together
        with augment, or an invalid value.
    """
    if steps is None:
        steps = []
    if isinstance(steps, (str, bytes, Mapping)) or not isinstance(steps, Sequence):
        raise PreprocessError(f"dataset.preprocess={steps!r}: must be a list of steps")
    order, last = list(STEP_KEYS), -1
    built: dict[str, Any] = {}
    for i, step in enumerate(steps):
        where = f"dataset.preprocess[{i}]"
        if not isinstance(step, Mapping):
            raise PreprocessError(f"{where}={step!r}: a step is a mapping with a 'name'")
        name = step.get("name")
        if name not in STEP_KEYS:
            raise PreprocessError(f"{where}: unknown step name={name!r}; choose one of {order}")
        if name in built:
            raise PreprocessError(f"{where}: step {name!r} is listed twice; each runs at most once")
        if order.index(name) < last:
            raise PreprocessError(f"{where}: step {name!r} must come before {order[last]!r}; "
                                  f"steps run in the order {order}")
        last = order.index(name)
        options = {str(k): v for k, v in step.items() if k != "name"}
        for key in options:
            if key not in STEP_KEYS[name]:
                raise PreprocessError(f"{where}: step {name!r} has no key {key!r}; known keys: "
                                      f"{list(STEP_KEYS[name])}")
        if name == "normalize":
            if "mode" not in options:
                raise PreprocessError(f"{where}: step 'normalize' needs a mode, one of "
                                      f"{list(NORMALIZE_MODES)}")
            if options["mode"] == "federated" and {"mean", "std"} & set(options):
                raise PreprocessError(f"{where}: normalize mode federated takes mean and std "
                                      "from the statistics round, not the config")
        try:
            built[name] = _STEPS[name](**options)
        except PreprocessError as err:
            raise PreprocessError(f"{where} ({name}): {err}") from None
    if "scatter" in built and "augment" in built:
        raise PreprocessError("dataset.preprocess: scatter and augment cannot be combined (the "
                              "features are computed once, augmentation draws new images "
                              "every step); drop one of them")
    return Pipeline(**built)
