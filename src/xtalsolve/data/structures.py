"""Structure sets of the shared data folder: loading, a cached ragged-array form, and the protocol pools.

Sources are the ``*.csv.gz`` files (columns ``material_id``, ``cif``, optionally ``split`` and ``formula``) and
folders of CIFs under ``<data>/structures``, plus ``pxrdnet_test`` (``benchmarks/pxrdnet_test_structures.csv.gz``).
Any other csv(.gz), CIF folder or single CIF can be given by path.

The pools implement the binding training rules of ``<data>/README.md`` section 3; see ``training_pool``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from xtalsolve.crystal import CrystalBatch
from xtalsolve.errors import XtalsolveError

if TYPE_CHECKING:  # pymatgen is imported where structures are parsed or built, so that training runs without it
    from pymatgen.core import Structure

log = logging.getLogger(__name__)

DATA_ENV = "XTALSOLVE_DATA"
CACHE_ENV = "XTALSOLVE_CACHE"
CACHE_FORMAT = 1  # bump when the .npz layout changes
PXRDNET_PAPER_N = 200  # PXRDnet evaluated the first 200 of its 1,130 test ids

PXRDNET_EXTRAS = (
    "mpts52_extra",
    "mp40_extra",
    "aflow",
    "wbm_hypothetical_10k",
    "perov5_val",
    "perov5_test",
    "carbon24_val",
    "carbon24_test",
    "zeolites_iza",
    "mof_coremof2019_subset200",
)
"""Extra sets the PXRDnet protocol may train on (data README section 3)."""

PROTOCOLS = ("pxrdnet", "mp20")
_BENCHMARK_FILES = {"pxrdnet_test": "benchmarks/pxrdnet_test_structures.csv.gz"}


# ---------------------------------------------------------------------------------------------------------------
# Locations


def _repo_roots() -> Iterable[Path]:
    """Folders holding a pyproject.toml above this file (editable install) and above the working directory."""
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for folder in (start, *start.parents):
            if (folder / "pyproject.toml").is_file():
                yield folder


def data_dir() -> Path:
    """The shared data folder: $XTALSOLVE_DATA, else <repo>/../shared/data."""
    if os.environ.get(DATA_ENV):
        path = Path(os.environ[DATA_ENV]).expanduser()
        if not path.is_dir():
            raise XtalsolveError(f"data folder {path} does not exist", DATA_ENV)
        return path
    for root in _repo_roots():
        candidate = root.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    raise XtalsolveError("shared data folder not found; set it or place it at <repo>/../shared/data", DATA_ENV)


def cache_dir() -> Path:
    """Where parsed sets are cached: $XTALSOLVE_CACHE, else ~/.cache/xtalsolve (subfolder ``structures``)."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "xtalsolve"
    return Path(root).expanduser() / "structures"


def _name_of(path: Path) -> str:
    name = path.name
    for suffix in (".csv.gz", ".csv", ".cif"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def dataset_names() -> list[str]:
    """Names accepted by ``load_structures``: the csv.gz stems and CIF folders of structures/, and pxrdnet_test."""
    folder = data_dir() / "structures"
    names = [_name_of(p) for p in folder.iterdir() if p.name.endswith(".csv.gz") or p.is_dir()]
    return sorted(names) + list(_BENCHMARK_FILES)


def resolve_source(name_or_path: str | Path) -> tuple[str, Path]:
    """(set name, path) of a shared set name or of a csv(.gz) / CIF folder / CIF file path."""
    text = str(name_or_path)
    if text in _BENCHMARK_FILES:
        return text, data_dir() / _BENCHMARK_FILES[text]
    looks_like_path = isinstance(name_or_path, Path) or os.sep in text or text.endswith((".csv", ".gz", ".cif"))
    if not looks_like_path:
        folder = data_dir() / "structures"
        for candidate in (folder / f"{text}.csv.gz", folder / text):
            if candidate.exists():
                return text, candidate
        raise XtalsolveError(f"unknown structure set {text!r}; known: {', '.join(dataset_names())}", text)
    path = Path(text).expanduser()
    if not path.exists():
        raise XtalsolveError("no such file or folder", path)
    return _name_of(path), path


# ---------------------------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class StructureSet:
    """Parsed structures of one source, in file order (or in the order of the requested ids)."""

    name: str
    ids: tuple[str, ...]
    structures: tuple[Structure, ...]
    formulas: tuple[str, ...]
    splits: tuple[str, ...]  # upstream split per row ("" for CIF folders)

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self):
        return iter(zip(self.ids, self.structures))


