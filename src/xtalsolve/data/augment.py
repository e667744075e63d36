"""Training patterns simulated on the fly, with the variety of real measurements.

Each batch of crystals is turned into patterns on the model's fixed Q grid (1/angstrom) as an instrument would
have measured them: a random wavelength and 2theta range (Q outside it is masked), crystallite size log-uniform
5 A - 1 um, microstrain, zero shift, mild March-Dollase texture, a Chebyshev background plus an amorphous hump,
Poisson counting noise and Gaussian read-out noise, then normalised to a maximum of 1 inside the measured range.
All randomness comes from the ``torch.Generator`` passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from xtalsolve.crystal.batch import CrystalBatch
from xtalsolve.physics.powder import Instrument, powder_pattern
from xtalsolve.radiation import WAVELENGTHS_A


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the measurement conditions drawn for each training pattern (units in the names)."""

    q_grid: tuple[float, float, int] = (0.5, 8.0, 512)  # min, max (1/angstrom), points
    size_A: tuple[float, float] = (5.0, 10_000.0)  # log-uniform crystallite size
    strain: tuple[float, float] = (0.0, 0.003)
    wavelengths_A: tuple[float, ...] = tuple(WAVELENGTHS_A[k] for k in ("CuKa", "CuKa1", "MoKa", "CoKa", "AgKa"))
    synchrotron_fraction: float = 0.3  # otherwise a lab line from ``wavelengths_A``
    synchrotron_A: tuple[float, float] = (0.2, 1.0)
    two_theta_min_deg: tuple[float, float] = (3.0, 15.0)
    two_theta_max_deg: tuple[float, float] = (60.0, 150.0)
    zero_shift_deg: float = 0.05  # standard deviation
    caglioti_w_deg2: tuple[float, float] = (0.0005, 0.01)
    texture_fraction: float = 0.3  # share of patterns with preferred orientation
    texture_ratio: tuple[float, float] = (0.8, 1.25)
    background_terms: int = 4
    background_level: tuple[float, float] = (0.0, 0.3)  # relative to the strongest peak
    hump_level: tuple[float, float] = (0.0, 0.3)
    hump_q: tuple[float, float] = (1.2, 2.5)  # centre of the amorphous hump (1/angstrom)
    counts: tuple[float, float] = (1e2, 1e5)  # log-uniform counts at the strongest point
    gaussian_noise: tuple[float, float] = (0.0, 0.01)
    biso_A2: tuple[float, float] = (0.2, 1.5)
    extra: dict = field(default_factory=dict)

    @property
    def grid(self) -> torch.Tensor:
        lo, hi, n = self.q_grid
        return torch.linspace(lo, hi, int(n), dtype=torch.float64)


def _uniform(lo: float, hi: float, n: int, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64, device=gen.device)


