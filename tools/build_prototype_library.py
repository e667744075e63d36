"""Write src/xtalsolve/resources/prototype_library.json.gz: the structure types of the training crystals, the
library from which :mod:`xtalsolve.prototypes` draws candidates by element substitution.

Two libraries, one per benchmark protocol (data README section 3), so that neither benchmark's answers are in the
library it is run with:

* ``--protocol mp20`` (``prototype_library.json.gz``): the MP-20 protocol's pool (mp20_train only), minus the
  PXRDnet benchmark ids and their listed duplicates, the same structures as the space-group prior
  (tools/build_space_group_prior.py). Valid for both benchmarks.
* ``--protocol pxrdnet`` (``prototype_library_pxrdnet.json.gz``): the PXRDnet protocol's pool (mp20 train, val
  and test, MPTS-52, MP-40, AFLOW, WBM, perov-5, carbon-24, zeolites, MOFs; minus the 1,130 benchmark ids and
  their duplicates), cells of at most ``MAX_ATOMS`` atoms, each material id once. It holds most of mp20_test, so
  it must never be used for the MP-20 protocol. The solver uses it as the second tier of its "extended" library
  (:data:`xtalsolve.prototypes.LIBRARIES`): only the types mp20_train lacks, ranked after those of mp20_train.

A structure type is the space group (spglib, symprec 0.1 angstrom) and the Wyckoff letters each element occupies,
with elements anonymised: two crystals are of one type when their elements can be renamed onto each other
(rock salt NaCl, MgO, ...). Elements of a crystal are ordered into roles by (atoms per cell, Wyckoff letters,
Pauling electronegativity), so that the members of a type list their elements role by role. Each type keeps up to
``MAX_REPRESENTATIVES`` member cells (Niggli-reduced primitive cells) whose shapes differ (normalised cell lengths
or angles by more than ``SHAPE_TOLERANCE``), at least two compounds where it has them, the number of members and the element tuples of up to
``MAX_MEMBERS`` of them; each representative names its material id.

    python tools/build_prototype_library.py [--protocol mp20|pxrdnet]
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
from xtalsolve.data import load_structures, training_pool
from xtalsolve.data.structures import _benchmark_ids, _duplicate_keys
from xtalsolve.prototypes import structure_type

RESOURCES = Path(__file__).resolve().parents[1] / "src" / "xtalsolve" / "resources"
OUT = {"mp20": RESOURCES / "prototype_library.json.gz", "pxrdnet": RESOURCES / "prototype_library_pxrdnet.json.gz"}
MAX_ATOMS = 52
MAX_REPRESENTATIVES = 3
MAX_MEMBERS = 40
SHAPE_TOLERANCE = 0.08


def shape(structure) -> np.ndarray:
    """Cell lengths over V^(1/3) and angles / 90 degrees, of the Niggli cell: comparable across members."""
    lattice = structure.lattice
    return np.concatenate([np.array(lattice.abc) / lattice.volume ** (1 / 3), np.array(lattice.angles) / 90.0])


def pool_structures(protocol: str):
    """The library's crystals of a protocol (see the module docstring): (material id, pymatgen Structure)."""
    if protocol == "mp20":
        pool = training_pool("mp20")
        excluded = set(_benchmark_ids()) | {material_id for _, material_id in _duplicate_keys()}
        ids = [i for i in pool.ids if i not in excluded]
        loaded = load_structures("mp20_train", ids=ids, skip_invalid=True)
        yield from zip(loaded.ids, loaded.structures)
        return
    seen: set[str] = set()
    for source, ids in training_pool("pxrdnet", max_atoms=MAX_ATOMS).by_source().items():
        ids = [i for i in ids if i not in seen]
        seen.update(ids)
        loaded = load_structures(source, ids=ids, skip_invalid=True)
        yield from zip(loaded.ids, loaded.structures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=sorted(OUT), default="mp20")
    protocol = parser.parse_args().protocol
    warnings.filterwarnings("ignore")
    types: dict[tuple, dict] = defaultdict(lambda: {"count": 0, "members": [], "representatives": [], "shapes": []})
    used = skipped = 0
    start = time.time()
    for material_id, structure in pool_structures(protocol):
        try:
            if not structure.is_ordered:
                raise ValueError("disordered")
            group, roles_key, roles = structure_type(structure)
        except Exception:  # noqa: BLE001 - spglib fails on a few odd cells, disordered ones have no type
            skipped += 1
            continue
        used += 1
        if used % 5000 == 0:
            print(f"{used} crystals typed, {len(types)} types, {time.time() - start:.0f} s", flush=True)
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
                    "id": material_id,
                })
    library = []
    for (group, roles), entry in sorted(types.items(), key=lambda kv: -kv[1]["count"]):
        library.append({"space_group": group, "roles": [list(r) for r in roles],
                        "n_atoms": len(entry["representatives"][0]["roles"]),
                        "count": entry["count"], "members": entry["members"],
                        "representatives": entry["representatives"]})
    pool = {"mp20": "the MP-20 protocol training pool (mp20_train)",
            "pxrdnet": f"the PXRDnet protocol training pool (cells of <= {MAX_ATOMS} atoms)"}[protocol]
    out = {
        "source": f"structure types of {pool} minus the PXRDnet benchmark ids and duplicates "
                  f"(tools/build_prototype_library.py --protocol {protocol}); spglib symprec 0.1 A",
        "protocol": protocol,
        "n_structures": used,
        "types": library,
    }
    path = OUT[protocol]
    with gzip.open(path, "wt") as handle:
        json.dump(out, handle, separators=(",", ":"))
    print(f"wrote {path}: {used} structures ({skipped} without a type), {len(library)} types, "
          f"{sum(len(t['representatives']) for t in library)} representatives, {path.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
