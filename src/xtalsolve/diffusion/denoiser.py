"""CSPNet-style periodic denoiser (DiffCSP, Jiao et al. 2023) in plain torch, on padded batches.

Nodes: atom-type embedding + (time embedding, pattern conditioning) mixed by FiLM. Edges: every ordered pair of
distinct atoms of a crystal (<= ~52 atoms, so dense (B, N, N) tensors are cheaper than scatter-based graphs and
need no torch-scatter), with the lattice 6-vector (rotation invariant) and Fourier features sin / cos(2 pi k dx),
k = 1..K, of fractional differences (periodic, translation invariant). Mean aggregation over neighbours keeps
the outputs permutation equivariant. Outputs: eps for the lattice 6-vector (B, 6) (invariant) and the normalised
torus score per atom (B, N, 3) (permutation equivariant, translation invariant).
"""

from __future__ import annotations

import math

import torch
from torch import nn

N_ELEMENTS = 119  # index = atomic number, 0 = padding


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of t in [0, 1] (frequencies 1 .. 1000 on the 0..1000 scale)."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=t.dtype, device=t.device) / max(half - 1, 1))
    angle = 1000.0 * t[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


def fourier_features(frac: torch.Tensor, k_max: int) -> torch.Tensor:
    """sin and cos of 2 pi k dx_ij for k = 1..k_max and the three axes: (B, N, N, 6 k_max), dx_ij = x_j - x_i."""
    dx = frac[:, None, :, :] - frac[:, :, None, :]
    k = torch.arange(1, k_max + 1, dtype=frac.dtype, device=frac.device)
    angle = 2 * math.pi * dx.unsqueeze(-1) * k  # (B, N, N, 3, K)
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1).flatten(-2)


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, n_out))


class CSPLayer(nn.Module):
    """One message-passing layer: m_ij = phi_e(h_i, h_j, lattice, fourier(dx_ij)); h_i += phi_h(h_i, mean_j m_ij)."""

    def __init__(self, hidden: int, k_max: int):
        super().__init__()
        self.edge = nn.Sequential(_mlp(2 * hidden + 6 + 6 * k_max, hidden, hidden), nn.SiLU())
        self.node = _mlp(2 * hidden, hidden, hidden)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, h, lattice, fourier, pair_mask):
        bsz, n, hidden = h.shape
        pair = torch.cat(
            [
                h[:, :, None, :].expand(bsz, n, n, hidden),
                h[:, None, :, :].expand(bsz, n, n, hidden),
                lattice[:, None, None, :].expand(bsz, n, n, lattice.shape[-1]),
                fourier,
            ],
            dim=-1,
        )
        messages = self.edge(pair) * pair_mask.unsqueeze(-1)
        aggregate = messages.sum(2) / pair_mask.sum(2, keepdim=True).clamp(min=1)
        return h + self.node(torch.cat([self.norm(h), aggregate], dim=-1))


class CSPDenoiser(nn.Module):
    """eps (B, 6) and normalised score (B, N, 3) from (numbers, noisy frac, noisy lattice 6-vector, t, condition).

    numbers (B, N) atomic numbers (0 = padding); frac (B, N, 3); lattice (B, 6); t (B,); cond (B, cond_dim).
    """

    def __init__(self, hidden: int = 128, layers: int = 4, k_max: int = 8, time_dim: int = 64, cond_dim: int = 128):
        super().__init__()
        self.k_max = k_max
        self.cond_dim = cond_dim
        self.embed = nn.Embedding(N_ELEMENTS, hidden)
        self.time_dim = time_dim
        # FiLM of the atom embedding by (time, condition): h = e (1 + gamma) + beta
        self.film = _mlp(time_dim + cond_dim, hidden, 2 * hidden)
        self.layers = nn.ModuleList(CSPLayer(hidden, k_max) for _ in range(layers))
        self.out_frac = nn.Sequential(nn.LayerNorm(hidden), _mlp(hidden, hidden, 3))
        self.lattice_norm = nn.LayerNorm(hidden)
        self.out_lattice = _mlp(hidden + 6, hidden, 6)

    def forward(self, numbers, frac, lattice, t, cond):
        mask = (numbers > 0).to(frac.dtype)
        n = numbers.shape[1]
        eye = torch.eye(n, dtype=frac.dtype, device=frac.device)
        pair_mask = mask[:, :, None] * mask[:, None, :] * (1.0 - eye)
        gamma, beta = self.film(torch.cat([time_embedding(t.to(frac.dtype), self.time_dim), cond], -1)).chunk(2, -1)
        h = self.embed(numbers) * (1.0 + gamma[:, None, :]) + beta[:, None, :]
        fourier = fourier_features(frac, self.k_max)
        for layer in self.layers:
            h = layer(h, lattice, fourier, pair_mask) * mask.unsqueeze(-1)
        score = self.out_frac(h) * mask.unsqueeze(-1)
        pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        eps = self.out_lattice(torch.cat([self.lattice_norm(pooled), lattice], -1))
        return eps, score
