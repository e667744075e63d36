"""Absorber sites from the shared crystal sets, as clusters ready for FEFF, with a split held out by material.

Sources (all offline):

- ``zeolites``: the 246 IZA frameworks in ``../shared/data/structures/zeolites_iza`` (pure SiO2);
- ``mp``: rows of ``mp20_{train,val,test}``, ``mpts52_extra`` and ``mp40_extra`` whose formula holds the absorber
  and the ligand (SiO2 polymorphs, silicates, Fe oxides, ...; Materials Project data, CC BY 4.0);
- ``amcsd``: mineral CIFs of the American Mineralogist Crystal Structure Database as bundled (trimmed, 9,275
  CIFs) in the PyPI wheel ``larixite`` (Downs & Hall-Wallace, Am. Mineral. 88, 247 (2003)); only ordered
  structures are used. The bundled database is opened directly: ``larixite.amcsd.get_amcsd`` would try a download.

Split: ``material_split`` hashes a material key (reduced formula + space-group number) so that every copy of one
material (from any source, any site, any perturbation) lands in the same split.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pymatgen.core import Composition, Structure

from xtalsolve.errors import XtalsolveError
from xtalsolve.local.clusters import Cluster, cut_cluster, first_shell_indices, perturb, shell_cutoff

SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "data"  # ../shared/data from the repo root
MP_FILES = ("mp20_train", "mp20_val", "mp20_test", "mpts52_extra", "mp40_extra")
SOURCES = ("zeolites", "mp", "amcsd")
PERTURBATION_CYCLE = ("stretch", "bend", "rattle", "vacancy")
MIN_DISTANCE_A = 0.5  # crystals with two atoms closer than this are rejected as broken


def shared_data_dir() -> Path:
    """``../shared/data`` seen from the repository root (override with XTALSOLVE_SHARED_DATA)."""
    import os

    return Path(os.environ.get("XTALSOLVE_SHARED_DATA", SHARED))


@dataclass(frozen=True)
class MaterialRef:
    """A crystal to be parsed lazily: ``load()`` returns a pymatgen Structure (or None when unusable)."""

    source: str
    material_id: str
    formula: str
    load: Callable[[], Structure | None]


def material_split(key: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """Deterministic train/val/test assignment of a material key by its SHA-256."""
    u = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "train" if u < fractions[0] else ("val" if u < fractions[0] + fractions[1] else "test")


def material_key(structure: Structure) -> str:
    """Reduced formula and space-group number (symprec 0.1 angstrom), e.g. ``SiO2|154``."""
    try:
        sg = structure.get_space_group_info(symprec=0.1)[1]
    except Exception:  # noqa: BLE001 - spglib/pymatgen raise many kinds on odd cells; the key just loses its group
        sg = 0
    return f"{structure.composition.reduced_formula}|{sg}"


def _has(formula: str, elements: set[str]) -> bool:
    try:
        return elements <= {e.symbol for e in Composition(formula).elements}
    except (ValueError, KeyError):
        return False


def _parse_cif(text: str) -> Structure | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            s = Structure.from_str(text, fmt="cif")
        except Exception:  # noqa: BLE001 - a malformed CIF of any kind is skipped, never fatal for a batch
            return None
    if not s.is_ordered:
        return None
    # Overlapping sites (e.g. a CIF whose symmetry generates near-duplicates: IZA OSO parses as Si15O18 with pairs
    # 0.001 A apart) make FEFF's potential stage fail: skip such crystals.
    centers, _, _, _ = s.get_neighbor_list(MIN_DISTANCE_A)
    return None if len(centers) else s


def material_refs(absorber: str, ligand: str = "O", sources=SOURCES, data_dir: Path | None = None) -> list[MaterialRef]:
    """Every candidate crystal holding ``absorber`` and ``ligand`` in the chosen sources (not yet parsed)."""
    root = data_dir or shared_data_dir()
    refs: list[MaterialRef] = []
    need = {absorber, ligand}
    if "zeolites" in sources and need <= {"Si", "O"}:
        for p in sorted((root / "structures" / "zeolites_iza").glob("*.cif")):
            refs.append(MaterialRef("zeolites_iza", f"iza-{p.stem}", "SiO2", lambda p=p: _parse_cif(p.read_text())))
    if "mp" in sources:
        import pandas as pd

        for name in MP_FILES:
            path = root / "structures" / f"{name}.csv.gz"
            if not path.exists():
                continue
            df = pd.read_csv(path, keep_default_na=False, usecols=["material_id", "formula", "cif"])
            df = df[df.formula.map(lambda f: _has(f, need))]
            for mid, formula, cif in zip(df.material_id, df.formula, df.cif):
                refs.append(MaterialRef(name, mid, formula, lambda c=cif: _parse_cif(c)))
    if "amcsd" in sources:
        refs += _amcsd_refs(need)
    return refs


def _amcsd_refs(need: set[str]) -> list[MaterialRef]:
    try:
        import larixite
    except ImportError:
        return []
    import sqlite3

    db = Path(larixite.__file__).parent / "amcsd_cif1.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = con.execute("select cif_id, group_concat(element) from cif_elements group by cif_id").fetchall()
    con.close()
    ids = sorted(int(cid) for cid, els in rows if need <= set(els.split(",")))

    def load(cid: int) -> Structure | None:
        from larixite.amcsd import AMCSD

        global _AMCSD
        if _AMCSD is None:
            _AMCSD = AMCSD()  # bundled trimmed database; no network
        try:
            return _parse_cif(_AMCSD.get_cif(cid).ciftext)
        except Exception:  # noqa: BLE001 - larixite's CIF assembly fails in many ways on odd entries; skip them
            return None

    return [MaterialRef("amcsd", f"amcsd-{cid:07d}", "", lambda c=cid: load(c)) for cid in ids]


_AMCSD = None


def absorber_sites(structure: Structure, absorber: str, ligand: str = "O") -> list[int]:
    """Symmetry-unique ``absorber`` sites whose whole first shell (within the pair cutoff) is ``ligand``."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    try:
        sym = SpacegroupAnalyzer(structure, symprec=0.1).get_symmetrized_structure()
        groups = sym.equivalent_indices
    except Exception:  # noqa: BLE001 - spglib failure: fall back to every site
        groups = [[i] for i in range(len(structure))]
    rc = shell_cutoff(absorber, ligand, np.array([2.0]))
    out = []
    for g in groups:
        i = g[0]
        if structure[i].specie.symbol != absorber:
            continue
        nbrs = structure.get_neighbors(structure[i], rc)
        if nbrs and all(n.specie.symbol == ligand for n in nbrs):
            out.append(i)
    return out