def _parse_cif(text: str) -> tuple[Structure | None, str | None]:
    """(structure, None) or (None, problem); the stored cell as written (no primitive reduction)."""
    from pymatgen.core import DummySpecies
    from pymatgen.io.cif import CifParser

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pymatgen's "rounded to ideal values" etc.
            structures = CifParser.from_str(text).parse_structures(primitive=False)
    except Exception as err:  # noqa: BLE001 - pymatgen raises many types; the caller words the error
        return None, f"CIF does not parse ({type(err).__name__}: {err})"
    if not structures:
        return None, "CIF holds no structure"
    bad = {str(sp) for sp in structures[0].composition if isinstance(sp, DummySpecies) or not 1 <= sp.Z <= 118}
    if bad:
        return None, f"CIF has non-element species {', '.join(sorted(bad))}"
    return structures[0], None


def _parse_all(texts: Sequence[str], workers: int) -> list[tuple[Structure | None, str | None]]:
    if workers > 1 and len(texts) >= 2000:  # below that, start-up and pickling cost more than they save
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(_parse_cif, texts, chunksize=64))
    return [_parse_cif(t) for t in texts]


def _read_rows(path: Path, limit: int | None, ids: Sequence[str] | None) -> pd.DataFrame:
    """material_id, split, formula, cif (strings) of the selected rows of a csv(.gz) or CIF folder/file."""
    if path.is_dir() or path.name.endswith(".cif"):
        files = sorted(path.glob("*.cif")) if path.is_dir() else [path]
        if not files:
            raise XtalsolveError("folder holds no .cif files", path)
        frame = pd.DataFrame({"material_id": [_name_of(f) for f in files], "split": "", "formula": "", "file": files})
    else:
        wanted = {"material_id", "split", "formula", "cif"}
        try:
            frame = pd.read_csv(
                path,
                usecols=lambda c: c in wanted,
                keep_default_na=False,  # the formula "NaN" (sodium nitride) stays a string
                dtype=str,
                nrows=limit if ids is None else None,
            )
        except (OSError, ValueError, pd.errors.ParserError) as err:
            raise XtalsolveError(f"cannot read as csv ({err})", path) from None
        if not {"material_id", "cif"} <= set(frame.columns):
            raise XtalsolveError("needs columns material_id and cif", path)
        for column in ("split", "formula"):
            if column not in frame:
                frame[column] = ""
    if ids is not None:
        first = frame.drop_duplicates("material_id").set_index("material_id", drop=False)
        missing = [i for i in ids if i not in first.index]
        if missing:
            raise XtalsolveError(f"{len(missing)} requested ids not found, e.g. {', '.join(missing[:5])}", path)
        frame = first.loc[list(ids)].reset_index(drop=True)
    elif limit is not None:
        frame = frame.iloc[:limit]
    if "file" in frame:
        frame["cif"] = [Path(f).read_text(errors="replace") for f in frame.pop("file")]
    return frame


def load_structures(
    name_or_path: str | Path,
    limit: int | None = None,
    ids: Sequence[str] | None = None,
    workers: int = 1,
    skip_invalid: bool = False,
) -> StructureSet:
    """Parse a structure set: the first ``limit`` rows, or the rows of ``ids`` in that order.

    workers > 1 parses in a process pool (for 2,000 rows or more). A CIF that does not parse raises
    XtalsolveError naming the id, unless ``skip_invalid`` (then it is dropped and logged).
    """
    if limit is not None and limit < 0:
        raise XtalsolveError(f"limit must be >= 0, got {limit}", "limit")
    name, path = resolve_source(name_or_path)
    frame = _read_rows(path, limit, ids)
    kept = []
    for row, (structure, problem) in zip(frame.itertuples(index=False), _parse_all(list(frame["cif"]), workers)):
        if problem is not None:
            if not skip_invalid:
                raise XtalsolveError(f"{row.material_id}: {problem}", path)
            log.warning("%s: %s: %s (skipped)", path, row.material_id, problem)
            continue
        kept.append((row.material_id, structure, row.formula or structure.composition.reduced_formula, row.split))
    ids_, structures, formulas, splits = (tuple(column) for column in zip(*kept)) if kept else ((),) * 4
    return StructureSet(name, ids_, structures, formulas, splits)


# ---------------------------------------------------------------------------------------------------------------
# Ragged arrays


