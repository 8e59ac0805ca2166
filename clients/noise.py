"""Where the DP-SGD noise comes from: torch's default generator or the OS CSPRNG.

Opacus draws its Gaussian noise from torch's Mersenne Twister, which is fast and
reproducible but not cryptographically secure: whoever learns its state can
predict the noise and subtract it. Opacus' own ``secure_mode`` fixes that with
``torchcsprng``, which has no wheel for current PyTorch. ``"secure"`` here gets
the same protection from the kernel's CSPRNG instead. Either way the caller gets
back a sentence naming the generator, for the privacy ledger.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from clients.config import NOISE_GENERATORS

__all__ = ["NOISE_GENERATORS", "describe_noise_generator", "secure_gaussian",
           "use_noise_generator"]

# "<id>: <sentence>"; the privacy audit reads the id (``os-csprng`` counts as secure).
_TORCH_DESCRIPTION = (
    "torch-mt19937: torch default generator (Mersenne Twister), seeded per (run seed, "
    "round, client, site ledger row); not cryptographically secure"
)
_SECURE_DESCRIPTION = (
    "os-csprng: os.urandom (kernel CSPRNG) -> Box-Muller in float64, 4 draws summed and "
    "halved against floating-point attacks; Poisson sampling from a torch generator "
    "seeded from os.urandom"
)
# Normals made per batch of random words, so a large tensor needs bounded scratch memory.
_CHUNK = 1 << 20


def _standard_normals(count: int) -> np.ndarray:
    """``count`` independent N(0, 1) draws in float64 from ``os.urandom``."""
    out = np.empty(count, dtype=np.float64)
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        pairs = (n + 1) // 2
        words = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
        # Top 53 bits -> k in [0, 2**53); (k + 1) / 2**53 is in (0, 1], so log never sees 0.
        uniforms = ((words >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53
        radius = np.sqrt(-2.0 * np.log(uniforms[0]))
        angle = 2.0 * math.pi * uniforms[1]
        both = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
        out[start : start + n] = both[:n]
    return out


def secure_gaussian(
    shape: Sequence[int],
    std: float,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gaussian noise N(0, std²) whose randomness comes from the OS CSPRNG.

    Random 64-bit words from ``os.urandom`` (on Linux the kernel's ChaCha20-based
    generator) become uniforms in (0, 1] with 53 bits of precision, and pairs of
    uniforms become pairs of normals by the Box–Muller transform, in float64.

    A single floating-point Gaussian sample leaks: the set of doubles a sampler
    can output depends on the value it was centred on, so an observer of
    ``x + noise`` can sometimes tell which ``x`` it was (Jin et al., "Are We There
    Yet? Timing and Floating-Point Attacks on Differential Privacy Systems",
    arXiv:2112.05307). Following Holohan & Braghin, "Secure Random Sampling in
    Differential Privacy" (arXiv:2107.10138, Sect. 5.1), and exactly as Opacus'
    ``secure_mode`` does, each value is the sum of 2n = 4 independent
    N(0, std²) draws divided by sqrt(2n) = 2, which is again N(0, std²) but makes
    the attack cost about 2^(53·3) instead of 2^53.

    Parameters
    ----------
    shape : sequence of int
        Shape of the returned tensor (e.g. ``p.shape``).
    std : float
        Standard deviation; 0 gives zeros.
    device : torch.device or str, optional
        Device of the result; CPU if not given. The noise is drawn on the CPU.
    dtype : torch.dtype, default torch.float32
        Floating-point dtype of the result; the draw itself is float64.

    Returns
    -------
    torch.Tensor
        Noise of the given shape, dtype and device.

    Raises
    ------
    ValueError
        If ``std`` is negative or not finite, or ``shape`` has a negative size.
    """
    std = float(std)
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"std must be a finite number >= 0, got {std!r}")
    size = torch.Size(shape)
    if any(d < 0 for d in size):
        raise ValueError(f"shape must have non-negative sizes, got {tuple(size)}")
    if std == 0:
        return torch.zeros(size, device=device, dtype=dtype)
    n = size.numel()
    draws = _standard_normals(4 * n).reshape(4, n)
    noise = std * draws.sum(axis=0) / 2.0
    return torch.from_numpy(noise.reshape(tuple(size))).to(device=device, dtype=dtype)


# Noise is drawn this many values at a time into a scratch buffer and added in place.
# A multiple of 16: torch's CPU sampler fills normals in blocks of 16, so with no
# piece shorter than 16 the pieces are, value for value, one draw of the whole tensor.
_NOISE_PIECE = 1 << 14


def _add_in_pieces_(grad: torch.Tensor, draw: Callable[[torch.Tensor], None]) -> None:
    """Add noise to ``grad`` in place; ``draw(piece)`` fills ``piece`` with noise.

    At most :data:`_NOISE_PIECE` (+15) values of noise exist at once, whatever
    the tensor's size.
    """
    flat = grad.view(-1)  # contiguous: values in the order of one whole draw
    n = flat.numel()
    scratch = torch.empty(min(n, _NOISE_PIECE + 15), dtype=grad.dtype, device=grad.device)
    start = 0
    while start < n:
        stop = min(start + _NOISE_PIECE, n)
        if n - stop < 16:  # no last piece shorter than 16
            stop = n
        piece = scratch[: stop - start]
        draw(piece)
        flat[start:stop].add_(piece)
        start = stop


