"""Random crystals with space-group symmetry, a candidate source for the solver beside the diffusion model.

What a crystallographer's direct-space search does: pick a space group, put the atoms on Wyckoff positions that
hold the composition, give the cell the expected volume, and let the fit against the pattern do the rest. Space
groups are drawn from how often they occur among training crystals of the same cell size
(``resources/space_group_prior.json``, built by tools/build_space_group_prior.py from structures that neither
benchmark evaluates on). Symmetry is what the small CPU diffusion model does not learn: a symmetric candidate has
a handful of free parameters, so the batched fit can find the right one and cannot absorb misfit with P1 freedom.

Placement on Wyckoff positions is PyXtal's (Fredericks et al., Comput. Phys. Commun. 261, 107810 (2021)).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

import numpy as np
from pymatgen.core import Composition, Structure

from xtalsolve.composition import predicted_volume
from xtalsolve.errors import XtalsolveError

# lattice points per conventional cell, by the first letter of the Hermann-Mauguin symbol (PyXtal builds the
# conventional cell; R groups in the hexagonal setting)
CENTRING = {"P": 1, "A": 2, "B": 2, "C": 2, "I": 2, "F": 4, "R": 3}


@lru_cache(maxsize=1)
def _prior_counts() -> dict[int, dict[int, int]]:
    text = resources.files("xtalsolve.resources").joinpath("space_group_prior.json").read_text()
    raw = json.loads(text)["counts_by_n_atoms"]
    return {int(n): {int(g): c for g, c in groups.items()} for n, groups in raw.items()}


@lru_cache(maxsize=4096)
def _fits(group: int, counts: tuple[int, ...]) -> bool:
    """Whether the conventional-cell counts can sit on Wyckoff positions of ``group`` (PyXtal)."""
    from pyxtal.symmetry import Group

    return bool(Group(group).check_compatible(list(counts))[0])


@lru_cache(maxsize=256)
def centring(group: int) -> int:
    """Lattice points per conventional cell of space group ``group`` (1-230)."""
    from pyxtal.symmetry import Group

    return CENTRING[Group(group).symbol[0]]


def space_group_weights(cell: Composition, smoothing: float = 0.5) -> dict[int, float]:
    """Prior probability of each space group that can hold ``cell`` (primitive cell contents).

    Frequencies among training crystals with as many atoms per cell; groups seen only at other cell sizes get
    ``smoothing`` counts, so that an unusual group stays possible. Groups whose Wyckoff positions cannot hold the
    composition are left out.
    """
    prior = _prior_counts()
    n_atoms = int(round(cell.num_atoms))
    same_size = prior.get(n_atoms, {})
    seen = sorted({g for groups in prior.values() for g in groups})
    amounts = [int(round(a)) for a in cell.values()]
    weights = {}
    for group in seen:
        m = centring(group)
        if _fits(group, tuple(a * m for a in amounts)):
            weights[group] = same_size.get(group, 0) + smoothing
    if not weights:
        raise XtalsolveError(f"no space group holds {cell.formula} in a primitive cell", "--formula")
    total = sum(weights.values())
    return {g: w / total for g, w in weights.items()}


def random_symmetric_structures(
    cell: Composition,
    n: int,
    seed: int = 0,
    volume_A3: float | None = None,
    volume_spread: float = 0.12,
    space_groups: Sequence[int] | None = None,
    max_attempts: int = 20,
) -> list[Structure]:
    """``n`` random crystals with exactly the contents ``cell`` in their primitive cell.

    Space groups are drawn from :func:`space_group_weights` (or uniformly from ``space_groups``) without
    replacement until every group has had its turn; atoms go on random Wyckoff positions that hold the
    composition. Each crystal is Niggli-reduced and scaled to ``volume_A3`` (angstrom^3; default the composition
    prior) times a log-normal factor of sd ``volume_spread``. Seeded; a group whose placement fails passes its
    turn on, and ``max_attempts`` failures in a row are an error.
    """
    from pyxtal import pyxtal

    rng = np.random.default_rng(seed)
    weights = space_group_weights(cell) if space_groups is None else {int(g): 1.0 for g in space_groups}
    groups = np.array(sorted(weights))
    p = np.array([weights[g] for g in groups], dtype=float)
    p /= p.sum()
    volume = predicted_volume(cell) if volume_A3 is None else float(volume_A3)
    species = [el.symbol for el in cell]
    amounts = [int(round(cell[el])) for el in cell]
    # weighted order without replacement (Gumbel top-k), cycled: n draws cover the n most likely groups first
    # rather than repeating the commonest one
    order = groups[np.argsort(-(np.log(p) + rng.gumbel(size=len(p))))]
    out: list[Structure] = []
    draw = 0
    for _ in range(n):
        for _attempt in range(max_attempts):
            group = int(order[draw % len(order)])
            draw += 1
            m = centring(group)
            crystal = pyxtal()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    crystal.from_random(3, group, species, [a * m for a in amounts], factor=1.1,
                                        random_state=int(rng.integers(2**31)))
                except Exception:  # noqa: BLE001 - PyXtal signals an impossible placement by many exception types
                    continue
                if not crystal.valid:
                    continue
                structure = crystal.to_pymatgen().get_primitive_structure(tolerance=0.01).get_reduced_structure()
            if structure.composition != cell:
                continue
            structure.scale_lattice(volume * math.exp(volume_spread * rng.standard_normal()))
            structure.properties["origin"] = f"random symmetric crystal in space group {group}"
            out.append(structure)
            break
        else:
            raise XtalsolveError(f"could not place {cell.formula} in any drawn space group "
                                 f"after {max_attempts} attempts", "--formula")
    return out


def symmetric_generator():
    """A solver :data:`~xtalsolve.solve.Generator` drawing :func:`random_symmetric_structures`."""

    def generate(cell: Composition, n: int, seed: int, skip: int = 0) -> list[Structure]:
        return random_symmetric_structures(cell, n, seed)  # random draws: the seed, not skip, makes them new

    return generate