@dataclass(frozen=True, eq=False)
class StructureTensors:
    """n crystals as ragged arrays: entries of crystal i are rows ``offsets[i]:offsets[i+1]``.

    lattice: (n, 3, 3) cell vectors as rows, angstrom. frac: (M, 3) fractional coordinates as stored.
    numbers: (M,) atomic numbers. occupancy: (M,) site occupancies. site: (M,) site index within its crystal
    (a disordered site is one entry per species, as in CrystalBatch). ids, sources (set name), formulas, splits:
    (n,) strings. Oxidation states and site labels are not kept.
    """

    lattice: np.ndarray
    frac: np.ndarray
    numbers: np.ndarray
    occupancy: np.ndarray
    site: np.ndarray
    offsets: np.ndarray
    ids: np.ndarray
    sources: np.ndarray
    formulas: np.ndarray
    splits: np.ndarray
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_entries(self) -> np.ndarray:
        """(n,) species entries per crystal (= sites for ordered crystals)."""
        return np.diff(self.offsets)

    @property
    def n_sites(self) -> np.ndarray:
        """(n,) sites per crystal (site indices run 0..k-1 within a crystal, so the last entry holds k-1)."""
        if len(self.site) == 0:
            return np.zeros(len(self), dtype=np.int64)
        last = self.site[np.maximum(self.offsets[1:] - 1, 0)].astype(np.int64) + 1
        return np.where(self.n_entries > 0, last, 0)

    @classmethod
    def from_structures(cls, ids, structures, sources=None, formulas=None, splits=None) -> StructureTensors:
        structures = list(structures)
        n = len(structures)
        entries = [
            (site.frac_coords, species.Z, occupancy, index)
            for structure in structures
            for index, site in enumerate(structure)
            for species, occupancy in site.species.items()
        ]
        counts = [sum(len(site.species) for site in structure) for structure in structures]
        frac = np.array([e[0] for e in entries], dtype=np.float64).reshape(-1, 3)
        return cls(
            lattice=np.array([s.lattice.matrix for s in structures], dtype=np.float64).reshape(n, 3, 3),
            frac=frac,
            numbers=np.array([e[1] for e in entries], dtype=np.int16),
            occupancy=np.array([e[2] for e in entries], dtype=np.float64),
            site=np.array([e[3] for e in entries], dtype=np.int32),
            offsets=np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64),
            ids=np.array(list(ids), dtype=str).reshape(n),
            sources=np.array([""] * n if sources is None else list(sources), dtype=str).reshape(n),
            formulas=np.array(
                [s.composition.reduced_formula for s in structures] if formulas is None else list(formulas), dtype=str
            ).reshape(n),
            splits=np.array([""] * n if splits is None else list(splits), dtype=str).reshape(n),
        )

    @classmethod
    def from_set(cls, structure_set: StructureSet) -> StructureTensors:
        return cls.from_structures(
            structure_set.ids,
            structure_set.structures,
            [structure_set.name] * len(structure_set),
            structure_set.formulas,
            structure_set.splits,
        )

    def _indices(self, index) -> np.ndarray:
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        return np.arange(len(self))[index].reshape(-1)

    def batch(self, index, dtype=torch.float64, device=None) -> CrystalBatch:
        """Padded CrystalBatch of the crystals selected by an int, slice, index array or boolean mask."""
        rows = self._indices(index)
        if len(rows) == 0:
            raise XtalsolveError("empty selection", "index")
        counts = self.n_entries[rows]
        slot = np.arange(counts.max())
        real = slot[None, :] < counts[:, None]
        gather = np.where(real, self.offsets[rows][:, None] + slot[None, :], 0)
        float_kw = {"dtype": dtype, "device": device}
        return CrystalBatch(
            lattice=torch.as_tensor(self.lattice[rows], **float_kw),
            frac=torch.as_tensor(np.where(real[..., None], self.frac[gather], 0.0), **float_kw),
            numbers=torch.as_tensor(np.where(real, self.numbers[gather], 0).astype(np.int64), device=device),
            occupancy=torch.as_tensor(np.where(real, self.occupancy[gather], 0.0), **float_kw),
        )

    __getitem__ = batch

    def structure(self, i: int) -> Structure:
        """Crystal i as a pymatgen Structure (coordinates exactly as stored)."""
        from pymatgen.core import Element, Lattice, Structure

        i = int(self._indices(i)[0])
        lo, hi = self.offsets[i], self.offsets[i + 1]
        species, coords = [], []
        for s in np.unique(self.site[lo:hi]):
            rows = np.arange(lo, hi)[self.site[lo:hi] == s]
            occupancy = {Element.from_Z(int(self.numbers[r])): float(self.occupancy[r]) for r in rows}
            ordered = len(rows) == 1 and self.occupancy[rows[0]] == 1.0
            species.append(next(iter(occupancy)) if ordered else occupancy)
            coords.append(self.frac[rows[0]])
        return Structure(Lattice(self.lattice[i]), species, coords)

    def structures(self, index=slice(None)) -> list[Structure]:
        return [self.structure(i) for i in self._indices(index)]

    def subset(self, index) -> StructureTensors:
        """A new StructureTensors of the selected crystals (in the order given)."""
        rows = self._indices(index)
        counts = self.n_entries[rows]
        entry = np.concatenate([np.arange(self.offsets[r], self.offsets[r + 1]) for r in rows]) if len(rows) else []
        entry = np.asarray(entry, dtype=np.int64)
        return StructureTensors(
            lattice=self.lattice[rows],
            frac=self.frac[entry].reshape(-1, 3),
            numbers=self.numbers[entry],
            occupancy=self.occupancy[entry],
            site=self.site[entry],
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            ids=self.ids[rows],
            sources=self.sources[rows],
            formulas=self.formulas[rows],
            splits=self.splits[rows],
            meta=dict(self.meta),
        )

    @classmethod
    def concatenate(cls, parts: Sequence[StructureTensors]) -> StructureTensors:
        parts = list(parts)
        if not parts:
            raise XtalsolveError("nothing to concatenate", "parts")
        shifts = np.cumsum([0] + [p.offsets[-1] for p in parts[:-1]])
        return cls(
            lattice=np.concatenate([p.lattice for p in parts]).reshape(-1, 3, 3),
            frac=np.concatenate([p.frac for p in parts]).reshape(-1, 3),
            numbers=np.concatenate([p.numbers for p in parts]),
            occupancy=np.concatenate([p.occupancy for p in parts]),
            site=np.concatenate([p.site for p in parts]),
            offsets=np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, shifts)]).astype(np.int64),
            ids=np.concatenate([p.ids for p in parts]),
            sources=np.concatenate([p.sources for p in parts]),
            formulas=np.concatenate([p.formulas for p in parts]),
            splits=np.concatenate([p.splits for p in parts]),
        )

    _ARRAYS = ("lattice", "frac", "numbers", "occupancy", "site", "offsets", "ids", "sources", "formulas", "splits")

    def save(self, path: str | Path) -> None:
        """Write a compressed .npz atomically (readable with allow_pickle=False)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {name: getattr(self, name) for name in self._ARRAYS}
        arrays["meta"] = np.array(json.dumps(self.meta))
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
            np.savez_compressed(handle, **arrays)
        os.replace(handle.name, path)

    @classmethod
    def load(cls, path: str | Path) -> StructureTensors:
        with np.load(path, allow_pickle=False) as stored:
            return cls(**{name: stored[name] for name in cls._ARRAYS}, meta=json.loads(str(stored["meta"])))


# ---------------------------------------------------------------------------------------------------------------
# Cache


def _digest(path: Path) -> str:
    """sha256 of a file's bytes, or of the names and bytes of the CIFs in a folder."""
    digest = hashlib.sha256()
    files = sorted(path.glob("*.cif")) if path.is_dir() else [path]
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_tensors(
    name_or_path: str | Path,
    limit: int | None = None,
    ids: Sequence[str] | None = None,
    workers: int = 1,
    cache: bool = True,
    refresh: bool = False,
) -> StructureTensors:
    """``load_structures`` in ragged-array form, parsed once and cached as .npz under ``cache_dir()``.

    The cache key is the content hash of the source plus the selection (limit / ids), so editing the source
    invalidates it; older entries for the same source and selection are removed.
    """
    name, path = resolve_source(name_or_path)
    if not cache:
        return StructureTensors.from_set(load_structures(name_or_path, limit, ids, workers))
    digest = _digest(path)
    selection = "all" if ids is None and limit is None else f"n{limit}" if ids is None else "ids"
    if ids is not None:
        selection += hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]
    if selection != "all" and not refresh:
        whole = _read_cache(*_cache_file(name, path, digest, "all")[:2])
        if whole is not None:  # the whole set is cached already: select from it instead of parsing
            if ids is None:
                return whole.subset(slice(0, limit))
            position = {material_id: i for i, material_id in enumerate(whole.ids)}
            missing = [i for i in ids if i not in position]
            if missing:
                raise XtalsolveError(f"{len(missing)} requested ids not found, e.g. {', '.join(missing[:5])}", path)
            return whole.subset([position[i] for i in ids])
    file, key, prefix = _cache_file(name, path, digest, selection)
    tensors = None if refresh else _read_cache(file, key)
    if tensors is not None:
        return tensors
    tensors = StructureTensors.from_set(load_structures(name_or_path, limit, ids, workers))
    meta = {"key": key, "source": str(path), "name": name, "selection": selection, "format": CACHE_FORMAT}
    tensors = replace(tensors, meta=meta)
    try:
        tensors.save(file)
        for stale in file.parent.glob(f"{prefix}*.npz"):
            if stale != file:
                stale.unlink(missing_ok=True)
    except OSError as err:
        log.warning("could not write cache %s (%s); continuing without it", file, err)
    return tensors


