"""Reading and writing crystal structures (CIF and anything pymatgen reads), with one-line errors."""

from __future__ import annotations

import warnings
from pathlib import Path

from pymatgen.core import Structure

from xtalsolve.errors import XtalsolveError


def read_structure(path: str | Path) -> Structure:
    """The first structure in a CIF (or POSCAR, ...) file; a clear error when there is none."""
    path = Path(path)
    if not path.is_file():
        raise XtalsolveError("no such file", path)
    if path.stat().st_size == 0:
        raise XtalsolveError("file is empty", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = Structure.from_file(path)
    except Exception as err:  # pymatgen raises many kinds; all mean the same to the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise XtalsolveError(f"cannot read a crystal structure ({reason})", path) from None
    if len(structure) == 0:
        raise XtalsolveError("structure has no atoms", path)
    if structure.volume < 1.0:
        raise XtalsolveError(f"cell volume {structure.volume:.3g} A^3 is not physical", path)
    return structure


def write_cif(structure: Structure, path: str | Path, symprec: float | None = 0.01) -> Path:
    """Write ``structure`` as CIF (symmetrised at ``symprec`` angstrom when given and found)."""
    from pymatgen.io.cif import CifWriter

    path = Path(path)
    try:
        CifWriter(structure, symprec=symprec).write_file(path)
    except Exception:  # symmetry search failed: keep P1 rather than lose the result
        CifWriter(structure).write_file(path)
    return path
