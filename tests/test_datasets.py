"""Structure-set loading, the cached ragged form, and the binding training rules (data README section 3).

Rule tests read id columns only; CIFs are parsed for small selections.
"""

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure

import xtalsolve
from xtalsolve.crystal import CrystalBatch
from xtalsolve.data import (
    PXRDNET_EXTRAS,
    Pool,
    StructureTensors,
    data_dir,
    evaluation_set,
    load_structures,
    load_tensors,
    training_pool,
    validation_set,
)
from xtalsolve.data import structures as module
from xtalsolve.errors import XtalsolveError
from xtalsolve.metrics import match


def _shared():
    try:
        return data_dir()
    except XtalsolveError:
        return None


DATA = _shared()
needs_data = pytest.mark.skipif(DATA is None, reason="shared data folder not available")


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XTALSOLVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "structures"


def ids_of(name):
    path = DATA / "structures" / f"{name}.csv.gz"
    return list(pd.read_csv(path, usecols=["material_id"], keep_default_na=False)["material_id"])


# ---- locating the data ------------------------------------------------------------------------------------


def test_data_dir_from_env_and_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XTALSOLVE_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.setenv("XTALSOLVE_DATA", str(tmp_path / "absent"))
    with pytest.raises(XtalsolveError) as err:
        data_dir()
    assert err.value.source == "XTALSOLVE_DATA" and "absent" in err.value.problem


def test_data_dir_found_next_to_the_repo(monkeypatch):
    repo = next(p for p in Path(xtalsolve.__file__).resolve().parents if (p / "pyproject.toml").is_file())
    if not (repo.parent / "shared" / "data").is_dir():
        pytest.skip("no shared data folder next to this checkout")
    monkeypatch.delenv("XTALSOLVE_DATA", raising=False)
    found = data_dir()
    assert (found / "benchmarks" / "pxrdnet_test_ids.txt").is_file()
    assert found.resolve() == (repo.parent / "shared" / "data").resolve()


def test_data_dir_found_from_cwd(tmp_path, monkeypatch):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "pyproject.toml").write_text("")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    monkeypatch.delenv("XTALSOLVE_DATA", raising=False)
    monkeypatch.chdir(tmp_path / "repo")
    monkeypatch.setattr(module, "__file__", str(tmp_path / "site-packages" / "xtalsolve" / "data" / "structures.py"))
    assert data_dir() == (tmp_path / "shared" / "data").resolve()


# ---- parsing ----------------------------------------------------------------------------------------------


@needs_data
def test_load_structures_limit_ids_and_na_formula():
    frame = pd.read_csv(DATA / "structures" / "mp20_val.csv.gz", nrows=20, keep_default_na=False)
    loaded = load_structures("mp20_val", limit=20)
    assert list(loaded.ids) == list(frame["material_id"]) and set(loaded.splits) == {"val"}
    assert [len(s) for s in loaded.structures] == list(frame["n_atoms"])
    assert [s.composition.reduced_formula for s in loaded.structures] == list(loaded.formulas)
    wanted = list(frame["material_id"][[7, 2, 11]])
    assert list(load_structures("mp20_val", ids=wanted).ids) == wanted
    with pytest.raises(XtalsolveError, match="not found"):
        load_structures("mp20_val", ids=["mp-does-not-exist"])
    # keep_default_na=False: sodium nitride's formula "NaN" is a formula, not a missing value
    nan = load_structures("aflow", ids=["aflow-46989"])
    assert nan.formulas == ("NaN",) and nan.structures[0].composition.reduced_formula == "NaN"


@needs_data
def test_cif_folders_and_bad_names():
    zeolites = load_structures("zeolites_iza", limit=3)
    assert zeolites.ids == ("ABW", "ACO", "AEI")
    for structure in zeolites.structures:
        composition = structure.composition
        assert set(map(str, composition)) == {"Si", "O"} and composition["O"] == 2 * composition["Si"]
    assert len(load_structures("mof_coremof2019_subset200", limit=1)) == 1
    with pytest.raises(XtalsolveError, match="unknown structure set"):
        load_structures("mp21_train")
    with pytest.raises(XtalsolveError, match="no such file"):
        load_structures("/nonexistent/set.csv.gz")


def test_bad_cif_is_an_error_naming_the_row(tmp_path):
    path = tmp_path / "bad.csv"
    pd.DataFrame({"material_id": ["x-1"], "cif": ["data_x\n_cell_length_a 3\n"]}).to_csv(path, index=False)
    with pytest.raises(XtalsolveError, match="x-1") as err:
        load_structures(path)
    assert err.value.source == str(path)
    assert len(load_structures(path, skip_invalid=True)) == 0


# ---- ragged tensors and the cache -------------------------------------------------------------------------