def iter_clusters(
    absorber: str = "Si",
    ligand: str = "O",
    sources=SOURCES,
    n_perturbed: int = 4,
    n_atoms: int = 49,
    seed: int = 0,
    splits=("train", "val", "test"),
    max_atoms_per_cell: int = 400,
    max_z: int | None = None,
    data_dir: Path | None = None,
    min_cn: int = 0,
    max_cn: int | None = None,
) -> Iterator[Cluster]:
    """Clusters for FEFF: per unique absorber site, the unperturbed cluster then ``n_perturbed`` perturbed copies.

    Materials are visited in a seeded random order (so a partial run covers all sources). Perturbation kinds cycle
    through stretch, bend, rattle, vacancy; the seed of copy ``k`` is derived from (seed, material, site, k).
    ``max_z`` skips crystals holding heavier elements (FEFF's SCF is 3-10x slower with transition metals);
    ``min_cn`` keeps only sites with at least that many first-shell ligands (e.g. 5: the five- and six-fold Si of
    high-pressure phases, rare among crystals and so needed on purpose; their vacancy copies are one lower);
    ``max_cn`` only those with at most that many (e.g. 4: tetrahedral Fe, a minority among Fe-O sites).
    ``meta`` of each cluster: source, material_id, formula, material_key, split, site, perturbation.
    """
    refs = material_refs(absorber, ligand, sources, data_dir)
    order = np.random.default_rng(seed).permutation(len(refs))
    for j in order:
        ref = refs[j]
        s = ref.load()
        if s is None or len(s) > max_atoms_per_cell or absorber not in {e.symbol for e in s.composition.elements}:
            continue
        if max_z is not None and max(e.Z for e in s.composition.elements) > max_z:
            continue
        key = material_key(s)
        split = material_split(key)
        if split not in splits:
            continue
        for site in absorber_sites(s, absorber, ligand):
            meta = {"source": ref.source, "material_id": ref.material_id, "formula": s.composition.reduced_formula,
                    "material_key": key, "split": split, "absorber": absorber}
            base = cut_cluster(s, site, n_atoms=n_atoms, meta=meta)
            cn = len(first_shell_indices(base, ligand))
            if cn < min_cn or (max_cn is not None and cn > max_cn):
                continue
            yield base
            for k in range(n_perturbed):
                kind = PERTURBATION_CYCLE[k % len(PERTURBATION_CYCLE)]
                sub = int(hashlib.sha256(f"{seed}|{ref.material_id}|{site}|{k}".encode()).hexdigest()[:8], 16)
                if kind == "vacancy" and len(first_shell_indices(base, ligand)) < 2:
                    continue
                yield perturb(base, kind, sub)


def check_absorber(absorber: str) -> str:
    """Validate an element symbol given on the command line."""
    from pymatgen.core import Element

    try:
        return Element(absorber).symbol
    except ValueError:
        raise XtalsolveError(f"{absorber!r} is not an element symbol", "--absorber") from None


def generate(
    out: str | Path,
    absorber: str = "Si",
    ligand: str = "O",
    sources=SOURCES,
    limit: int | None = None,
    workers: int = 1,
    n_perturbed: int = 4,
    seed: int = 0,
    n_atoms: int = 49,
    max_z: int | None = None,
    progress: bool = True,
    min_cn: int = 0,
    max_cn: int | None = None,
    splits=("train", "val", "test"),
) -> dict:
    """Compute FEFF10 spectra of up to ``limit`` clusters into the cache directory ``out`` (resumable).

    Cached clusters count towards ``limit`` but cost nothing, so re-running the same command resumes.
    ``splits``: only materials of these splits (e.g. ("train",): more training data, held-out sets unchanged).
    """
    from itertools import islice

    from xtalsolve.local.feff import FeffSettings, SpectrumCache, compute_spectra

    bad = set(sources) - set(SOURCES)
    if bad:
        raise XtalsolveError(f"unknown source(s) {sorted(bad)}; choose from {list(SOURCES)}", "--sources")
    bad = set(splits) - {"train", "val", "test"}
    if bad or not splits:
        raise XtalsolveError(f"unknown split(s) {sorted(bad)}; choose from train, val, test", "--splits")
    clusters = iter_clusters(absorber, ligand, sources, n_perturbed=n_perturbed, n_atoms=n_atoms, seed=seed,
                             splits=tuple(splits), max_z=max_z, min_cn=min_cn, max_cn=max_cn)
    if limit is not None:
        clusters = islice(clusters, limit)
    return compute_spectra(clusters, SpectrumCache(out), FeffSettings(), workers=workers, progress=progress,
                           total=limit)
