"""Forward (corruption) processes of the joint crystal diffusion: one per field, as in DiffCSP / MatterGen.

* :class:`LatticeDiffusion`: variance-preserving DDPM (cosine schedule) on a rotation-invariant 6-vector of the
  cell, the matrix logarithm of the volume-normalised metric tensor.
* :class:`TorusDiffusion`: variance-exploding wrapped normal on fractional coordinates in [0, 1)^3, geometric
  sigma from 0.005 to 0.5, score of the wrapped normal by a truncated sum over periodic images (DiffCSP).

Time t is continuous in [0, 1] (t = 0 clean, t = 1 prior), so samplers choose their number of steps freely.
Everything is plain torch and differentiable where the guidance needs it (decoding the lattice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_SQRT2 = math.sqrt(2.0)
_IU = (torch.tensor([0, 1, 2, 0, 0, 1]), torch.tensor([0, 1, 2, 1, 2, 2]))  # 6-vector <-> symmetric matrix


def _device(generator: torch.Generator | None) -> torch.device | None:
    """Where draws from ``generator`` land: its own device (a CUDA generator draws on the GPU)."""
    return None if generator is None else generator.device


def sym_to_vec(s: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) symmetric -> (..., 6) [s11, s22, s33, sqrt2 s12, sqrt2 s13, sqrt2 s23] (an isometry: the
    Frobenius norm of the matrix is the Euclidean norm of the vector, so isotropic noise stays isotropic)."""
    v = s[..., _IU[0], _IU[1]]
    return torch.cat([v[..., :3], v[..., 3:] * _SQRT2], dim=-1)