def _log_uniform(lo: float, hi: float, n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.exp(_uniform(math.log(lo), math.log(hi), n, gen))


def training_patterns(
    batch: CrystalBatch, aug: Augmentation = Augmentation(), generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Augmented patterns of a batch on ``aug.grid``.

    Returns patterns (B, P) scaled to max 1 inside the measured range and 0 outside, the mask (B, P) of the
    measured range, and the drawn conditions (one wavelength per batch; the rest per pattern).
    Computed where ``generator`` draws (a CUDA generator: on that GPU, the batch moved there); the same
    generator state gives the same patterns on one device, not across devices (their random streams differ).
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    device = gen.device
    batch = batch.to(device)
    n = len(batch)
    grid = aug.grid.to(device=device, dtype=batch.lattice.dtype)
    if torch.rand(1, generator=gen, device=device).item() < aug.synchrotron_fraction:
        wavelength = float(_uniform(*aug.synchrotron_A, 1, gen))
    else:
        wavelength = aug.wavelengths_A[int(torch.randint(len(aug.wavelengths_A), (1,), generator=gen, device=device))]
    size = _log_uniform(*aug.size_A, n, gen)
    strain = _uniform(*aug.strain, n, gen)
    zero = aug.zero_shift_deg * torch.randn(n, generator=gen, dtype=torch.float64, device=device)
    w = float(_uniform(*aug.caglioti_w_deg2, 1, gen))
    biso = _uniform(*aug.biso_A2, n, gen)
    textured = torch.rand(n, generator=gen, device=device) < aug.texture_fraction
    ratio = torch.where(textured, _uniform(*aug.texture_ratio, n, gen),
                        torch.ones(n, dtype=torch.float64, device=device))
    axis = torch.randint(-2, 3, (3,), generator=gen, device=device).cpu()
    axis = axis if bool(axis.any()) else torch.tensor([0, 0, 1])

    with torch.no_grad():
        y = powder_pattern(
            batch, grid, "q", Instrument(wavelength=wavelength, w=w), size=size, strain=strain, biso=biso,
            zero_shift=zero, preferred_orientation=(axis.tolist(), ratio), merge=True, binned=True,
        )

    # measured Q range from the drawn 2theta range (limited by the wavelength)
    q_limit = 4 * math.pi / wavelength
    tt_min = _uniform(*aug.two_theta_min_deg, n, gen)
    tt_max = _uniform(*aug.two_theta_max_deg, n, gen)
    q_min = q_limit * torch.sin(torch.deg2rad(tt_min) / 2)
    q_max = q_limit * torch.sin(torch.deg2rad(tt_max) / 2)
    mask = (grid >= q_min[:, None]) & (grid <= q_max[:, None])
    y = y * mask
    y = y / y.amax(1, keepdim=True).clamp(min=1e-30)

    # background: Chebyshev polynomial on the grid (kept positive) plus an amorphous hump
    t = (2 * (grid - grid[0]) / (grid[-1] - grid[0]) - 1).unsqueeze(0)
    coeffs = torch.randn(n, aug.background_terms, generator=gen, dtype=torch.float64, device=device)
    cheb = [torch.ones_like(t).expand(n, -1), t.expand(n, -1)]
    for _ in range(2, aug.background_terms):
        cheb.append(2 * t * cheb[-1] - cheb[-2])
    shape = sum(coeffs[:, k : k + 1] * cheb[k] for k in range(aug.background_terms))
    shape = shape - shape.amin(1, keepdim=True)
    shape = shape / shape.amax(1, keepdim=True).clamp(min=1e-30)
    background = _uniform(*aug.background_level, n, gen)[:, None] * shape
    centre = _uniform(*aug.hump_q, n, gen)[:, None]
    width = _uniform(0.3, 0.8, n, gen)[:, None]
    background = background + _uniform(*aug.hump_level, n, gen)[:, None] * torch.exp(-0.5 * ((grid - centre) / width) ** 2)
    y = y + background

    # counting statistics, then read-out noise
    counts = _log_uniform(*aug.counts, n, gen)[:, None]
    y = torch.poisson(y * counts, generator=gen) / counts
    y = y + _uniform(*aug.gaussian_noise, n, gen)[:, None] * torch.randn(y.shape, generator=gen, dtype=y.dtype,
                                                                          device=device)
    y = torch.where(mask, y, torch.zeros_like(y))
    y = y / y.amax(1, keepdim=True).clamp(min=1e-30)
    conditions = {"wavelength_A": wavelength, "size_A": size, "strain": strain, "zero_shift_deg": zero,
                  "caglioti_w_deg2": w, "texture_ratio": ratio, "texture_axis": axis, "q_min": q_min, "q_max": q_max,
                  "counts": counts[:, 0]}
    return y.to(torch.float32), mask, conditions


def model_input(pattern, aug: Augmentation = Augmentation()) -> tuple[torch.Tensor, torch.Tensor]:
    """A measured :class:`~xtalsolve.pattern.Pattern` as the model sees its training patterns: intensity
    interpolated onto ``aug.grid`` (Q, 1/angstrom), 0 outside the measured Q range (mask False there), scaled to a
    maximum of 1. Returns (P,) float32 intensity and (P,) bool mask."""
    import numpy as np

    q = pattern.q
    grid = aug.grid.numpy()
    mask = (grid >= q.min()) & (grid <= q.max())
    y = np.where(mask, np.interp(grid, q, pattern.y), 0.0)
    y = y - y[mask].min() if mask.any() else y
    y = np.where(mask, y, 0.0)
    y = y / max(float(y.max()), 1e-30)
    return torch.as_tensor(y, dtype=torch.float32), torch.as_tensor(mask)
