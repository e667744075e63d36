"""The trainable pieces in one module (for checkpoints): pattern encoder + periodic denoiser, with the two
corruption processes they were trained for; and the denoiser callables the sampler consumes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from xtalsolve.diffusion.corruption import LatticeDiffusion, TorusDiffusion
from xtalsolve.diffusion.denoiser import CSPDenoiser
from xtalsolve.diffusion.encoder import PatternEncoder
from xtalsolve.diffusion.guidance import cfg_combine

DenoiserFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the networks and settings of the processes (plain types: stored in checkpoints)."""

    hidden: int = 128
    layers: int = 4
    k_max: int = 8
    time_dim: int = 64
    cond_dim: int = 128
    encoder_channels: int = 32
    encoder_convs: int = 4
    n_points: int = 512
    v_ref: float = 18.0
    lattice_scale: float = 0.5
    sigma_min: float = 0.005
    sigma_max: float = 0.5


class CrystalDiffusion(nn.Module):
    """Encoder + denoiser; ``lattice`` and ``torus`` are the (parameter-free) corruption processes."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        self.encoder = PatternEncoder(config.n_points, config.encoder_channels, config.encoder_convs, config.cond_dim)
        self.denoiser = CSPDenoiser(config.hidden, config.layers, config.k_max, config.time_dim, config.cond_dim)
        self.lattice = LatticeDiffusion(v_ref=config.v_ref, scale=config.lattice_scale)
        self.torus = TorusDiffusion(sigma_min=config.sigma_min, sigma_max=config.sigma_max)

    def config_dict(self) -> dict:
        return asdict(self.config)

    def forward(self, numbers, frac, lattice, t, cond):
        return self.denoiser(numbers, frac, lattice, t, cond)


def conditional_denoiser(
    model: CrystalDiffusion,
    pattern: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    cfg_scale: float = 1.0,
) -> DenoiserFn:
    """The sampler's denoiser: (numbers, frac, lattice, t) -> (eps, normalised score).

    pattern None: prior only (null condition). Otherwise conditioned on the pattern (B, P) with its mask, and for
    ``cfg_scale`` != 1 combined with the unconditional prediction (classifier-free guidance,
    :func:`~xtalsolve.diffusion.guidance.cfg_combine`).
    """

    def cond_of(n: int, dtype) -> torch.Tensor:
        if pattern is None:
            return model.encoder.null_condition(n).to(dtype)
        return model.encoder(pattern.to(dtype), mask).to(dtype)

    cache: dict = {}

    def denoise(numbers, frac, lattice, t):
        key = (len(numbers), frac.dtype)
        if key not in cache:  # the pattern's embedding does not change over the reverse steps
            with torch.no_grad():
                cache[key] = (cond_of(*key), model.encoder.null_condition(len(numbers)).to(frac.dtype))
        cond, null = cache[key]
        out = model.denoiser(numbers, frac, lattice, t, cond)
        if pattern is None or cfg_scale == 1.0:
            return out
        return cfg_combine(out, model.denoiser(numbers, frac, lattice, t, null), cfg_scale)

    return denoise
