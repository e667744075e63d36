"""A batch of crystals as padded torch tensors: the internal form of every forward model and sampler.

Users never see this: public functions take and return pymatgen ``Structure``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from xtalsolve.errors import XtalsolveError

if TYPE_CHECKING:  # imported where structures are converted, so that training runs without pymatgen
    from pymatgen.core import Structure


def ragged_slots(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For items that come in consecutive groups of sizes ``counts``: each item's group and its place in it,
    the indices that scatter a flat list into a zero-padded (groups, max(counts)) array."""
    owner = np.repeat(np.arange(len(counts)), counts)
    return owner, np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)


@dataclass
class CrystalBatch:
    """B crystals padded to N sites each.

    lattice: (B, 3, 3) rows are the cell vectors a, b, c in angstrom.
    frac: (B, N, 3) fractional coordinates.
    numbers: (B, N) atomic numbers, 0 on padding.
    occupancy: (B, N) site occupancy, 0 on padding (a disordered site becomes one entry per species).
    """

    lattice: torch.Tensor
    frac: torch.Tensor
    numbers: torch.Tensor
    occupancy: torch.Tensor

    def __len__(self) -> int:
        return self.lattice.shape[0]

    @property
    def mask(self) -> torch.Tensor:
        """(B, N) True on real sites."""
        return self.numbers > 0

    @property
    def n_sites(self) -> torch.Tensor:
        return self.mask.sum(dim=1)

    @property
    def volume(self) -> torch.Tensor:
        """(B,) cell volumes in angstrom^3."""
        return torch.linalg.det(self.lattice).abs()

    def to(self, device=None, dtype=None) -> CrystalBatch:
        float_kw = {"device": device, "dtype": dtype}
        return CrystalBatch(
            self.lattice.to(**float_kw),
            self.frac.to(**float_kw),
            self.numbers.to(device=device),
            self.occupancy.to(**float_kw),
        )

    def __getitem__(self, index) -> CrystalBatch:
        return CrystalBatch(self.lattice[index], self.frac[index], self.numbers[index], self.occupancy[index])

    @classmethod
    def from_structures(cls, structures, dtype=torch.float64, device=None) -> CrystalBatch:
        """Pad a list of pymatgen Structures (ordered or disordered) into one batch."""
        from pymatgen.core import Structure

        structures = [structures] if isinstance(structures, Structure) else list(structures)
        if not structures:
            raise XtalsolveError("no structures given")
        frac, numbers, occupancy, counts = [], [], [], []
        for structure in structures:
            n_before = len(numbers)
            for site in structure:
                for species, share in site.species.items():
                    frac.append(site.frac_coords)
                    numbers.append(species.Z)
                    occupancy.append(share)
            if len(numbers) == n_before:
                raise XtalsolveError(f"structure {structure.composition.reduced_formula} has no atoms")
            counts.append(len(numbers) - n_before)
        counts = np.array(counts)
        owner, slot = ragged_slots(counts)
        shape = (len(structures), int(counts.max()))
        padded_frac, padded_numbers, padded_occupancy = np.zeros(shape + (3,)), np.zeros(shape, np.int64), np.zeros(shape)
        padded_frac[owner, slot] = np.array(frac)
        padded_numbers[owner, slot] = numbers
        padded_occupancy[owner, slot] = occupancy
        frac, numbers, occupancy = padded_frac, padded_numbers, padded_occupancy
        lattice = np.stack([s.lattice.matrix for s in structures])
        return cls(
            torch.as_tensor(lattice, dtype=dtype, device=device),
            torch.as_tensor(frac, dtype=dtype, device=device),
            torch.as_tensor(numbers, device=device),
            torch.as_tensor(occupancy, dtype=dtype, device=device),
        )

    def to_structures(self) -> list[Structure]:
        """Back to pymatgen (ordered sites; a partial occupancy becomes a disordered site)."""
        from pymatgen.core import Lattice, Structure

        out = []
        lattice = self.lattice.detach().cpu().double().numpy()
        frac = self.frac.detach().cpu().double().numpy()
        numbers = self.numbers.cpu().numpy()
        occupancy = self.occupancy.detach().cpu().double().numpy()
        for i in range(len(self)):
            keep = numbers[i] > 0
            species = [
                {int(z): float(o)} if o < 1.0 - 1e-9 else int(z) for z, o in zip(numbers[i][keep], occupancy[i][keep])
            ]
            out.append(Structure(Lattice(lattice[i]), species, frac[i][keep] % 1.0))
        return out
