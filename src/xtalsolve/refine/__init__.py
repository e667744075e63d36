"""Rietveld and Le Bail refinement of candidate structures against measured powder patterns.

parameters.py  Parameter / ParameterSet (values, bounds, refined flags, esd's; the solver's flat vector)
constraints.py cell and Wyckoff constraints from spglib symmetry (affine maps from free parameters)
recipe.py      Profile, the forward model + background + scale, staged least squares, esd's
lebail.py      Le Bail decomposition (intensities free) to test a cell and space group without atoms
report.py      refined CIF with esd's, summary.json, Rietveld plot
"""

from __future__ import annotations

from pymatgen.core import Structure

from xtalsolve.errors import XtalsolveError
from xtalsolve.pattern import Pattern
from xtalsolve.physics.powder import Instrument
from xtalsolve.refine.constraints import perturb, symmetrize
from xtalsolve.refine.recipe import STAGES, Profile, Recipe, RefinementResult, instrument_for

__all__ = ["STAGES", "Profile", "Recipe", "RefinementResult", "instrument_for", "instrument_of", "lebail",
           "perturb", "refine", "symmetrize"]


def instrument_of(pattern: Pattern, radiation: str | None = None) -> Instrument:
    """The instrument a pattern implies: a stated Kalpha1;Kalpha2 pair (or --radiation CuKa) becomes the
    doublet with ratio 0.5, anything else a single line."""
    pair = pattern.meta.get("wavelengths_A")
    if pair and len(pair) == 2:
        return instrument_for(tuple(pair))
    if radiation is not None and radiation.strip().lower() == "cuka":
        from xtalsolve.radiation import WAVELENGTHS_A

        return instrument_for((WAVELENGTHS_A["CuKa1"], WAVELENGTHS_A["CuKa2"]))
    if pattern.wavelength is None:
        raise XtalsolveError("refinement needs the wavelength (--wavelength or --radiation)", pattern.source)
    return instrument_for(pattern.wavelength)


def _profile(pattern, excluded) -> Profile:
    return pattern if isinstance(pattern, Profile) else Profile.from_pattern(pattern, excluded)


def refine(pattern: Pattern | Profile, structure: Structure, instrument: Instrument | None = None, *,
           stages=STAGES, progress=None, max_nfev: int = 30, excluded=(), **options) -> RefinementResult:
    """Rietveld refinement of ``structure`` against ``pattern`` in the usual stages (scale/background ->
    cell/zero -> profile -> positions -> B). ``options`` go to :class:`Recipe` (n_background, symprec,
    displacement, texture, profile_params, biso, size)."""
    if instrument is None:
        instrument = instrument_of(pattern)
    recipe = Recipe(_profile(pattern, excluded), structure, instrument, **options)
    return recipe.refine(stages=stages, progress=progress, max_nfev=max_nfev)


def lebail(pattern: Pattern | Profile, structure: Structure, instrument: Instrument | None = None, *,
           cycles: int = 8, progress=None, excluded=(), **options) -> RefinementResult:
    """Le Bail fit of the cell and space group of ``structure`` (atoms ignored)."""
    from xtalsolve.refine.lebail import lebail_recipe, refine_lebail

    if instrument is None:
        instrument = instrument_of(pattern)
    recipe = lebail_recipe(_profile(pattern, excluded), structure, instrument, **options)
    return refine_lebail(recipe, cycles=cycles, progress=progress)