@needs_data
def test_tensor_round_trip_and_batches(tmp_cache):
    originals = load_structures("mp20_val", limit=50)
    tensors = load_tensors("mp20_val", limit=50)
    assert len(tensors) == 50 and list(tensors.ids) == list(originals.ids)
    assert set(tensors.sources) == {"mp20_val"}
    assert np.array_equal(tensors.n_sites, [len(s) for s in originals.structures])
    matcher = StructureMatcher()
    for i, original in enumerate(originals.structures):
        rebuilt = tensors.structure(i)
        assert np.allclose(rebuilt.lattice.matrix, original.lattice.matrix, atol=1e-8, rtol=0)
        assert np.allclose(rebuilt.frac_coords, original.frac_coords, atol=1e-8, rtol=0)
        assert rebuilt.species == original.species
        assert matcher.fit(rebuilt, original)
    index = np.array([4, 0, 17])
    batch, reference = tensors[index], CrystalBatch.from_structures([originals.structures[i] for i in index])
    for name in ("lattice", "frac", "numbers", "occupancy"):
        assert torch.equal(getattr(batch, name), getattr(reference, name))
    assert len(tensors[3]) == 1 and len(tensors[torch.tensor([1, 2])]) == 2
    assert tensors[np.arange(50) < 5].frac.dtype == torch.float64
    assert tensors.batch(slice(0, 4), dtype=torch.float32).lattice.dtype == torch.float32
    assert len(list(tmp_cache.glob("mp20_val-*.npz"))) == 1


@needs_data
def test_cache_is_used_and_whole_set_serves_selections(tmp_path, monkeypatch):
    rows = pd.read_csv(DATA / "structures" / "perov5_val.csv.gz", nrows=12, keep_default_na=False)
    source = tmp_path / "perov.csv.gz"
    rows.to_csv(source, index=False, compression="gzip")
    first = load_tensors(source, limit=10)

    def no_parsing(*args, **kwargs):
        raise AssertionError("parsed although cached")

    with monkeypatch.context() as patch:
        patch.setattr(module, "_parse_all", no_parsing)
        again = load_tensors(source, limit=10)
        assert np.array_equal(again.frac, first.frac) and list(again.ids) == list(first.ids)
    # Once the whole set is cached, an id selection is cut from it without parsing.
    whole = load_tensors(source)
    monkeypatch.setattr(module, "_parse_all", no_parsing)
    picked = load_tensors(source, ids=[whole.ids[9], whole.ids[3]])
    assert list(picked.ids) == [whole.ids[9], whole.ids[3]]
    assert picked.structure(0) == first.structure(9) and picked.structure(1) == first.structure(3)
    assert list(load_tensors(source, limit=2).ids) == list(rows.material_id[:2])


@needs_data
def test_cache_invalidated_when_the_source_changes(tmp_path, tmp_cache):
    rows = pd.read_csv(DATA / "structures" / "carbon24_val.csv.gz", nrows=6, keep_default_na=False)
    source = tmp_path / "mine.csv.gz"
    rows.iloc[:3].to_csv(source, index=False, compression="gzip")
    assert list(load_tensors(source).ids) == list(rows["material_id"][:3])
    with gzip.open(source, "wt") as handle:  # same name, new content
        rows.iloc[3:].to_csv(handle, index=False)
    assert list(load_tensors(source).ids) == list(rows["material_id"][3:])
    assert len(list(tmp_cache.glob("mine-*-all-*.npz"))) == 1  # the stale entry is gone


def test_disordered_sites_and_npz_round_trip(tmp_path):
    disordered = Structure(
        Lattice.cubic(3.6), [{"Fe": 0.5, "Co": 0.5}, "Ni"], [[0, 0, 0], [0.5, 0.5, 1.25]]
    )  # coordinate outside [0, 1) is kept as stored
    ordered = Structure(Lattice.hexagonal(2.5, 6.7), ["C", "C"], [[0, 0, 0.25], [1 / 3, 2 / 3, 0.25]])
    tensors = StructureTensors.from_structures(["a", "b"], [disordered, ordered])
    assert list(tensors.n_entries) == [3, 2] and list(tensors.n_sites) == [2, 2]
    tensors.save(tmp_path / "t.npz")
    back = StructureTensors.load(tmp_path / "t.npz")
    assert back.structure(0) == disordered and back.structure(1) == ordered
    assert np.allclose(back.structure(0).frac_coords[1], [0.5, 0.5, 1.25])
    batch = back[[0, 1]]
    assert batch.occupancy[0].tolist() == [0.5, 0.5, 1.0] and batch.numbers[1].tolist() == [6, 6, 0]
    both = StructureTensors.concatenate([back, back.subset([1])])
    assert list(both.ids) == ["a", "b", "b"] and both.structure(2) == ordered


# ---- the binding training rules -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pxrdnet_pool():
    return training_pool("pxrdnet")


