"""Write src/xtalsolve/resources/prototype_library.json.gz: the structure types of the training crystals, the
library from which :mod:`xtalsolve.prototypes` draws candidates by element substitution.

From the same structures as the space-group prior (tools/build_space_group_prior.py): the MP-20 protocol's pool
minus the PXRDnet benchmark ids and their listed duplicates, so that neither benchmark's answers are in it.

A structure type is the space group (spglib, symprec 0.1 angstrom) and the Wyckoff letters each element occupies,
with elements anonymised: two crystals are of one type when their elements can be renamed onto each other
(rock salt NaCl, MgO, ...). Elements of a crystal are ordered into roles by (atoms per cell, Wyckoff letters,
Pauling electronegativity), so that the members of a type list their elements role by role. Each type keeps up to
``MAX_REPRESENTATIVES`` member cells (Niggli-reduced primitive cells) whose shapes differ (normalised cell lengths
or angles by more than ``SHAPE_TOLERANCE``), at least two compounds where it has them, the number of members and the element tuples of up to
``MAX_MEMBERS`` of them.

    python tools/build_prototype_library.py
"""

from __future__ import annotations

import gzip
import json
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
from xtalsolve.data import load_structures, training_pool
from xtalsolve.data.structures import _benchmark_ids, _duplicate_keys
from xtalsolve.prototypes import structure_type

OUT = Path(__file__).resolve().parents[1] / "src" / "xtalsolve" / "resources" / "prototype_library.json.gz"
MAX_REPRESENTATIVES = 3
MAX_MEMBERS = 40
SHAPE_TOLERANCE = 0.08


def shape(structure) -> np.ndarray:
    """Cell lengths over V^(1/3) and angles / 90 degrees, of the Niggli cell: comparable across members."""
    lattice = structure.lattice
    return np.concatenate([np.array(lattice.abc) / lattice.volume ** (1 / 3), np.array(lattice.angles) / 90.0])


def main() -> None:
    warnings.filterwarnings("ignore")
    pool = training_pool("mp20")
    excluded = set(_benchmark_ids()) | {material_id for _, material_id in _duplicate_keys()}
    ids = [i for i in pool.ids if i not in excluded]
    structures = load_structures("mp20_train", ids=ids, skip_invalid=True).structures
    types: dict[tuple, dict] = defaultdict(lambda: {"count": 0, "members": [], "representatives": [], "shapes": []})
    skipped = 0
    for structure in structures:
        try:
            group, roles_key, roles = structure_type(structure)
        except Exception:  # noqa: BLE001 - spglib fails on a few odd cells; they add no type
            skipped += 1
            continue
        symbols = [el.symbol for el in roles]
        entry = types[(group, roles_key)]
        entry["count"] += 1
        if len(entry["members"]) < MAX_MEMBERS:
            entry["members"].append(symbols)
        if len(entry["representatives"]) < MAX_REPRESENTATIVES:
            cell = structure.get_reduced_structure()
            form = shape(cell)
            new_shape = all(np.abs(form - other).max() > SHAPE_TOLERANCE for other in entry["shapes"])
            # a second compound even of the same shape, so that a type survives leaving one compound out
            spare = len(entry["representatives"]) == 1 and \
                entry["representatives"][0]["elements"] != symbols
            if new_shape or spare:
                entry["shapes"].append(form)
                role_of = {el: i for i, el in enumerate(roles)}
                entry["representatives"].append({
                    "lattice": np.round(cell.lattice.matrix, 5).tolist(),
                    "frac": np.round(cell.frac_coords % 1.0, 5).tolist(),
                    "roles": [role_of[site.specie] for site in cell],
                    "elements": symbols,
                })
    library = []
    for (group, roles), entry in sorted(types.items(), key=lambda kv: -kv[1]["count"]):
        library.append({"space_group": group, "roles": [list(r) for r in roles],
                        "n_atoms": len(entry["representatives"][0]["roles"]),
                        "count": entry["count"], "members": entry["members"],
                        "representatives": entry["representatives"]})
    out = {
        "source": "structure types of the MP-20 protocol training pool minus the PXRDnet benchmark ids and "
                  "duplicates (tools/build_prototype_library.py); spglib symprec 0.1 A",
        "n_structures": len(structures) - skipped,
        "types": library,
    }
    with gzip.open(OUT, "wt") as handle:
        json.dump(out, handle, separators=(",", ":"))
    print(f"wrote {OUT}: {out['n_structures']} structures, {len(library)} types, "
          f"{sum(len(t['representatives']) for t in library)} representatives, {OUT.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