def _cache_file(name: str, path: Path, digest: str, selection: str) -> tuple[Path, str, str]:
    """(cache file, key, file-name prefix shared by all versions of this source and selection)."""
    key = hashlib.sha256(f"{CACHE_FORMAT}|{digest}|{selection}".encode()).hexdigest()[:20]
    prefix = f"{name}-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}-{selection}-"
    return cache_dir() / f"{prefix}{key}.npz", key, prefix


def _read_cache(file: Path, key: str) -> StructureTensors | None:
    if not file.exists():
        return None
    try:
        tensors = StructureTensors.load(file)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        log.warning("ignoring unreadable cache file %s (%s)", file, err)
        return None
    return tensors if tensors.meta.get("key") == key else None


# ---------------------------------------------------------------------------------------------------------------
# Protocol pools (data README section 3)


@dataclass(frozen=True)
class Pool:
    """An ordered selection of (set name, material_id) keys; ``load()`` parses (cached) only what it names.

    excluded: rows removed by each rule, for reporting (e.g. {"pxrdnet_benchmark": 1130, ...}).
    """

    protocol: str
    role: str
    keys: tuple[tuple[str, str], ...]
    excluded: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def ids(self) -> list[str]:
        return [material_id for _, material_id in self.keys]

    def by_source(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for source, material_id in self.keys:
            groups.setdefault(source, []).append(material_id)
        return groups

    def head(self, n: int) -> Pool:
        return Pool(self.protocol, self.role, self.keys[:n], dict(self.excluded))

    def split(self, fraction: float, seed: int = 0) -> tuple[Pool, Pool]:
        """(rest, held-out ``fraction``) drawn with numpy's default_rng(seed); e.g. a validation split."""
        if not 0 < fraction < 1:
            raise XtalsolveError(f"fraction must be in (0, 1), got {fraction}", "fraction")
        order = np.random.default_rng(seed).permutation(len(self))
        held = set(order[: int(round(fraction * len(self)))].tolist())
        rest = tuple(k for i, k in enumerate(self.keys) if i not in held)
        out = tuple(k for i, k in enumerate(self.keys) if i in held)
        return Pool(self.protocol, self.role, rest, dict(self.excluded)), Pool(self.protocol, "val", out)

    def load(self, limit: int | None = None, workers: int = 1, cache: bool = True) -> StructureTensors:
        """The first ``limit`` (all when None) members as StructureTensors, in pool order.

        A full load caches whole source sets and selects from them; a limited load parses only those rows.
        """
        pool = self if limit is None else self.head(limit)
        if len(pool) == 0:
            raise XtalsolveError("the pool is empty", self.protocol)
        parts = []
        for source, ids in pool.by_source().items():
            if limit is None:
                tensors = load_tensors(source, workers=workers, cache=cache)
                position = {material_id: i for i, material_id in enumerate(tensors.ids)}
                parts.append(tensors.subset([position[i] for i in ids]))
            else:
                parts.append(load_tensors(source, ids=ids, workers=workers, cache=cache))
            parts[-1] = replace(parts[-1], sources=np.full(len(ids), source))  # the key's name, even for a path
        merged = StructureTensors.concatenate(parts)
        index = {key: i for i, key in enumerate(zip(merged.sources, merged.ids))}
        return merged.subset([index[key] for key in pool.keys])


def _benchmark_ids() -> list[str]:
    return (data_dir() / "benchmarks" / "pxrdnet_test_ids.txt").read_text().split()


def _duplicate_keys() -> set[tuple[str, str]]:
    frame = pd.read_csv(data_dir() / "benchmarks" / "pxrdnet_test_duplicates.csv", keep_default_na=False, dtype=str)
    return {(_name_of(Path(file)), material_id) for file, material_id in zip(frame["file"], frame["material_id"])}


def _index(name: str) -> pd.DataFrame:
    """material_id and n_atoms of a set without parsing CIFs (n_atoms parsed, via the cache, for CIF folders)."""
    _, path = resolve_source(name)
    if path.is_dir():
        tensors = load_tensors(name)
        return pd.DataFrame({"material_id": tensors.ids, "n_atoms": tensors.n_sites})
    return pd.read_csv(path, usecols=["material_id", "n_atoms"], keep_default_na=False, dtype={"material_id": str})


def _ids(name: str) -> list[str]:
    _, path = resolve_source(name)
    if path.is_dir():
        return [_name_of(p) for p in sorted(path.glob("*.cif"))]
    return list(pd.read_csv(path, usecols=["material_id"], keep_default_na=False, dtype=str)["material_id"])


def _select(protocol, role, names, forbidden_ids=(), forbidden_keys=(), max_atoms=None, labels=("", "")) -> Pool:
    forbidden_ids, forbidden_keys = set(forbidden_ids), set(forbidden_keys)
    keys, excluded = [], {labels[0]: 0, labels[1]: 0, "max_atoms": 0}
    for name in names:
        if max_atoms is None:
            rows = [(i, 0) for i in _ids(name)]
        else:
            index = _index(name)
            rows = list(zip(index["material_id"], index["n_atoms"]))
        for material_id, n_atoms in rows:
            if material_id in forbidden_ids:
                excluded[labels[0]] += 1
            elif (name, material_id) in forbidden_keys:
                excluded[labels[1]] += 1
            elif max_atoms is not None and n_atoms > max_atoms:
                excluded["max_atoms"] += 1
            else:
                keys.append((name, material_id))
    return Pool(protocol, role, tuple(keys), {k: v for k, v in excluded.items() if k and v})


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise XtalsolveError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}", "protocol")