@needs_data
def test_pxrdnet_pool_excludes_benchmark_and_duplicates(pxrdnet_pool):
    benchmark = set((DATA / "benchmarks" / "pxrdnet_test_ids.txt").read_text().split())
    duplicates = pd.read_csv(DATA / "benchmarks" / "pxrdnet_test_duplicates.csv", keep_default_na=False)
    duplicate_keys = {
        (Path(f).name.removesuffix(".csv.gz"), i) for f, i in zip(duplicates.file, duplicates.material_id)
    }
    keys = set(pxrdnet_pool.keys)
    assert len(benchmark) == 1130 and len(duplicate_keys) == len(duplicates)
    assert not benchmark & set(pxrdnet_pool.ids)
    assert not duplicate_keys & keys
    assert pxrdnet_pool.excluded == {"pxrdnet_benchmark": 1130, "duplicate_of_benchmark": len(duplicates)}
    sources = pxrdnet_pool.by_source()
    assert set(sources) == {"mp20_train", "mp20_val", "mp20_test", *PXRDNET_EXTRAS}
    # everything else of mp20_test is allowed
    expected_test = [i for i in ids_of("mp20_test") if i not in benchmark and ("mp20_test", i) not in duplicate_keys]
    assert sources["mp20_test"] == expected_test and len(expected_test) == 9046 - 1130 - 9
    assert len(keys) == len(pxrdnet_pool)  # no (source, id) twice
    with_duplicates = training_pool("pxrdnet", drop_duplicates=False)
    assert duplicate_keys <= set(with_duplicates.keys)
    with pytest.raises(XtalsolveError, match="not allowed"):
        training_pool("pxrdnet", extras=("mp20_test",))


@needs_data
def test_mp20_protocol_keeps_val_and_test_out_of_training():
    train, val, test = training_pool("mp20"), validation_set("mp20"), evaluation_set("mp20")
    assert set(train.by_source()) == {"mp20_train"} and len(train) == 20483
    assert not set(train.ids) & (set(val.ids) | set(test.ids))
    assert (len(val), len(test)) == (9047, 9046) and not set(val.ids) & set(test.ids)
    with pytest.raises(XtalsolveError, match="split"):
        validation_set("pxrdnet")
    with pytest.raises(XtalsolveError, match="unknown protocol"):
        training_pool("mp-20")


@needs_data
def test_max_atoms_filter_agrees_with_the_csv_column():
    pool = training_pool("pxrdnet", extras=("mpts52_extra",), max_atoms=20)
    frame = pd.read_csv(DATA / "structures" / "mpts52_extra.csv.gz", usecols=["material_id", "n_atoms"])
    small = set(frame.material_id[frame.n_atoms <= 20])
    assert set(pool.by_source()["mpts52_extra"]) == small and pool.excluded["max_atoms"] == len(frame) - len(small)


@needs_data
def test_evaluation_set_order_and_structures(pxrdnet_pool):
    listed = (DATA / "benchmarks" / "pxrdnet_test_ids.txt").read_text().split()
    full, paper = evaluation_set("pxrdnet"), evaluation_set("pxrdnet", first=200)
    assert full.ids == listed and paper.ids == listed[:200]
    stored = pd.read_csv(DATA / "benchmarks" / "pxrdnet_test_structures.csv.gz", usecols=["material_id"])
    assert list(stored.material_id) == listed
    # PXRDnet's own CIFs and the MP-20 cache copies are the same crystals (some in another cell).
    theirs = paper.load(limit=4)
    ours = load_tensors("mp20_test", ids=list(theirs.ids))
    for i in range(4):
        assert match(theirs.structure(i), ours.structure(i), "strict").matched


@needs_data
def test_pool_load_keeps_order_across_sources_and_split_is_disjoint(pxrdnet_pool, tmp_path):
    val_id, aflow_id = ids_of("mp20_val")[5], ids_of("aflow")[2]
    pool = Pool("pxrdnet", "train", (("mp20_val", val_id), ("aflow", aflow_id), ("mp20_val", ids_of("mp20_val")[0])))
    loaded = pool.load(limit=3)
    assert list(zip(loaded.sources, loaded.ids)) == list(pool.keys)
    assert loaded.structure(1) == load_structures("aflow", ids=[aflow_id]).structures[0]
    # A full load caches whole sources and selects from them; sources may also be paths.
    carbon, perov = tmp_path / "carbon.csv.gz", tmp_path / "perov.csv"
    pd.read_csv(DATA / "structures" / "carbon24_test.csv.gz", nrows=5).to_csv(carbon, index=False)
    pd.read_csv(DATA / "structures" / "perov5_test.csv.gz", nrows=3).to_csv(perov, index=False)
    c, p = ids_of("carbon24_test")[:5], ids_of("perov5_test")[:3]
    pool = Pool("pxrdnet", "train", ((str(carbon), c[4]), (str(perov), p[2]), (str(carbon), c[1])))
    loaded = pool.load()
    assert list(zip(loaded.sources, loaded.ids)) == list(pool.keys)
    assert loaded.structure(2) == load_structures(carbon, ids=[c[1]]).structures[0]
    rest, held = pxrdnet_pool.split(0.075, seed=0)
    assert len(held) == round(0.075 * len(pxrdnet_pool)) and not set(rest.keys) & set(held.keys)
    assert set(rest.keys) | set(held.keys) == set(pxrdnet_pool.keys)
    assert held.keys == pxrdnet_pool.split(0.075, seed=0)[1].keys != pxrdnet_pool.split(0.075, seed=1)[1].keys
