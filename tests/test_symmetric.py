"""Symmetric candidates (xtalsolve.symmetric), the symmetry-keeping batched fit (xtalsolve.polish) and the
parameter-priced ranking and generator mixing of the solver (xtalsolve.solve)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pymatgen.core import Composition, Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from xtalsolve.composition import predicted_volume
from xtalsolve.crystal.batch import CrystalBatch
from xtalsolve.errors import XtalsolveError
from xtalsolve.polish import PolishSettings, SymmetryProjectors, _symmetric, free_parameters, polish, polish_batch
from xtalsolve.solve import mixed_generator, parsimonious, pattern_loss, refinement_choice
from xtalsolve.symmetric import centring, random_symmetric_structures, space_group_weights

from prototypes import lab_pattern


def rutile() -> Structure:
    return Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.594, 2.959), ["Ti", "O"],
                                     [[0, 0, 0], [0.3048, 0.3048, 0]])


def group_number(structure: Structure, symprec: float = 1e-3) -> int:
    return SpacegroupAnalyzer(structure, symprec=symprec).get_space_group_number()


def test_space_group_prior_follows_the_training_crystals_and_the_composition():
    weights = space_group_weights(Composition("NaCl"))
    assert math.isclose(sum(weights.values()), 1.0)
    assert weights[225] > 0.1  # rock salt is among the commonest two-atom crystals of MP-20
    assert weights[225] > 10 * weights.get(1, 0.0)
    # one atom in the primitive cell: only groups with a one-fold primitive position, i.e. never 221's
    # P-centred two-atom sites for a one-atom cell; every returned group must hold the composition
    one = space_group_weights(Composition("Ti"))
    assert {225, 229} <= set(one) and all(centring(g) in (1, 2, 3, 4) for g in one)
    assert centring(225) == 4 and centring(229) == 2 and centring(166) == 3 and centring(136) == 1


def test_random_symmetric_structures_hold_the_cell_and_are_seeded():
    cell = Composition("Ti2O4")
    first = random_symmetric_structures(cell, 6, seed=3)
    np.random.seed(99)  # the global numpy state must not matter
    again = random_symmetric_structures(cell, 6, seed=3)
    other = random_symmetric_structures(cell, 6, seed=4)
    volume = predicted_volume(cell)
    for s, t in zip(first, again):
        assert s.composition == cell and len(s) == 6
        assert np.allclose(s.lattice.matrix, t.lattice.matrix) and np.allclose(s.frac_coords, t.frac_coords)
        assert abs(math.log(s.volume / volume)) < 5 * 0.12  # the volume prior, log-normal spread 0.12
        assert group_number(s) > 1  # symmetric, not P1
    assert not all(np.allclose(s.lattice.matrix, t.lattice.matrix) for s, t in zip(first, other))
    # draws cover distinct groups before repeating one
    groups = [group_number(s, 0.01) for s in random_symmetric_structures(Composition("NaCl"), 8, seed=0)]
    assert len(set(groups)) >= 5
    only = random_symmetric_structures(Composition("NaCl"), 3, seed=1, space_groups=[225])
    assert [group_number(s) for s in only] == [225, 225, 225]
    with pytest.raises(XtalsolveError, match="could not place"):
        random_symmetric_structures(Composition("Na5Cl"), 1, seed=0, space_groups=[225], max_attempts=3)


def test_symmetry_projectors_keep_the_space_group_and_count_free_parameters():
    truth = rutile()
    assert free_parameters(truth) == 3  # a, c and the oxygen x
    p1 = Structure(truth.lattice, truth.species, truth.frac_coords + 0.01 * np.arange(18).reshape(6, 3) / 18)
    assert group_number(p1) == 1 and free_parameters(p1) == 6 + 3 * 6
    projectors = SymmetryProjectors.of([truth], len(truth))
    rng = np.random.default_rng(0)
    shift = (projectors.shift[0].numpy() @ rng.normal(size=18) * 0.02).reshape(6, 3)
    strain = projectors.strain[0].numpy() @ rng.normal(size=6) * 0.03
    lattice = truth.lattice.matrix @ (np.eye(3) + _symmetric(torch.tensor(strain)).numpy())
    moved = Structure(lattice, truth.species, truth.frac_coords + shift)
    assert group_number(moved, 1e-5) == 136
    assert abs(moved.lattice.a - truth.lattice.a) > 1e-3 and np.abs(shift).max() > 1e-3  # it did move
    # projectors are idempotent: applying twice changes nothing
    for p in (projectors.strain[0], projectors.shift[0]):
        assert torch.allclose(p @ p, p, atol=1e-12)


def test_polish_keeps_a_symmetric_candidate_in_its_group_and_finds_the_cell():
    truth = rutile()
    pattern = lab_pattern(truth, (15.0, 80.0, 0.03), 100.0, "rutile-simulated")
    start = Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.70, 2.90), ["Ti", "O"],
                                      [[0, 0, 0], [0.29, 0.29, 0]])
    loss = pattern_loss(pattern, 100.0)
    fitted, residuals = polish([start], loss, PolishSettings(steps=120))
    assert group_number(fitted[0], 1e-4) == 136
    assert abs(fitted[0].lattice.a - 4.594) < 0.01 and abs(fitted[0].lattice.c - 2.959) < 0.01
    # without the projectors the same fit leaves the group (P1 freedom)
    batch = CrystalBatch.from_structures([start], dtype=torch.float64)
    free, _ = polish_batch(batch, loss, PolishSettings(steps=120))
    assert group_number(free.to_structures()[0], 1e-4) != 136


def _labelled(label: str, seed: int, a: float = 4.0) -> Structure:
    structure = Structure(Lattice.cubic(a), ["Na"], [[0, 0, 0]])
    structure.properties.update(label=label, seed=seed)
    return structure


def test_mixed_generator_splits_draws_by_share_and_parsimony_prices_parameters():
    def constant(label):
        return lambda cell, n, seed, skip=0: [_labelled(label, seed) for _ in range(n)]

    mixed = mixed_generator([(constant("a"), 0.5), (constant("b"), 0.5)])
    drawn = [d.properties for d in mixed(Composition("NaCl"), 5, 10)]
    assert [d["label"] for d in drawn] == ["a", "a", "a", "b", "b"]
    assert [d["part"] for d in drawn] == [0, 0, 0, 1, 1]  # each draw marked with its generator
    assert {d["seed"] for d in drawn if d["label"] == "a"} != {d["seed"] for d in drawn if d["label"] == "b"}
    labels = [d.properties["label"] for d in mixed_generator([(constant("a"), 1), (constant("b"), 3)])(None, 4, 0)]
    assert labels == ["a", "b", "b", "b"]
    with pytest.raises(XtalsolveError):
        mixed_generator([(constant("a"), 0.0)])
    # bcc Ti found as an 8-atom C2/m cell fits a little better but pays for its 16 parameters
    assert parsimonious(0.0722, 1, 0.01) < parsimonious(0.0690, 16, 0.01)
    assert parsimonious(0.05, 0, 0.01) == 0.05


def test_each_part_of_a_mixed_generator_has_its_best_candidate_refined():
    """refinement_choice: the n best distinct screened candidates, plus the best distinct one of every generator
    part that has none among them (a part's crystal already chosen from another part counts as represented)."""
    elements = {4.0: "Na", 4.5: "K", 5.0: "Rb", 5.5: "Cs", 6.0: "Ba"}  # one crystal per cell edge

    def record(a: float, part):
        crystal = Structure(Lattice.cubic(a), [elements[a]], [[0, 0, 0]])
        return {"screen_cif": crystal.to(fmt="cif"), "part": part, "a": a}

    screened = [record(4.0, 0), record(4.0, 0), record(4.5, 0), record(5.0, 0), record(5.5, 1), record(6.0, 1)]
    assert [r["a"] for r in refinement_choice(screened, 2)] == [4.0, 4.5, 5.5]  # part 1's best added
    assert [r["a"] for r in refinement_choice(screened, 4)] == [4.0, 4.5, 5.0, 5.5]  # part 1 already in
    same = [record(4.0, 0), record(4.5, 0), record(4.0, 1)]  # part 1's best is part 0's crystal: nothing added
    assert [r["a"] for r in refinement_choice(same, 1)] == [4.0]
    single = [record(4.0, None), record(4.5, None), record(5.0, None)]  # one generator: the n best only
    assert [r["a"] for r in refinement_choice(single, 2)] == [4.0, 4.5]
