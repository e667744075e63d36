"""Crystals as batched tensors, and their conversion to and from pymatgen."""

from xtalsolve.crystal.batch import CrystalBatch

__all__ = ["CrystalBatch"]
