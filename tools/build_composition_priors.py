"""Write src/xtalsolve/resources/composition_priors.json: the data-derived priors that turn a formula into trial
cell contents (formula units Z, cell volume).

From the MP-20 *train* split only (never the benchmark sets):
- per-element volumes (angstrom^3 / atom) by non-negative least squares, V_cell = sum_el n_el v_el;
- the spread of log(V_cell / V_predicted);
- the ratio d_first / V_cell^(1/3), d_first = the largest d (angstrom) of a reflection with at least 5 % of the
  strongest integrated intensity (Cu Kalpha, 2theta 2-90 deg, B = 0.5 A^2), on a seeded random subset.

    python tools/build_composition_priors.py [--n-peaks 3000]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from pymatgen.core import Composition, Element, Structure
from scipy.optimize import nnls

from xtalsolve.data import data_dir
from xtalsolve.physics.powder import bragg_peaks

OUT = Path(__file__).resolve().parents[1] / "src" / "xtalsolve" / "resources" / "composition_priors.json"


def first_peak_d(structure: Structure, threshold: float = 0.05) -> float:
    peaks = bragg_peaks(structure, 1.54184, (2.0, 90.0), biso=0.5)
    strongest = max(p["intensity"] for p in peaks)
    return max(p["d"] for p in peaks if p["intensity"] >= threshold * strongest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-peaks", type=int, default=3000)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    frame = pd.read_csv(data_dir() / "structures" / "mp20_train.csv.gz", keep_default_na=False,
                        usecols=["material_id", "n_atoms", "formula", "cif"])
    volume = frame.cif.str.extract(r"_cell_volume\s+([0-9.]+)")[0].astype(float).to_numpy()
    cells = []
    for formula, n_atoms in zip(frame.formula, frame.n_atoms):
        reduced = Composition(formula)
        cells.append({el.symbol: amt * n_atoms / reduced.num_atoms for el, amt in reduced.items()})
    elements = sorted({el for cell in cells for el in cell}, key=lambda s: Element(s).Z)
    column = {el: i for i, el in enumerate(elements)}
    design = np.zeros((len(cells), len(elements)))
    for row, cell in enumerate(cells):
        for el, amount in cell.items():
            design[row, column[el]] = amount
    # relative residuals: weight each row by 1/V so that small and large cells count alike
    weights = 1.0 / volume
    per_element, _ = nnls(design * weights[:, None], volume * weights)
    predicted = design @ per_element
    log_misfit = np.log(volume / predicted)

    rng = np.random.default_rng(0)
    rows = rng.choice(len(frame), size=min(args.n_peaks, len(frame)), replace=False)
    ratios = []
    for row in rows:
        structure = Structure.from_str(frame.cif.iloc[row], fmt="cif")
        ratios.append(first_peak_d(structure) / structure.volume ** (1 / 3))
    log_ratio = np.log(ratios)
    out = {
        "source": "MP-20 train split (../shared/data/structures/mp20_train.csv.gz), tools/build_composition_priors.py",
        "element_volume_A3": {el: round(float(v), 4) for el, v in zip(elements, per_element)},
        "log_volume_misfit": {"mean": float(log_misfit.mean()), "sd": float(log_misfit.std())},
        "log_first_peak_ratio": {"mean": float(log_ratio.mean()), "sd": float(log_ratio.std()),
                                 "quantiles": {str(q): float(np.quantile(log_ratio, q)) for q in (0.01, 0.05, 0.5, 0.95, 0.99)},
                                 "n": len(ratios)},
        "n_atoms_counts": {str(k): int(v) for k, v in sorted(frame.n_atoms.value_counts().items())},
    }
    OUT.write_text(json.dumps(out, indent=1))
    print(f"wrote {OUT}: {len(elements)} elements, volume misfit sd {log_misfit.std():.3f}, "
          f"log d_first/V^(1/3) {log_ratio.mean():.3f} +- {log_ratio.std():.3f}")


if __name__ == "__main__":
    main()