class _InPlaceNoise(DPOptimizer):
    """Put first in the bases of an optimizer's class: its noise step works in place.

    Opacus' step (``DPOptimizer`` / ``DPOptimizerFastGradientClipping``, opacus
    1.6) holds three gradients' worth of memory at once: the clipped sum, a
    full-size noise tensor (ghost clipping: a copy of the gradient and a tensor of
    zeros too) and their sum. Here the noise is added to the clipped sum in place,
    drawn in pieces of :data:`_NOISE_PIECE` values, and ghost clipping's sum is
    the gradient its second backward pass wrote, not a copy of it. ``p.grad``
    ends as the same value Opacus gives (on the CPU the same draws, value for
    value), and ``p.summed_grad`` is now the same tensor as ``p.grad``.

    Never built directly: :func:`use_noise_generator` makes ``(step, base)``
    subclasses. The noise multiplier is read, never written, so the accountant's
    step hook still sees the configured value.
    """

    def _draw(self, piece: torch.Tensor, std: float) -> None:
        """Fill ``piece`` with N(0, std²) from the optimizer's torch generator."""
        piece.normal_(0.0, std, generator=self.generator)

    def zero_grad(self, set_to_none: bool = True) -> None:
        # Ghost clipping calls this between its two backward passes: the first
        # pass's gradients are dropped, not zeroed and added to, so the second
        # pass's become p.grad with no second copy alive.
        super().zero_grad(set_to_none)

    def accumulate(self) -> None:  # ghost clipping's pre_step calls it
        if any(p.summed_grad is not None for p in self.params):
            super().accumulate()  # type: ignore[misc]  # Opacus' own adds to the sum
            return
        for p in self.params:  # nothing accumulated yet: the sum is the gradient
            p.summed_grad = p.grad.data

    def add_noise(self) -> None:
        noise_multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        std = noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            if not p.summed_grad.is_contiguous():  # ExpandedWeights' sum may not be
                p.summed_grad = p.summed_grad.contiguous()
            if std > 0:
                _add_in_pieces_(p.summed_grad, lambda piece: self._draw(piece, std))
            p.grad = p.summed_grad.view_as(p)
            _mark_as_processed(p.summed_grad)


class _SecureNoise(_InPlaceNoise):
    """:class:`_InPlaceNoise` drawing from :func:`secure_gaussian` (the OS CSPRNG)."""

    def _draw(self, piece: torch.Tensor, std: float) -> None:
        piece.copy_(secure_gaussian(piece.shape, std, device=piece.device, dtype=piece.dtype))


# The only add_noise implementations _InPlaceNoise.add_noise reproduces. Other
# Opacus optimizers (adaptive clipping, DDP, FSDP) add noise differently.
_SUPPORTED_ADD_NOISE = (DPOptimizer.add_noise, DPOptimizerFastGradientClipping.add_noise)


def describe_noise_generator(name: str) -> str:
    """The ledger's description of generator ``name`` (what :func:`use_noise_generator` returns)."""
    if name not in NOISE_GENERATORS:
        raise ValueError(f"unknown noise generator {name!r}; choose one of {NOISE_GENERATORS}")
    return _TORCH_DESCRIPTION if name == "torch" else _SECURE_DESCRIPTION


def use_noise_generator(optimizer: DPOptimizer, name: str) -> str:
    """Choose where ``optimizer`` draws its DP noise from; describe the choice.

    Parameters
    ----------
    optimizer : opacus.optimizers.DPOptimizer
        As returned by ``PrivacyEngine.make_private`` with flat clipping and
        ``grad_sample_mode`` "hooks", "functorch" or "ew" (``DPOptimizer``) or
        "ghost" (``DPOptimizerFastGradientClipping``). Changed in place.
    name : {"torch", "secure"}
        ``"torch"``: Opacus' default, torch's generator (reproducible under a seed).
        ``"secure"``: ``secure_gaussian``, i.e. the OS CSPRNG with the
        floating-point-attack defence. Either way the noise is added in place
        (:class:`_InPlaceNoise`); only this instance is affected, through a
        subclass of its class. Its noise multiplier is left alone.

    Returns
    -------
    str
        A description of the generator, for the privacy ledger.

    Raises
    ------
    ValueError
        If ``name`` is not one of ``NOISE_GENERATORS``, or ``optimizer`` is not an
        Opacus optimizer whose noise step this module reproduces.
    """
    if name not in NOISE_GENERATORS:
        raise ValueError(f"unknown noise generator {name!r}; choose one of {NOISE_GENERATORS}")
    cls: Any = type(optimizer)
    if isinstance(optimizer, _InPlaceNoise):  # switched before: undo, then choose again
        cls = next(b for b in cls.__bases__ if not issubclass(b, _InPlaceNoise))
        optimizer.__class__ = cls
    if not isinstance(optimizer, DPOptimizer) or cls.add_noise not in _SUPPORTED_ADD_NOISE:
        raise ValueError(
            f"cannot choose the noise generator of a {cls.__qualname__}; supported: "
            "opacus DPOptimizer and DPOptimizerFastGradientClipping (flat clipping, not "
            "distributed)"
        )
    optimizer.__class__ = _noise_step_class(_InPlaceNoise if name == "torch" else _SecureNoise,
                                            cls)
    return describe_noise_generator(name)


@functools.cache  # a handful of classes: two noise steps by Opacus' two optimizers
def _noise_step_class(step: type, base: type) -> type:
    """``base`` with ``step``'s noise step: the class :func:`use_noise_generator` gives."""
    prefix = "SecureNoise" if step is _SecureNoise else "InPlaceNoise"
    return type(f"{prefix}{base.__name__}", (step, base), {})
