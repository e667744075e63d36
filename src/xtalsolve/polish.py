"""Batched local fit of candidate crystals to a pattern, before they are ranked.

A sampled candidate of the right structure type usually has its cell a percent or two off and its atoms a tenth
of an angstrom away: its sharp peaks then miss the measured ones and its raw mismatch is no better than that of
a wrong structure. Ranking raw candidates therefore fails; ranking them after a short local fit does not.
Fitting every candidate with the full Rietveld engine (SciPy least squares per crystal) costs seconds each, so
this module fits all candidates at once: one autograd pass of the batched forward model per iteration, Adam on
a symmetric strain of the cell (rotation free, 6 numbers per crystal) and on the fractional coordinates (P1),
against :class:`~xtalsolve.diffusion.guidance.PatternLoss` (free scale and background in closed form), compared
coarse to fine (both patterns blurred alike, the blur shrinking to zero), as the guidance does during sampling.
Written here rather than with SciPy because it must run on a whole batch with one gradient evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pymatgen.core import Structure

from xtalsolve.crystal.batch import CrystalBatch
from xtalsolve.diffusion.guidance import PatternLoss, fit_size


@dataclass(frozen=True)
class PolishSettings:
    """Adam iterations, learning rates (strain: dimensionless; coordinates: fractional units) and the blur
    (1/angstrom) at the first iteration, shrinking linearly to 0 at ``sharp_from`` of the way through. The first
    ``lattice_only`` fraction moves the cell only: peak positions depend on the cell alone, and coordinates
    moved to compensate a wrong cell end in a false minimum."""

    steps: int = 80
    lr_strain: float = 0.01
    lr_frac: float = 0.004
    blur_start: float = 0.3
    sharp_from: float = 0.7
    lattice_only: float = 0.4
    max_strain: float = 0.25
    refit_size_at: tuple[float, ...] = (0.0, 0.5)


def _symmetric(params: torch.Tensor) -> torch.Tensor:
    """(B, 6) -> (B, 3, 3) symmetric strain (xx, yy, zz, yz, xz, xy)."""
    xx, yy, zz, yz, xz, xy = params.unbind(-1)
    return torch.stack([torch.stack([xx, xy, xz], -1), torch.stack([xy, yy, yz], -1),
                        torch.stack([xz, yz, zz], -1)], -2)


def polish_batch(batch: CrystalBatch, loss: PatternLoss, settings: PolishSettings = PolishSettings()
                 ) -> tuple[CrystalBatch, torch.Tensor]:
    """Fit every crystal of ``batch`` to ``loss``'s pattern (cell strain + P1 coordinates); returns the fitted
    batch and its final (unblurred) residual norms (B,). ``loss.size`` None: the crystallite size is fitted per
    crystal at the fractions ``settings.refit_size_at`` of the run and left set on the returned batch's loss."""
    batch = batch.to(dtype=torch.float64)
    own_size = loss.size is None
    strain = torch.zeros(len(batch), 6, dtype=torch.float64, requires_grad=True)
    shift = torch.zeros_like(batch.frac, requires_grad=True)
    optimiser = torch.optim.Adam([{"params": [strain], "lr": settings.lr_strain},
                                  {"params": [shift], "lr": settings.lr_frac}])
    mask = batch.mask.to(torch.float64)[..., None]
    refit_steps = {int(f * settings.steps) for f in settings.refit_size_at}

    def current() -> CrystalBatch:
        eye = torch.eye(3, dtype=torch.float64)
        deform = eye + _symmetric(strain.clamp(-settings.max_strain, settings.max_strain))
        return CrystalBatch(batch.lattice @ deform, batch.frac + shift * mask, batch.numbers, batch.occupancy)

    try:
        for step in range(settings.steps):
            if own_size and step in refit_steps:
                loss.size = None
                with torch.no_grad():
                    loss.size = fit_size(loss, current())
            progress = step / max(settings.steps * settings.sharp_from, 1)
            blur = settings.blur_start * max(1.0 - progress, 0.0)
            optimiser.zero_grad()
            value = loss(current(), blur=blur)
            value.sum().backward()
            for p in (strain, shift):
                if p.grad is not None:
                    p.grad = torch.nan_to_num(p.grad)
            if step < settings.lattice_only * settings.steps:
                shift.grad = None
            optimiser.step()
        with torch.no_grad():
            fitted = current()
            final = loss(fitted)
    finally:
        if own_size:
            loss.size = None
    out = CrystalBatch(fitted.lattice.detach(), torch.remainder(fitted.frac.detach(), 1.0) * mask,
                       batch.numbers, batch.occupancy)
    return out, final.detach()


def polish(structures: Sequence[Structure], loss: PatternLoss, settings: PolishSettings = PolishSettings(),
           chunk: int = 64) -> tuple[list[Structure], np.ndarray]:
    """Public entry: fit pymatgen ``structures`` to the pattern of ``loss``; returns the fitted structures and
    their residual norms, in the input order. Done in chunks of ``chunk`` crystals (memory)."""
    fitted, residuals = [], []
    for start in range(0, len(structures), chunk):
        batch = CrystalBatch.from_structures(list(structures[start:start + chunk]), dtype=torch.float64)
        out, res = polish_batch(batch, loss, settings)
        fitted += out.to_structures()
        residuals.append(res.numpy())
    return fitted, np.concatenate(residuals) if residuals else np.zeros(0)


__all__ = ["PolishSettings", "polish", "polish_batch"]
