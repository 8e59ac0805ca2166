"""Model registry. Every model here must pass Opacus' ``ModuleValidator``.

No BatchNorm (it mixes samples, which breaks per-sample gradients); the CNN
uses GroupNorm, and the transformer is built from layers that have Opacus
per-sample gradient samplers (Linear, LayerNorm, Embedding).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from clients.config import ConfigError, ModelConfig

__all__ = ["MODELS", "build_model", "check_dp_compatible"]

Shape = tuple[int, ...]


def _image_shape(shape: Shape, model: str) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ConfigError(f"model.name={model!r}: needs image input (C, H, W), got shape "
                          f"{tuple(shape)}; use model=mlp for tabular data")
    return int(shape[0]), int(shape[1]), int(shape[2])


class MLP(nn.Module):
    """Any input shape (images or tabular rows), flattened."""

    def __init__(self, shape: Shape, num_classes: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(shape), cfg.hidden),
            nn.Tanh(),
            nn.Linear(cfg.hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Linear(nn.Module):
    """Multinomial logistic regression on any input, flattened.

    With ``norm_groups`` > 0 the input must be ``(C, H, W)`` and is first
    standardised per sample over groups of channels (``GroupNorm`` without
    learnt parameters: it mixes no records). Over scattering features
    (``dataset.preprocess: [{name: scatter}]``) this is Tramèr & Boneh's
    ScatterNet + linear model (ICLR 2021), with their 27 groups for 81 channels.
    """

    def __init__(self, shape: Shape, num_classes: int, cfg: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if cfg.norm_groups:
            c, _, _ = _image_shape(shape, "linear with norm_groups")
            if c % cfg.norm_groups:
                raise ConfigError(f"model.norm_groups={cfg.norm_groups}: must divide the "
                                  f"input's {c} channels")
            layers.append(nn.GroupNorm(cfg.norm_groups, c, affine=False))
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(math.prod(shape), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)``, whose values it gives to the bit; faster on the CPU without autograd.

    Without autograd (evaluation, prediction) on the CPU, the maximum of the
    four strided 2×2 slices: over a Fashion-MNIST batch of 256 after the CNN's
    first convolution (16 × 28 × 28 per image), 4 ms against ``max_pool2d``'s
    23 ms on one thread. With autograd, ``max_pool2d`` itself: its backward is
    the faster one. Odd heights and widths lose their last row or column, as
    ``max_pool2d``'s floor does.
    """

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dim() < 3 or min(x.shape[-2:]) < 2
                or (torch.is_grad_enabled() and x.requires_grad)):
            return super().forward(x)  # and its error for a map smaller than 2 × 2
        x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
        return torch.maximum(torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2]),
                             torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))


class CNN(nn.Module):
    """Two convolutions with GroupNorm and tanh, average-pooled to 2 × 2, and a linear head.

    The first block pools before its tanh: tanh is increasing, so the maximum
    of four tanh values is the tanh of their maximum, and the tanh runs on a
    quarter of the values. Its outputs are those of the tanh-then-pool order
    (the tests compare them). On Fashion-MNIST a client's training call took
    about 12 % less CPU, and the evaluation of 12,000 images, with
    :class:`MaxPool2x2`, about a quarter less time (``docs/benchmarks.md``,
    fix 13). Parameter names are unchanged (``features.0``,
    ``features.1``, ``features.4``, ``features.5``, ``head``).
    """

    def __init__(self, shape: Shape, num_classes: int, cfg: ModelConfig) -> None:
        super().__init__()
        c, h, w = _image_shape(shape, "cnn")
        ch = cfg.channels
        self.features = nn.Sequential(
            nn.Conv2d(c, ch, 3, padding=1),
            nn.GroupNorm(cfg.groups, ch),
            MaxPool2x2(),
            nn.Tanh(),
            nn.Conv2d(ch, 2 * ch, 3, padding=1),
            nn.GroupNorm(cfg.groups, 2 * ch),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * ch * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _Block(nn.Module):
    """Pre-norm encoder block with attention written from Linear layers."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A small encoder over image rows: each row is one token."""

    def __init__(self, shape: Shape, num_classes: int, cfg: ModelConfig) -> None:
        super().__init__()
        c, h, w = _image_shape(shape, "transformer")
        self.embed = nn.Linear(c * w, cfg.dim)
        self.pos = nn.Embedding(h, cfg.dim)
        self.blocks = nn.Sequential(*[_Block(cfg.dim, cfg.heads) for _ in range(cfg.layers)])
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.embed(x.permute(0, 2, 1, 3).reshape(b, h, c * w))
        # Contiguous: Opacus' ghost-clipping norm for nn.Embedding views its input flat.
        positions = torch.arange(h, device=x.device).expand(b, h).contiguous()
        z = self.blocks(tokens + self.pos(positions))
        return self.head(self.norm(z).mean(dim=1))


MODELS: dict[str, Callable[[Shape, int, ModelConfig], nn.Module]] = {
    "mlp": MLP,
    "linear": Linear,
    "cnn": CNN,
    "transformer": Transformer,
}


def build_model(cfg: ModelConfig, shape: Shape, num_classes: int, seed: int = 0) -> nn.Module:
    """Build a registered model with seeded initial weights."""
    if cfg.name not in MODELS:
        raise ConfigError(f"model.name={cfg.name!r}: unknown model; choose one of {sorted(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        # The CPU's generator only (the weights are made on the CPU), restored after:
        # torch.manual_seed would reseed every device's, outside the fork.
        torch.default_generator.manual_seed(seed)
        return MODELS[cfg.name](shape, num_classes, cfg)


def check_dp_compatible(model: nn.Module, name: str) -> None:
    """Raise :class:`ConfigError` if Opacus cannot train ``model`` with DP-SGD."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        details = "; ".join(str(e) for e in errors)
        raise ConfigError(f"model.name={name!r}: not compatible with Opacus DP-SGD: {details}")
