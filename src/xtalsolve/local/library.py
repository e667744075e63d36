"""Spectrum library: cached FEFF spectra turned into edge-aligned feature vectors with their clusters.

A library is what the template matcher searches and what the diffusion model trains on. It is saved as one
compressed ``.npz`` (features, neighbour positions and atomic numbers, metadata as JSON) so that a small library can ship
inside the package (``xtalsolve/local/data/``) and be used without FEFF. Each entry keeps the 12 atoms nearest
to the absorber.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pymatgen.core import Element

from xtalsolve.errors import XtalsolveError
from xtalsolve.io.spectra import FEATURE_GRID_EV, XasSpectrum, normalize
from xtalsolve.local.clusters import Cluster

# Neighbours kept per cluster for the model and the templates: the first shell plus a few more atoms.
MAX_NEIGHBOURS = 12


@dataclass
class SpectrumLibrary:
    """Feature vectors (M, G) on ``grid`` (eV relative to E0) and the nearest ``MAX_NEIGHBOURS`` atoms of each cluster.

    positions: (M, K, 3) angstrom, absorber at origin (not stored), padded with zeros; species: (M, K) atomic
    numbers, 0 = padding. meta: one dict per entry (absorber, material_key, split, perturbation, key).
    """

    grid: np.ndarray
    features: np.ndarray
    e0: np.ndarray
    positions: np.ndarray
    species: np.ndarray
    meta: list[dict]

    def __len__(self) -> int:
        return len(self.features)

    def subset(self, select) -> SpectrumLibrary:
        """Entries chosen by a boolean mask (length M) or by integer indices."""
        sel = np.asarray(list(select) if not isinstance(select, np.ndarray) else select)
        idx = np.flatnonzero(sel) if sel.dtype == bool else sel.astype(int)
        return SpectrumLibrary(self.grid, self.features[idx], self.e0[idx], self.positions[idx], self.species[idx],
                               [self.meta[i] for i in idx])

    def without_formulas(self, formulas) -> SpectrumLibrary:
        """Drop every entry of the given reduced formulas (e.g. the materials of a measured check)."""
        return self.subset([m.get("formula") not in set(formulas) for m in self.meta])

    def broadened(self, fwhm_eV: float) -> SpectrumLibrary:
        """Library with every spectrum convolved with a Gaussian of ``fwhm_eV`` (instrumental resolution of
        measured data; FEFF spectra carry only the core-hole lifetime)."""
        return self.aligned(fwhm_eV=fwhm_eV)

    def aligned(self, shift_eV: float = 0.0, stretch: float = 1.0, fwhm_eV: float = 0.0) -> SpectrumLibrary:
        """Library mapped onto a measured energy axis: a computed feature at E - E0 appears at
        ``shift_eV`` + ``stretch`` (E - E0), then every spectrum is convolved with a Gaussian of ``fwhm_eV``.
        The stretch corrects the energy scale of the computed spectra (FEFF10's Fe K features of 3d oxides lie
        20-40 % closer to the edge than measured ones, see docs/spectra.md); the shift, their E0; the Gaussian,
        the instrument's resolution. Grid ends are extended by their end values (no pull towards zero)."""
        if shift_eV == 0.0 and stretch == 1.0 and fwhm_eV <= 0:
            return self
        if not stretch > 0:
            raise XtalsolveError(f"energy stretch must be > 0, not {stretch}", "alignment")
        source = (self.grid - shift_eV) / stretch
        feats = np.stack([np.interp(source, self.grid, f) for f in self.features]) if (
            shift_eV != 0.0 or stretch != 1.0) else self.features
        if fwhm_eV > 0:
            from scipy.ndimage import gaussian_filter1d

            step = float(self.grid[1] - self.grid[0])
            sigma = fwhm_eV / (2.0 * np.sqrt(2.0 * np.log(2.0))) / step
            feats = gaussian_filter1d(feats, sigma, axis=1, mode="nearest")
        return SpectrumLibrary(self.grid, feats, self.e0, self.positions, self.species, self.meta)

    def split(self, name: str) -> SpectrumLibrary:
        return self.subset([m.get("split") == name for m in self.meta])

    def cluster(self, i: int, absorber: str | None = None) -> Cluster:
        ok = self.species[i] > 0
        sp = [Element.from_Z(int(z)).symbol for z in self.species[i][ok]]
        return Cluster((absorber or self.meta[i].get("absorber", "X"), *sp),
                       np.vstack([np.zeros(3), self.positions[i][ok]]), dict(self.meta[i]))

    def coordination_numbers(self, ligand: str = "O", absorber: str | None = None) -> np.ndarray:
        """First-shell ``ligand`` count of every entry (:func:`xtalsolve.local.clusters.first_shell`)."""
        from xtalsolve.local.clusters import first_shell

        return np.array([first_shell(self.cluster(i, absorber), ligand).coordination_number
                         for i in range(len(self))], dtype=int)

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, grid=self.grid, features=self.features.astype(np.float32), e0=self.e0,
                            positions=self.positions.astype(np.float32), species=self.species.astype(np.uint8),
                            meta=np.array(json.dumps(self.meta)))

    @classmethod
    def load(cls, path: str | Path) -> SpectrumLibrary:
        if not Path(path).exists():
            raise XtalsolveError("spectrum library not found", path)
        with np.load(path) as z:
            return cls(z["grid"], z["features"].astype(float), z["e0"], z["positions"].astype(float),
                       z["species"].astype(int), json.loads(str(z["meta"])))


def cluster_arrays(cluster: Cluster, k: int = MAX_NEIGHBOURS) -> tuple[np.ndarray, np.ndarray]:
    """Nearest ``k`` neighbours of the absorber: positions (k, 3) and atomic numbers (k,), 0 padded."""
    order = np.argsort(cluster.distances[1:], kind="stable")[:k] + 1
    pos = np.zeros((k, 3))
    sp = np.zeros(k, dtype=int)
    pos[: len(order)] = cluster.positions[order]
    sp[: len(order)] = [Element(cluster.species[i]).Z for i in order]
    return pos, sp


def build_library(cache_dir: str | Path, absorber: str | None = None, grid: np.ndarray = FEATURE_GRID_EV,
                  edge: str = "K") -> SpectrumLibrary:
    """Read every cached spectrum (``<key>.npz`` + ``<key>.json``) into a library; entries that fail are skipped."""
    from xtalsolve.local.feff import SpectrumCache

    cache = SpectrumCache(cache_dir)
    feats, e0s, poss, sps, metas = [], [], [], [], []
    for key in cache.keys():  # noqa: SIM118 - SpectrumCache.keys() is a method, not a dict
        energy, mu, rec = cache.get(key)
        cl = Cluster(tuple(rec["cluster"]["species"]), np.array(rec["cluster"]["positions_A"]), rec["meta"])
        if absorber is not None and cl.absorber != absorber:
            continue
        try:
            n = normalize(XasSpectrum(energy, mu, key, cl.absorber, edge))
        except XtalsolveError:
            continue
        pos, sp = cluster_arrays(cl)
        feats.append(n.on_grid(grid))
        e0s.append(n.e0)
        poss.append(pos)
        sps.append(sp)
        metas.append({**rec["meta"], "absorber": cl.absorber, "key": key})
    if not feats:
        raise XtalsolveError("no usable spectra in the cache", cache_dir)
    return SpectrumLibrary(np.asarray(grid), np.array(feats), np.array(e0s), np.array(poss), np.array(sps), metas)
