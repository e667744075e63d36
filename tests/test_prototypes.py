"""Candidates by element substitution into training structure types (xtalsolve.prototypes)."""

from __future__ import annotations

import gzip
import itertools
import json

import numpy as np
import pandas as pd
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition, Lattice, Structure

from xtalsolve.composition import predicted_volume
from xtalsolve.pattern import Pattern
from xtalsolve.physics.powder import Instrument, make_grid, simulate_powder
from xtalsolve.errors import XtalsolveError
from xtalsolve.prototypes import (
    check_library,
    library,
    best_decorations,
    framework_orbits,
    prototype_generator,
    prototype_structures,
    ranked_substitutions,
    redecorations,
    signature,
    structure_type,
)
from xtalsolve.solve import SolveSettings, _scored, prior_price, solve


def rock_salt(a: str, b: str, lattice: float) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(lattice), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_structure_type_anonymises_elements_and_orders_roles():
    nacl, mgo = structure_type(rock_salt("Na", "Cl", 5.64)), structure_type(rock_salt("Mg", "O", 4.21))
    assert nacl[:2] == mgo[:2] == (225, ((4, "a"), (4, "b")))  # the conventional cell: 4 + 4 atoms
    assert [el.symbol for el in nacl[2]] == ["Na", "Cl"]  # equal counts and letters: by electronegativity
    cscl = Structure(Lattice.cubic(4.12), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert structure_type(cscl)[:2] == (221, ((1, "a"), (1, "b")))
    assert signature(Composition("Ba2Ti2O6")) == (10, (2, 2, 6))


@pytest.mark.parametrize("name, n_types, n_crystals", [("mp20", 4000, 20000), ("extended", 12000, 40000)])
def test_every_library_type_is_what_its_representatives_are(name, n_types, n_crystals):
    """Rebuild representatives of a spread of types and find their type again with spglib."""
    types = [p for protos in library(name).values() for p in protos]
    assert len(types) > n_types and sum(p.count for p in types) > n_crystals
    for proto in types[:: len(types) // 40]:
        for rep in proto.representatives:
            cell = Structure(Lattice(rep["lattice"]), [rep["elements"][r] for r in rep["roles"]], rep["frac"])
            group, roles, elements = structure_type(cell)
            assert group == proto.space_group
            # Wyckoff letters, and which element sits on which, depend on the origin spglib picks for the cell
            # (Heusler 1a/1b, Cmmm a/b/c/d): atom counts, orbits and elements per role must agree
            assert sorted((n, len(w), el.symbol) for (n, w), el in zip(roles, elements)) == \
                sorted((n, len(w), el) for (n, w), el in zip(proto.roles, rep["elements"]))
            assert len(cell) == proto.n_atoms


def test_libraries_hold_no_crystal_of_the_benchmarks_they_are_used_for(shared_data):
    """The extended library (PXRDnet protocol) has no benchmark id or listed duplicate among its representative
    cells; the mp20 library (both protocols) none of mp20_val or mp20_test either."""
    benchmarks = shared_data / "benchmarks"
    pxrdnet = set((benchmarks / "pxrdnet_test_ids.txt").read_text().split())
    pxrdnet |= set(pd.read_csv(benchmarks / "pxrdnet_test_duplicates.csv", dtype=str)["material_id"])
    mp20_held_out = set()
    for name in ("mp20_val", "mp20_test"):
        mp20_held_out |= set(pd.read_csv(shared_data / "structures" / f"{name}.csv.gz", usecols=["material_id"],
                                         dtype=str)["material_id"])
    for name, forbidden in (("extended", pxrdnet), ("mp20", pxrdnet | mp20_held_out)):
        ids = [rep["id"] for protos in library(name).values() for p in protos for rep in p.representatives]
        assert len(ids) > 5000 and not set(ids) & forbidden, name


def test_the_extended_library_knows_types_the_mp20_one_lacks():
    """More training crystals, more types: AsPd5 (PXRDnet benchmark material 12, C2/m, 12 atoms in its cell)
    has no crystal of its type in mp20_train, but has in the PXRDnet protocol's pool."""
    assert len([p for ps in library("extended").values() for p in ps]) > \
        1.5 * len([p for ps in library("mp20").values() for p in ps])
    as_pd5 = (12, ((2, "i"), (10, "hiij")))
    types = {name: {(p.space_group, p.roles) for p in library(name)[signature(Composition("As2Pd10"))]}
             for name in ("mp20", "extended")}
    assert as_pd5 in types["extended"] and as_pd5 not in types["mp20"]
    assert any((s.prototype.space_group, s.prototype.roles) == as_pd5
               for s in ranked_substitutions(Composition("As2Pd10"), library_name="extended"))
    # tiers: the extended library lists the mp20 library's candidates first, in the same order, then its own
    for formula in ("As2Pd10", "Li2V2F12", "NaCl"):
        core = ranked_substitutions(Composition(formula), library_name="mp20")
        both = ranked_substitutions(Composition(formula), library_name="extended")
        assert both[: len(core)] == core and len(both) > len(core)
        assert all(s.prototype.tier == 1 for s in both[len(core):])


def test_unknown_or_broken_library_is_refused_in_one_line(tmp_path):
    with pytest.raises(XtalsolveError, match="unknown prototype library 'nope'"):
        check_library("nope")
    broken = tmp_path / "broken.json.gz"
    broken.write_bytes(b"not gzip")
    with pytest.raises(XtalsolveError, match="not a prototype library"):
        library(str(broken))


def cscl_library(folder) -> str:
    """A library written as tools/build_prototype_library.py writes it: one CsCl type from one crystal."""
    own = folder / "own.json.gz"
    entry = {"space_group": 221, "roles": [[1, "a"], [1, "b"]], "n_atoms": 2, "count": 1, "members": [["Cs", "Cl"]],
             "representatives": [{"lattice": np.diag([4.12] * 3).tolist(), "frac": [[0, 0, 0], [0.5, 0.5, 0.5]],
                                  "roles": [0, 1], "elements": ["Cs", "Cl"], "id": "my-1"}]}
    with gzip.open(own, "wt") as handle:
        json.dump({"source": "test", "n_structures": 1, "types": [entry]}, handle)
    return str(own)


def test_a_library_file_of_ones_own_is_used(tmp_path):
    """A library of one's own (one CsCl type) is read and substituted."""
    own = cscl_library(tmp_path)
    drawn = prototype_generator(library_name=own)(Composition("TlBr"), 1, seed=0)
    assert StructureMatcher().fit(drawn[0], Structure(Lattice.cubic(4.0), ["Tl", "Br"], [[0, 0, 0], [0.5] * 3]))
    assert "221" in drawn[0].properties["origin"] and "CsCl my-1" in drawn[0].properties["origin"]


def test_the_prototype_generator_fills_with_the_guided_model_once_its_library_runs_out(tmp_path):
    """make_generator("prototype", fill=...): the library's one CsCl type first, then candidates of the fill kind
    (the shipped diffusion model, guided by the pattern), each with its origin; an unknown fill is refused."""
    from xtalsolve.solve import make_generator, shipped_checkpoint

    own = cscl_library(tmp_path)
    truth = Structure(Lattice.cubic(4.0), ["Tl", "Br"], [[0, 0, 0], [0.5] * 3])
    grid, unit = make_grid((20.0, 80.0, 0.05))
    y = simulate_powder([truth], instrument=Instrument(wavelength=1.5406, w=0.003), two_theta=(20, 80, 0.05),
                        size=200.0)[0]
    pattern = Pattern(grid, y, np.sqrt(np.maximum(y, 1.0)), unit, 1.5406, "tlbr-simulated")
    for fill, origin in (("diffusion", "diffusion model with data guidance"), ("symmetric", None)):
        generate = make_generator("prototype", shipped_checkpoint(), pattern, n_steps=4, library=own, fill=fill)
        drawn = generate(Composition("TlBr"), 3, seed=0)
        assert len(drawn) == 3 and all(s.composition == Composition("TlBr") for s in drawn)
        assert "CsCl my-1" in drawn[0].properties["origin"]
        fills = [s.properties.get("origin", "") for s in drawn[1:]]
        assert all(o == origin for o in fills) if origin else not any("diffusion" in o for o in fills)
    with pytest.raises(XtalsolveError, match="unknown fill"):
        make_generator("prototype", shipped_checkpoint(), pattern, fill="random")
    # prototype+diffusion: half the draws from the library (its CsCl type, then its fill), half from the model
    generate = make_generator("prototype+diffusion", shipped_checkpoint(), pattern, n_steps=4, library=own)
    origins = [s.properties.get("origin", "") for s in generate(Composition("TlBr"), 4, seed=0)]
    assert len(origins) == 4 and "CsCl my-1" in origins[0] and "diffusion" not in origins[1]
    assert origins[2:] == ["diffusion model with data guidance"] * 2


def test_ranked_substitutions_hold_the_composition_and_skip_equivalent_assignments():
    cell = Composition("NaCl")
    ranked = ranked_substitutions(cell)
    assert ranked[0].prototype.space_group == 225 and ranked[0].elements == ("Na", "Cl")
    assert all((a.prototype.tier, -a.log_prior) <= (b.prototype.tier, -b.log_prior) for a, b in zip(ranked, ranked[1:]))
    structures = prototype_structures(cell, 12)
    assert all(s.composition == cell for s in structures)
    assert all(abs(s.volume - predicted_volume(cell)) < 1e-6 for s in structures)
    # rock salt with Na and Cl swapped is the same crystal: drawn once
    assert sum(StructureMatcher().fit(s, rock_salt("Na", "Cl", 5.64)) for s in structures) == 1
    # skip goes on down the same list
    later = prototype_structures(cell, 4, skip=8)
    assert all(np.allclose(a.lattice.matrix, b.lattice.matrix) for a, b in zip(later, structures[8:]))


def test_leave_out_compound_drops_the_compound_itself():
    proto = library()[(2, (1, 1))][0]  # the commonest two-atom type (rock salt)
    compound = proto.representatives[0]["elements"]
    cell = Composition(dict.fromkeys(compound, 1))
    own = lambda s: s.prototype.representatives[s.representative]["elements"] == compound  # noqa: E731
    assert any(own(s) for s in ranked_substitutions(cell))
    kept = ranked_substitutions(cell, leave_out_compound=True)
    assert kept and not any(own(s) for s in kept)
    assert any(s.prototype is proto for s in kept)  # the type stays, known from its other members


def test_generator_fills_from_the_fallback_once_the_library_runs_out():
    cell = Composition("K3GdF6")
    available = len(prototype_structures(cell, 1000, library_name="mp20", redecorate=False))
    assert 0 < available < 100
    fill = lambda c, n, seed, skip=0: [Structure(Lattice.cubic(9.0), ["K"], [[0, 0, 0]])  # noqa: E731
                                       for _ in range(n)]
    drawn = prototype_generator(fill=fill, library_name="mp20", redecorate=False)(cell, 5, 0, skip=available - 2)
    assert [s.composition == cell for s in drawn] == [True, True, False, False, False]
    # the fill is told how many of its own were drawn before (a second round of Z trials goes on down its list)
    skips = []
    prototype_generator(fill=lambda c, n, seed, skip=0: skips.append(skip) or fill(c, n, seed),
                        library_name="mp20", redecorate=False)(cell, 4, 0, skip=available + 3)
    assert skips == [3]
    # the prior's order goes on through the fill: the solver prices it
    assert [s.properties["prior_rank"] for s in drawn] == list(range(available - 2, available + 3))


def test_prior_rank_raises_the_screen_score():
    settings = SolveSettings(parameter_price=0.01, prior_price=0.01)
    cif = Structure(Lattice.cubic(4.0), ["Po"], [[0, 0, 0]]).to(fmt="cif")  # one free parameter: a
    ranked = _scored({"screen_residual": 0.1, "screen_cif": cif, "prior_rank": 10}, settings, settings.prior_price)
    unranked = _scored({"screen_residual": 0.1, "screen_cif": cif, "prior_rank": None}, settings, settings.prior_price)
    assert ranked["screen_free_parameters"] == 1
    assert np.isclose(unranked["screen_score"], 0.1 * 1.01)
    assert np.isclose(ranked["screen_score"], 0.1 * 1.01 * 1.10)


def test_broad_patterns_price_the_prior_more_and_stored_scores_are_recomputed():
    settings = SolveSettings(parameter_price=0.01, prior_price=0.01, broad_prior_price=0.15)
    assert prior_price(settings, "volume") == 0.15 and prior_price(settings, "full") == 0.01
    cif = Structure(Lattice.cubic(4.0), ["Po"], [[0, 0, 0]]).to(fmt="cif")
    record = _scored({"screen_residual": 0.1, "screen_cif": cif, "prior_rank": 10}, settings, settings.prior_price)
    assert np.isclose(record["screen_score"], 0.1 * 1.01 * 1.10)
    # a record read back from a run with another price is ranked by the present one
    _scored(record, settings, prior_price(settings, "volume"))
    assert np.isclose(record["screen_score"], 0.1 * 1.01 * 2.5)


def test_solve_finds_rutile_by_substitution(tmp_path):
    """Rutile SnO2 from a simulated pattern, its own compound left out of the library."""
    truth = Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.737, 3.186), ["Sn", "O"],
                                      [[0, 0, 0], [0.3056, 0.3056, 0]])
    grid, unit = make_grid((20.0, 80.0, 0.03))
    y = simulate_powder([truth], instrument=Instrument(wavelength=1.5406, w=0.003), two_theta=(20, 80, 0.03),
                        size=150.0, biso=0.5)[0]
    y = np.random.default_rng(0).poisson(1e4 * y / y.max() + 50.0).astype(float)
    pattern = Pattern(grid, y, np.sqrt(np.maximum(y, 1.0)), unit, 1.5406, "sno2-simulated")
    settings = SolveSettings(samples=8, natoms=6, refine_max_nfev=8, refine_top=2)
    summary = solve(pattern, "SnO2", prototype_generator(leave_out_compound=True), tmp_path, settings)
    best = summary["candidates"][0]
    assert best["rwp"] < 0.15
    assert best["origin"].startswith("prototype: space group 136 type of ")  # rutile, from another compound
    assert "SnO2" not in best["origin"]
    assert StructureMatcher().fit(Structure.from_file(tmp_path / best["cif"]), truth)


