"""Automatic preferred-orientation search: which March-Dollase axis, if any, a refined phase needs.

What a crystallographer does when the intensities of one family of reflections are off: try the low-index
directions that the point group does not make equivalent, refine the March-Dollase ratio along each, and keep
the one that lowers Rwp clearly; otherwise keep the random powder. Phases are searched one after the other.
"""

from __future__ import annotations

import time

import numpy as np

from xtalsolve.refine.recipe import Recipe

LOW_INDEX_AXES = ((0, 0, 1), (1, 0, 0), (0, 1, 0), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))
"""Candidate texture axes (reciprocal-lattice directions hkl)."""

MIN_GAIN = 0.02
"""Relative Rwp decrease that an axis must bring to be kept (one parameter more; texture can also absorb
errors of the model, so only a clear gain counts)."""


def distinct_axes(point_rotations: np.ndarray, axes=LOW_INDEX_AXES) -> list[tuple[int, int, int]]:
    """``axes`` less those equivalent to an earlier one under the point group (h -> h R) or under h -> -h
    (the March-Dollase factor depends on cos^2 of the angle to the axis)."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for axis in axes:
        images = {tuple(int(v) for v in sign * np.asarray(axis) @ r) for r in point_rotations for sign in (1, -1)}
        if not images & seen:
            out.append(tuple(axis))
        seen |= images
    return out


def search_texture(recipe: Recipe, build, released: tuple[str, ...], max_nfev: int = 15,
                   min_gain: float = MIN_GAIN) -> tuple[Recipe, dict]:
    """Try each distinct low-index axis on each phase of the converged ``recipe`` in turn.

    build(textures) -> a new Recipe for the same data and phases with one texture axis (or None) per phase;
    it starts from the converged values and refines everything in ``released`` plus the texture ratios.
    Returns the recipe kept (``recipe`` itself when no axis helps) and a stage record of what was tried.
    """
    t0 = time.perf_counter()
    best, best_rwp = recipe, recipe.rwp()
    chosen: list = [None] * len(recipe.phases)
    tried = {}
    for i, phase in enumerate(recipe.phases):
        base, base_chosen = best, list(chosen)  # every axis of this phase starts from the same state
        for axis in distinct_axes(phase.symmetry.point_rotations):
            textures = base_chosen[:i] + [axis] + base_chosen[i + 1 :]
            trial = build(textures)
            for p in base.parameters:
                if p.name in trial.parameters:
                    trial.parameters[p.name].value = p.value
            trial.parameters.fix_all()
            trial.parameters.release(*released, "texture")
            trial.fit(max_nfev=max_nfev)
            rwp = trial.rwp()
            tried[f"{phase.name} {''.join(map(str, axis))}"] = rwp
            if rwp < best_rwp * (1.0 - min_gain):
                best, best_rwp, chosen = trial, rwp, textures
    record = {"stage": "texture search", "rwp": best_rwp, "n_free": len(best.parameters.free),
              "seconds": round(time.perf_counter() - t0, 2),
              "texture": {p.name: ("".join(map(str, t)) if t is not None else None) for p, t in zip(recipe.phases, chosen)},
              "tried": tried}
    return best, record
