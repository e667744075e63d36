"""Write src/xtalsolve/resources/space_group_prior.json: how often each space group occurs among training crystals
of each cell size, the prior from which `xtalsolve.candidates.symmetric_generator` draws space groups.

From structures that both protocols may train on: the MP-20 protocol's pool (mp20_train minus any id also in
mp20_val / mp20_test) minus the PXRDnet benchmark ids and their listed duplicates, so that neither benchmark's
answers are counted. Space groups by spglib at symprec 0.1 angstrom (pymatgen SpacegroupAnalyzer), counted per
number of atoms in the stored (primitive) cell.

    python tools/build_space_group_prior.py
"""

from __future__ import annotations

import json
import warnings
from collections import Counter, defaultdict
from pathlib import Path

from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from xtalsolve.data import load_structures, training_pool
from xtalsolve.data.structures import _benchmark_ids, _duplicate_keys

OUT = Path(__file__).resolve().parents[1] / "src" / "xtalsolve" / "resources" / "space_group_prior.json"


def main() -> None:
    warnings.filterwarnings("ignore")
    pool = training_pool("mp20")
    excluded = set(_benchmark_ids())
    duplicates = {material_id for _, material_id in _duplicate_keys()}
    ids = [i for i in pool.ids if i not in excluded and i not in duplicates]
    structures = load_structures("mp20_train", ids=ids, skip_invalid=True).structures
    counts: dict[int, Counter] = defaultdict(Counter)
    for structure in structures:
        number = SpacegroupAnalyzer(structure, symprec=0.1).get_space_group_number()
        counts[len(structure)][number] += 1
    out = {
        "source": "MP-20 protocol training pool minus the PXRDnet benchmark ids and duplicates "
                  "(tools/build_space_group_prior.py); spglib symprec 0.1 A",
        "n_structures": len(structures),
        "counts_by_n_atoms": {str(n): {str(g): c for g, c in sorted(counts[n].items())} for n in sorted(counts)},
    }
    OUT.write_text(json.dumps(out, indent=1))
    print(f"wrote {OUT}: {len(structures)} structures, {len(counts)} cell sizes, "
          f"{len({g for c in counts.values() for g in c})} space groups")


if __name__ == "__main__":
    main()
