"""Pattern encoder: a normalised powder pattern on the fixed Q grid (1/angstrom) and its measured-range mask
-> conditioning vector, with classifier-free dropout to a learned null embedding.

The input is what :func:`xtalsolve.data.augment.training_patterns` produces (intensity on 0.5-8 1/angstrom, 512
points, max 1 inside the measured range, 0 outside, plus the mask), so the encoder sees the instrument variety
(wavelength, range, size and strain broadening, background, noise) during training. Strided convolutions extract
local peak shapes; the final dense layer keeps absolute Q (peak positions carry the cell).
"""

from __future__ import annotations

import torch
from torch import nn

from xtalsolve.errors import XtalsolveError


def cfg_dropout(n: int, p_uncond: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) bool: which conditions to replace by the null embedding (classifier-free guidance training)."""
    return torch.rand(n, generator=generator, device=None if generator is None else generator.device) < p_uncond


class PatternEncoder(nn.Module):
    """(B, P) pattern + (B, P) mask -> (B, cond_dim). P must equal ``n_points`` (the training grid)."""

    def __init__(self, n_points: int = 512, channels: int = 32, n_conv: int = 4, cond_dim: int = 128):
        super().__init__()
        self.n_points = n_points
        layers, c_in = [], 2
        for i in range(n_conv):
            c_out = channels * 2 ** min(i, 2)
            layers += [nn.Conv1d(c_in, c_out, kernel_size=5, stride=2, padding=2), nn.GroupNorm(4, c_out), nn.SiLU()]
            c_in = c_out
        self.conv = nn.Sequential(*layers)
        length = n_points
        for _ in range(n_conv):
            length = (length - 1) // 2 + 1
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c_in * length, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.null = nn.Parameter(torch.zeros(cond_dim))

    def forward(self, pattern: torch.Tensor, mask: torch.Tensor, uncond: torch.Tensor | None = None) -> torch.Tensor:
        """uncond: (B,) bool, True where the null embedding replaces the pattern's (None: none replaced)."""
        if pattern.shape[-1] != self.n_points:
            raise XtalsolveError(f"pattern has {pattern.shape[-1]} points; the model needs {self.n_points} on its Q grid",
                                 "pattern")
        x = torch.stack([pattern, mask.to(pattern.dtype)], dim=1)
        cond = self.head(self.conv(x))
        if uncond is not None:
            cond = torch.where(uncond[:, None].to(cond.device), self.null.expand_as(cond), cond)
        return cond

    def null_condition(self, n: int) -> torch.Tensor:
        """(n, cond_dim) the unconditional embedding (prior-only sampling)."""
        return self.null.expand(n, -1)
