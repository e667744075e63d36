"""Le Bail whole-pattern decomposition: the lattice, zero shift, background and profile refined by least
squares while the reflection intensities are free, re-estimated each cycle by partitioning the observed
pattern (A. Le Bail, H. Duroy, J. L. Fourquet, Mat. Res. Bull. 23, 447 (1988)). It checks a cell and space
group (through its absences) without any atoms.

Le Bail rather than Pawley: the intensities never enter the Jacobian, so a cycle costs the same as a Rietveld
step however many reflections there are.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from pymatgen.core import Structure

from xtalsolve.physics.powder import Instrument
from xtalsolve.refine.recipe import Profile, Recipe, RefinementResult


def lebail_recipe(profile: Profile, structure: Structure, instrument: Instrument, **kwargs) -> Recipe:
    """A Le Bail recipe: only the cell and space group of ``structure`` are used (atoms are ignored)."""
    kwargs.setdefault("profile_params", ("w", "v", "u", "x", "size"))
    return Recipe(profile, structure, instrument, lebail=True, **kwargs)


def refine_lebail(
    recipe: Recipe, cycles: int = 8, max_nfev: int = 10, blur_schedule=(0.4, 0.15), progress=None
) -> RefinementResult:
    """Alternate intensity partitioning and least squares over background, cell, zero and (after the first
    cycles) profile. The scale is fixed at 1 (the intensities carry it)."""
    t0 = time.perf_counter()
    recipe.initialise()
    _repartition(recipe)
    recipe.parameters.fix_all()
    recipe.parameters.release("background", "lattice", "zero")
    recipe.scan_cell()
    _repartition(recipe)
    for cycle, blur in enumerate(tuple(blur_schedule) + (0.0,) * cycles, start=1):
        recipe.blur = blur
        if blur == 0.0 and len(recipe.stages) >= len(blur_schedule) + 1:
            recipe.parameters.release("profile")
        recipe.fit(max_nfev=max_nfev)
        _repartition(recipe)
        recipe.stages.append({"stage": f"lebail cycle {cycle} (blur {blur:g} deg)", "rwp": recipe.rwp(),
                              "n_free": len(recipe.parameters.free), "seconds": round(time.perf_counter() - t0, 2)})
        if progress is not None:
            progress(recipe.stages[-1])
    return recipe.conclude(time.perf_counter() - t0)


def _repartition(recipe: Recipe, rounds: int = 3) -> None:
    """I_k <- I_k * I_obs,k / I_calc,k for every phase (a few rounds: each is one fixed-point step), scale
    folded in."""
    for _ in range(rounds):
        for phase, (_, obs, calc) in zip(recipe.phases, recipe.partition_all()):
            factor = np.where(calc > 1e-12 * max(calc.max(), 1e-300), np.clip(obs, 0.0, None) / np.maximum(calc, 1e-300), 1.0)
            phase.lebail_intensity = phase.lebail_intensity * torch.as_tensor(factor)
