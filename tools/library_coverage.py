"""How many benchmark crystals have their structure type in each prototype library: the ceiling of what
substitution into known types can solve (the solver still has to draw, fit and rank the right candidate).

    python tools/library_coverage.py [--n 200]

A crystal's type is its space group and the Wyckoff letters of each element (``xtalsolve.prototypes.structure_type``,
spglib at 0.1 angstrom), computed on the cell PXRDnet stored, as the libraries' types were. Prints one line per
library and the crystals no library covers.
"""

from __future__ import annotations

import argparse
import warnings


def main() -> None:
    from xtalsolve.data import evaluation_set
    from xtalsolve.prototypes import LIBRARIES, library, structure_type

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="first N PXRDnet benchmark materials")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    tensors = evaluation_set("pxrdnet", first=args.n).load()
    types = []
    for i in range(len(tensors)):
        structure = tensors.structure(i)
        try:
            group, roles, _ = structure_type(structure)
            types.append((group, roles))
        except ValueError:
            types.append(None)
    missing = set(range(len(types)))
    for name in LIBRARIES:
        known = {(p.space_group, p.roles) for protos in library(name).values() for p in protos}
        covered = {i for i, t in enumerate(types) if t in known}
        missing -= covered
        first20 = sum(1 for i in covered if i < 20)
        print(f"{name}: {len(covered)} of {len(types)} have their type in the library (first 20: {first20})")
    for i in sorted(missing):
        structure = tensors.structure(i)
        print(f"  not covered: #{i} {tensors.ids[i]} {structure.composition.reduced_formula} "
              f"(space group {types[i][0] if types[i] else '?'}, {len(structure)} atoms)")


if __name__ == "__main__":
    main()