def test_best_decorations_are_the_cheapest_exact_sharings():
    """Against brute force over every element per orbit: same k best, same costs, counts held exactly."""
    rng = np.random.default_rng(3)
    sizes, counts = [2, 1, 1, 3, 1, 2], [4, 3, 3]
    cost = rng.uniform(0, 1, (len(sizes), len(counts)))
    brute = sorted((sum(cost[o, e] for o, e in enumerate(a)), a)
                   for a in itertools.product(range(3), repeat=len(sizes))
                   if all(sum(s for s, e in zip(sizes, a) if e == k) == counts[k] for k in range(3)))
    found = best_decorations(sizes, cost, counts, k=4)
    assert [a for a, _ in found] == [a for _, a in brute[:4]]
    assert np.allclose([c for _, c in found], [c for c, _ in brute[:4]])
    assert best_decorations([2, 2], np.zeros((2, 2)), [1, 3], k=3) == []  # no sharing holds the counts


def _perovskite_library(path):
    """A library file with one type: cubic perovskite SrTiO3 (Sr 1a, Ti 1b, O 3c)."""
    entry = {"space_group": 221, "roles": [[1, "a"], [1, "b"], [3, "c"]], "n_atoms": 5, "count": 1,
             "members": [["Sr", "Ti", "O"]],
             "representatives": [{"lattice": np.diag([3.905] * 3).tolist(),
                                  "frac": [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
                                  "roles": [0, 1, 2, 2, 2], "elements": ["Sr", "Ti", "O"], "id": "my-2"}]}
    with gzip.open(path, "wt") as handle:
        json.dump({"source": "test", "n_structures": 1, "types": [entry]}, handle)
    return str(path)


def test_redecoration_reaches_a_type_the_library_lacks(tmp_path):
    """A2X3 has no type in a perovskite-only library, but the perovskite framework holds it with A on both
    cation orbits (1a + 1b) and X on 3c; the framework's own sharing (ABX3) is a substitution, not offered
    again; the generator draws the re-decoration before its random fill."""
    own = _perovskite_library(tmp_path / "own.json.gz")
    orbits, letters = framework_orbits(library(own)[(5, (1, 1, 3))][0])
    assert sorted(zip(letters, map(len, orbits))) == [("a", 1), ("b", 1), ("c", 3)]
    cell = Composition("Nb2O3")
    assert ranked_substitutions(cell, library_name=own) == ()
    decorations = redecorations(cell, library_name=own)
    assert len(decorations) == 1
    expected = Structure(Lattice.cubic(4.0), ["Nb", "Nb", "O", "O", "O"],
                         [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    assert StructureMatcher().fit(decorations[0].structure(64.0), expected)
    assert redecorations(Composition("BaZrO3"), library_name=own) == ()
    fill = lambda c, n, seed, skip=0: [Structure(Lattice.cubic(9.0), ["K"], [[0, 0, 0]])  # noqa: E731
                                       for _ in range(n)]
    drawn = prototype_generator(fill=fill, library_name=own)(cell, 3, seed=0)
    assert drawn[0].composition == cell and drawn[1].composition != cell
    assert drawn[0].properties["origin"].startswith("re-decorated framework: space group 221 type of SrTiO3 my-2")
    assert [s.properties["prior_rank"] for s in drawn] == [0, 1, 2]
    assert prototype_generator(fill=fill, library_name=own, redecorate=False)(cell, 1, seed=0)[0].composition != cell


def test_redecoration_finds_a_benchmark_crystal_of_no_library_type(shared_data):
    """BaPb2C2(O3F)2 (PXRDnet benchmark material 26, R-3m) has no type in the extended library, and no type
    of its atom counts at all; its structure is the best re-decoration of a library framework."""
    from xtalsolve.data import evaluation_set

    tensors = evaluation_set("pxrdnet", first=27).load()
    truth = tensors.structure(26)
    assert truth.composition.reduced_formula == "BaPb2C2(O3F)2"
    assert ranked_substitutions(truth.composition) == ()
    best = redecorations(truth.composition)[0].structure(truth.volume)
    assert StructureMatcher(ltol=0.3, stol=0.5, angle_tol=10).fit(best, truth)
