"""Rietveld and Le Bail refinement of candidate structures against measured powder patterns.

parameters.py  Parameter / ParameterSet (values, bounds, refined flags, esd's; the solver's flat vector)
constraints.py cell and Wyckoff constraints from spglib symmetry (affine maps from free parameters)
phase.py       one crystalline contribution: structure, constraints, reflection orbits, its own parameters
recipe.py      Profile, phases on a shared background and instrument, staged least squares, esd's, weight fractions
lebail.py      Le Bail decomposition (intensities free) to test a cell and space group without atoms
texture.py     automatic March-Dollase axis search after the stages (refine(texture="auto"))
report.py      refined CIF with esd's, summary.json, Rietveld plot
"""

from __future__ import annotations

from pymatgen.core import Structure

from xtalsolve.errors import XtalsolveError
from xtalsolve.pattern import Pattern
from xtalsolve.physics.powder import Instrument
from xtalsolve.refine.constraints import perturb, symmetrize
from xtalsolve.refine.recipe import STAGES, PhaseResult, Profile, Recipe, RefinementResult, instrument_for

__all__ = ["STAGES", "PhaseResult", "Profile", "Recipe", "RefinementResult", "instrument_for", "instrument_of",
           "lebail", "perturb", "refine", "symmetrize"]


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


def refine(pattern: Pattern | Profile, structure: Structure | list[Structure], instrument: Instrument | None = None,
           *, stages=STAGES, progress=None, max_nfev: int = 30, excluded=(), lebail_start: bool = False,
           scan: bool = True, orientations: bool = True, early_biso: bool = True, texture=None,
           **options) -> RefinementResult:
    """Rietveld refinement of ``structure`` (or of a list of phases, one contribution each) against ``pattern``
    in the usual stages (scale/background -> cell/zero -> profile -> positions -> B and occupancies).
    ``options`` go to :class:`Recipe` (n_background, symprec, displacement, profile_params, biso, size,
    asymmetry, refine_ratio, occupancies, names). ``texture``: a March-Dollase axis hkl, a list of axes (or None)
    per phase, or "auto": after the stages, try the low-index axes on each phase and keep one only where it lowers
    Rwp clearly (:func:`xtalsolve.refine.texture.search_texture`). ``lebail_start``: first fit the cells, zero
    and displacement by Le Bail (intensities free, so wrong atoms cannot pull the cells), then start the
    Rietveld stages from them without the cell scan. ``scan`` / ``orientations``: the isotropic cell scan before
    the cell stage and the swapped starts of pseudo-symmetric cells (both on by default; off for candidates
    already fitted to the pattern, as in ``solve``). ``early_biso``: the cell stage is also run with B released
    and the lower Rwp kept (:meth:`Recipe.refine`). ``result.phases`` holds each phase's structure, cell and
    Hill-Howard weight fraction; ``result.structure`` etc. are the first phase's."""
    import time

    auto_texture = isinstance(texture, str)
    if auto_texture and texture != "auto":
        raise XtalsolveError(f"texture must be an axis h,k,l, a list of axes, None or 'auto', not {texture!r}", "texture")
    if instrument is None:
        instrument = instrument_of(pattern)
    profile = _profile(pattern, excluded)
    t0 = time.perf_counter()
    recipe = Recipe(profile, structure, instrument, texture=None if auto_texture else texture, **options)
    start_record = None
    if lebail_start:
        from xtalsolve.refine.lebail import lebail_recipe, refine_lebail

        pre = lebail_recipe(profile, structure, instrument, **options)
        refine_lebail(pre, cycles=4)
        for p in pre.parameters:
            if p.group in ("lattice", "zero") and p.name in recipe.parameters:
                recipe.parameters[p.name].value = p.value
        start_record = {"stage": "lebail start", "rwp": pre.rwp(), "n_free": len(pre.parameters.free),
                        "seconds": round(time.perf_counter() - t0, 2)}
        if progress is not None:
            progress(start_record)
    result = recipe.refine(stages=stages, progress=progress, max_nfev=max_nfev, scan=scan and not lebail_start,
                           orientations=orientations, early_biso=early_biso)
    if auto_texture:
        from xtalsolve.refine.texture import search_texture

        released = tuple(dict.fromkeys(group for _, groups in stages for group in groups))
        kept, record = search_texture(
            recipe, lambda axes: Recipe(profile, structure, instrument, texture=axes, **options), released)
        if progress is not None:
            progress(record)
        if kept is not recipe:
            kept.stages = list(recipe.stages)
            result = kept.conclude(time.perf_counter() - t0)
        result.stages.append(record)
    if start_record is not None:
        result.stages.insert(0, start_record)
    result.seconds = time.perf_counter() - t0
    return result


def lebail(pattern: Pattern | Profile, structure: Structure | list[Structure], instrument: Instrument | None = None, *,
           cycles: int = 8, progress=None, excluded=(), **options) -> RefinementResult:
    """Le Bail fit of the cell and space group of ``structure`` (atoms ignored)."""
    from xtalsolve.refine.lebail import lebail_recipe, refine_lebail

    if instrument is None:
        instrument = instrument_of(pattern)
    recipe = lebail_recipe(_profile(pattern, excluded), structure, instrument, **options)
    return refine_lebail(recipe, cycles=cycles, progress=progress)