def vec_to_sym(v: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`sym_to_vec`."""
    d, o = v[..., :3], v[..., 3:] / _SQRT2
    rows = [
        torch.stack([d[..., 0], o[..., 0], o[..., 1]], -1),
        torch.stack([o[..., 0], d[..., 1], o[..., 2]], -1),
        torch.stack([o[..., 1], o[..., 2], d[..., 2]], -1),
    ]
    return torch.stack(rows, dim=-2)


def canonical_cell(lattice: torch.Tensor, frac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same crystals with right-handed cells: a left-handed cell (det < 0) becomes -L with coordinates -x
    (Cartesian positions x L are unchanged), so that a cell rebuilt from its metric is a pure rotation of it."""
    flip = torch.where(torch.linalg.det(lattice) < 0, -1.0, 1.0).to(lattice.dtype)
    return lattice * flip[:, None, None], torch.remainder(frac * flip[:, None, None], 1.0)


def cosine_alpha_bar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Cumulative signal fraction abar(t) of the cosine schedule (Nichol & Dhariwal 2021), abar(0) = 1,
    clipped at 1e-4 near t = 1."""
    t64 = torch.as_tensor(t).double()  # float64: abar(0) is then exactly 1 also in float32
    f = torch.cos((t64 + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    return f.clamp(1e-4, 1.0).to(torch.as_tensor(t).dtype)


@dataclass(frozen=True)
class LatticeDiffusion:
    """VP diffusion on x = log(G / (N v_ref)^(2/3)) / scale as a 6-vector, G = L L^T the metric (angstrom^2),
    N the number of atoms and v_ref a reference volume per atom (angstrom^3).

    Why this and not DiffCSP's 3x3 matrix: the metric is invariant to rotations of the cell, so no rotational
    degree of freedom is diffused or learned; the matrix exponential of any symmetric matrix is positive definite,
    so every noisy state and every sample decodes to a valid cell (no degenerate or negative volume); the trace,
    2 log(V / (N v_ref)), carries the volume per atom, which varies little across materials, so the prior N(0, I)
    fits the data without per-dataset statistics. Decoding is the Cholesky factor of G (a = (a, 0, 0), b in the
    xy plane): the same crystal as the input up to a rotation (for right-handed cells, see :func:`canonical_cell`).
    """

    v_ref: float = 18.0
    scale: float = 0.5
    t_min: float = 1e-3

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return cosine_alpha_bar(t)

    def encode(self, lattice: torch.Tensor, n_atoms: torch.Tensor) -> torch.Tensor:
        """(B, 3, 3) cell rows in angstrom, (B,) atom counts -> (B, 6). Not differentiable at degenerate cells."""
        g = lattice @ lattice.transpose(-1, -2)
        g = g / ((n_atoms.to(g.dtype) * self.v_ref) ** (2.0 / 3.0))[:, None, None]
        w, v = torch.linalg.eigh(g)
        log_g = v @ torch.diag_embed(torch.log(w)) @ v.transpose(-1, -2)
        return sym_to_vec(log_g) / self.scale

    def metric(self, x: torch.Tensor, n_atoms: torch.Tensor) -> torch.Tensor:
        """(B, 6) -> metric tensor G (B, 3, 3) in angstrom^2 (matrix_exp: differentiable also for cubic cells,
        where eigh-based gradients would be undefined)."""
        g = torch.linalg.matrix_exp(vec_to_sym(x * self.scale))
        return g * ((n_atoms.to(x.dtype) * self.v_ref) ** (2.0 / 3.0))[:, None, None]

    def decode(self, x: torch.Tensor, n_atoms: torch.Tensor) -> torch.Tensor:
        """(B, 6) -> lower-triangular cell rows (B, 3, 3) in angstrom (differentiable)."""
        g = self.metric(x, n_atoms)
        return torch.linalg.cholesky(0.5 * (g + g.transpose(-1, -2)))

    def sample_t(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
        return self.t_min + (1.0 - self.t_min) * torch.rand(n, generator=generator, dtype=dtype,
                                                            device=_device(generator))

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None):
        """(x_t, eps): x_t = sqrt(abar) x0 + sqrt(1 - abar) eps; the training target is eps."""
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        abar = self.alpha_bar(t).to(x0.dtype)[:, None]
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * eps, eps

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Tweedie / DDPM estimate of the clean state from a predicted eps."""
        abar = self.alpha_bar(t).to(x_t.dtype)[:, None]
        return (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()

    def prior(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(n, 6, generator=generator, dtype=dtype, device=_device(generator))

    def reverse_step(self, x_t, eps, t, s, generator=None) -> torch.Tensor:
        """Ancestral DDPM step from t to s < t (the exact-Gaussian form of the Euler-Maruyama step of the
        reverse VP SDE; DiffCSP uses the same): mean (x_t - beta eps / sqrt(1 - abar_t)) / sqrt(alpha),
        variance beta (1 - abar_s) / (1 - abar_t), alpha = abar_t / abar_s, beta = 1 - alpha."""
        abar_t, abar_s = self.alpha_bar(t).to(x_t.dtype)[:, None], self.alpha_bar(s).to(x_t.dtype)[:, None]
        alpha = abar_t / abar_s
        beta = 1.0 - alpha
        mean = (x_t - beta / (1.0 - abar_t).sqrt() * eps) / alpha.sqrt()
        var = beta * (1.0 - abar_s) / (1.0 - abar_t)
        noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=x_t.device)
        return mean + var.clamp(min=0).sqrt() * noise * (s > 0).to(x_t.dtype)[:, None]


def wrapped_normal_score(d: torch.Tensor, sigma: torch.Tensor, n_images: int = 3) -> torch.Tensor:
    """d/dd log sum_k N(d + k; 0, sigma^2), k = -n_images..n_images: the score of a wrapped normal at
    displacement d (any shape; sigma broadcastable). d is first wrapped to [-0.5, 0.5) so the images are
    symmetric; enough for sigma <= 0.5 (the first image left out, at distance >= 3.5, has relative weight
    exp(-3.5^2 / 0.5) ~ 2e-11)."""
    k = torch.arange(-n_images, n_images + 1, dtype=d.dtype, device=d.device)
    x = (torch.remainder(d + 0.5, 1.0) - 0.5).unsqueeze(-1) + k  # wrapped to [-0.5, 0.5): symmetric images
    s2 = (sigma**2).unsqueeze(-1)
    w = torch.softmax(-(x**2) / (2 * s2), dim=-1)
    return (w * (-x / s2)).sum(-1)


def wrapped_normal_log_density(d: torch.Tensor, sigma: torch.Tensor, n_images: int = 3) -> torch.Tensor:
    """log of the wrapped-normal density on [0, 1) (for tests and diagnostics)."""
    k = torch.arange(-n_images, n_images + 1, dtype=d.dtype, device=d.device)
    x = (torch.remainder(d + 0.5, 1.0) - 0.5).unsqueeze(-1) + k
    s2 = (sigma**2).unsqueeze(-1)
    return torch.logsumexp(-(x**2) / (2 * s2), dim=-1) - 0.5 * torch.log(2 * math.pi * s2.squeeze(-1))


@dataclass(frozen=True)
class TorusDiffusion:
    """VE wrapped-normal diffusion of fractional coordinates: x_t = (x0 + sigma(t) eps) mod 1,
    sigma(t) = sigma_min^(1 - t) sigma_max^t. The network predicts the score divided by sqrt(E[score^2]) at that
    sigma (DiffCSP's normalisation, which gives every noise level unit-variance targets)."""

    sigma_min: float = 0.005
    sigma_max: float = 0.5
    t_min: float = 1e-3
    n_images: int = 3

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min ** (1.0 - t) * self.sigma_max**t

    def score_norm(self, sigma: torch.Tensor, n_grid: int = 2000) -> torch.Tensor:
        """E[score^2] of the 1D wrapped normal at each sigma, by quadrature over one period (-> 1 / sigma^2 for
        small sigma, where a Gaussian fits inside the cell)."""
        d = (torch.arange(n_grid, dtype=torch.float64, device=sigma.device) + 0.5) / n_grid - 0.5
        s = sigma.detach().to(torch.float64).reshape(-1, 1)
        dens = torch.exp(wrapped_normal_log_density(d, s, self.n_images))
        score = wrapped_normal_score(d, s, self.n_images)
        norm = (dens * score**2).sum(-1) / n_grid
        small = (s[:, 0] < 0.02)  # a 2000-point grid cannot resolve sigma < 0.02; there the Gaussian value is exact
        norm = torch.where(small, 1.0 / s[:, 0] ** 2, norm)
        return norm.to(sigma.dtype).reshape(sigma.shape)

    def sample_t(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
        return self.t_min + (1.0 - self.t_min) * torch.rand(n, generator=generator, dtype=dtype,
                                                            device=_device(generator))

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None):
        """(x_t, target) for x0 (B, N, 3): target = score of the wrapped normal at x_t / sqrt(E[score^2])."""
        sigma = self.sigma(t).to(x0.dtype)[:, None, None]
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        x_t = torch.remainder(x0 + sigma * eps, 1.0)
        target = wrapped_normal_score(x_t - x0, sigma, self.n_images) / self.score_norm(sigma).sqrt()
        return x_t, target

    def score(self, normalised: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's normalised output (B, N, 3) back to the score d log p / dx."""
        sigma = self.sigma(t).to(normalised.dtype)[:, None, None]
        return normalised * self.score_norm(sigma).sqrt()

    def predict_x0(self, x_t: torch.Tensor, score: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Tweedie estimate of the clean coordinates, x_t + sigma^2 score (kept unwrapped for the gradient)."""
        return x_t + self.sigma(t).to(x_t.dtype)[:, None, None] ** 2 * score

    def prior(self, shape, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
        return torch.rand(shape, generator=generator, dtype=dtype, device=_device(generator))
