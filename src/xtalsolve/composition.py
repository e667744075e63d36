"""From a chemical formula to trial cell contents: how many formula units Z a cell holds, and its volume.

A user gives a formula (``TiO2``), not the atom count of the cell. The trials are ranked by two data-derived
priors (resources/composition_priors.json, from the MP-20 train split by tools/build_composition_priors.py):
the cell volume predicted from per-element volumes, and where the pattern's first strong peak falls relative to
the cell size (d_first / V^(1/3)); with the frequency of cell sizes in the training data. The solver then tries
the most likely Z values and keeps the one whose refined structure fits best.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np
from pymatgen.core import Composition, Element

from xtalsolve.errors import XtalsolveError
from xtalsolve.pattern import Pattern


@dataclass(frozen=True)
class CellTrial:
    """One trial of cell contents: Z formula units, n_atoms sites, the predicted volume (angstrom^3) and its
    probability among the trials."""

    z: int
    n_atoms: int
    volume_A3: float
    probability: float

    def composition(self, formula: Composition) -> Composition:
        return formula.reduced_composition * self.z


@lru_cache(maxsize=1)
def _priors() -> dict:
    return json.loads(resources.files("xtalsolve.resources").joinpath("composition_priors.json").read_text())


def parse_formula(text: str) -> Composition:
    """The reduced composition of ``text`` (e.g. "TiO2", "Ca5(PO4)3F"); a clear error when it is not a formula."""
    try:
        composition = Composition(str(text).strip())
    except Exception:
        raise XtalsolveError(f"{text!r} is not a chemical formula", "--formula") from None
    if not all(isinstance(el, Element) for el in composition):  # pymatgen accepts "Xx" as a dummy species
        raise XtalsolveError(f"{text!r} names an unknown element", "--formula")
    if composition.num_atoms <= 0 or any(amount <= 0 for amount in composition.values()):
        raise XtalsolveError(f"{text!r} is not a chemical formula", "--formula")
    if any(not float(amount).is_integer() for amount in composition.reduced_composition.values()):
        raise XtalsolveError(f"{text!r} has fractional amounts; give a whole-number formula", "--formula")
    return composition.reduced_composition


def predicted_volume(composition: Composition) -> float:
    """Cell volume (angstrom^3) of ``composition`` from per-element volumes fitted on MP-20 train."""
    table = _priors()["element_volume_A3"]
    missing = [el.symbol for el in composition if el.symbol not in table]
    if missing:
        raise XtalsolveError(f"no volume prior for {', '.join(missing)}", "--formula")
    return float(sum(table[el.symbol] * amount for el, amount in composition.items()))


def first_peak_d(pattern: Pattern, prominence: float = 0.05) -> float | None:
    """d (angstrom) of the lowest-angle peak whose prominence above the local background is at least
    ``prominence`` of the strongest; None when no peak stands out."""
    from scipy.ndimage import gaussian_filter1d, minimum_filter1d
    from scipy.signal import find_peaks

    q = pattern.q
    y = np.asarray(pattern.y, dtype=float)
    window = max(3, len(y) // 20)
    background = gaussian_filter1d(minimum_filter1d(y, window), window / 2)
    net = gaussian_filter1d(np.clip(y - background, 0.0, None), 2.0)
    if net.max() <= 0:
        return None
    peaks, _ = find_peaks(net, prominence=prominence * net.max())
    if len(peaks) == 0:
        return None
    return float(2.0 * math.pi / q[peaks[0]])


def formula_unit_trials(
    formula: Composition, pattern: Pattern | None = None, max_atoms: int = 20, n_atoms: int | None = None
) -> list[CellTrial]:
    """Trial cell contents for ``formula``, most probable first.

    ``n_atoms`` (the user's --natoms) fixes the atom count; otherwise Z = 1, 2, ... up to ``max_atoms`` atoms are
    weighed by the training-set frequency of that cell size and, with a pattern, by how well the first peak's d
    fits a cell of the predicted volume.
    """
    reduced = formula.reduced_composition
    per_unit = int(round(reduced.num_atoms))
    if n_atoms is not None:
        if n_atoms % per_unit:
            raise XtalsolveError(f"{n_atoms} atoms is not a whole number of {reduced.reduced_formula} units", "--natoms")
        z_values = [n_atoms // per_unit]
    else:
        z_values = [z for z in range(1, max_atoms // per_unit + 1)]
        if not z_values:
            raise XtalsolveError(
                f"one formula unit of {reduced.reduced_formula} has {per_unit} atoms, more than {max_atoms}", "--formula"
            )
    priors = _priors()
    counts = priors["n_atoms_counts"]
    total = sum(counts.values())
    d_first = first_peak_d(pattern) if pattern is not None else None
    ratio = priors["log_first_peak_ratio"]
    log_scores = []
    for z in z_values:
        volume = predicted_volume(reduced * z)
        score = math.log((counts.get(str(z * per_unit), 0) + 1.0) / (total + len(counts)))
        if d_first is not None:
            score += -0.5 * ((math.log(d_first / volume ** (1 / 3)) - ratio["mean"]) / ratio["sd"]) ** 2
        log_scores.append(score)
    weights = np.exp(np.array(log_scores) - max(log_scores))
    weights /= weights.sum()
    trials = [
        CellTrial(z, z * per_unit, predicted_volume(reduced * z), float(p)) for z, p in zip(z_values, weights)
    ]
    return sorted(trials, key=lambda t: -t.probability)