def training_pool(
    protocol: str,
    extras: Sequence[str] = PXRDNET_EXTRAS,
    drop_duplicates: bool = True,
    max_atoms: int | None = None,
) -> Pool:
    """Structures a model may train on under a protocol (data README section 3, binding).

    "pxrdnet": mp20_train + mp20_val + mp20_test + ``extras``, minus the 1,130 PXRDnet benchmark ids (from every
    set) and, with ``drop_duplicates``, minus every (file, material_id) of benchmarks/pxrdnet_test_duplicates.csv
    (the same crystal as a benchmark entry under another id). "mp20": mp20_train only (20,483 of the 27,136
    MP-20 train ids; any id also in mp20_val / mp20_test is dropped). ``max_atoms`` drops larger cells (CIF
    folders are parsed, once, to count them).
    """
    _check_protocol(protocol)
    if protocol == "mp20":
        held_out = set(_ids("mp20_val")) | set(_ids("mp20_test"))
        return _select("mp20", "train", ["mp20_train"], held_out, max_atoms=max_atoms, labels=("in_val_or_test", ""))
    unknown = set(extras) - set(PXRDNET_EXTRAS)
    if unknown:
        raise XtalsolveError(f"not allowed as PXRDnet-protocol extras: {', '.join(sorted(unknown))}", "extras")
    return _select(
        "pxrdnet",
        "train",
        ["mp20_train", "mp20_val", "mp20_test", *extras],
        _benchmark_ids(),
        _duplicate_keys() if drop_duplicates else (),
        max_atoms,
        labels=("pxrdnet_benchmark", "duplicate_of_benchmark"),
    )


def validation_set(protocol: str) -> Pool:
    """mp20: mp20_val (early stopping / model selection only). pxrdnet has no fixed one: split the pool."""
    _check_protocol(protocol)
    if protocol == "pxrdnet":
        raise XtalsolveError("no fixed validation set; use training_pool('pxrdnet').split(0.075, seed)", "protocol")
    return _select("mp20", "val", ["mp20_val"])


def evaluation_set(protocol: str, first: int | None = None) -> Pool:
    """pxrdnet: the 1,130 benchmark ids in PXRDnet's order (``first=PXRDNET_PAPER_N`` for the paper's 200),
    structures as PXRDnet stored them. mp20: all of mp20_test."""
    _check_protocol(protocol)
    if protocol == "pxrdnet":
        keys = tuple(("pxrdnet_test", i) for i in _benchmark_ids())
        return Pool("pxrdnet", "test", keys[:first])
    return _select("mp20", "test", ["mp20_test"]).head(first)
