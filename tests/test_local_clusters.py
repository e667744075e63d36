"""Cluster cutting, perturbations and first-shell descriptors against analytic and pymatgen references."""

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from xtalsolve.errors import XtalsolveError
from xtalsolve.local.clusters import Cluster, bond_angles, cut_cluster, first_shell, perturb

TETRAHEDRAL = np.degrees(np.arccos(-1 / 3))  # 109.4712 degrees


def tetrahedron(r=1.61):
    v = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / np.sqrt(3) * r
    return Cluster(("Si", "O", "O", "O", "O"), np.vstack([np.zeros(3), v]))


def octahedron(r=1.78):
    v = np.vstack([np.eye(3), -np.eye(3)]) * r
    return Cluster(("Si",) + ("O",) * 6, np.vstack([np.zeros(3), v]))


def quartz():
    """alpha-quartz, P3_121 (Levien et al. 1980): Si-O 1.604 (x2), 1.613 (x2) angstrom."""
    return Structure.from_spacegroup("P3_121", Lattice.hexagonal(4.9134, 5.4052), ["Si", "O"],
                                     [[0.4697, 0, 1 / 3], [0.4135, 0.2669, 0.21423]])


def stishovite():
    """Stishovite, P4_2/mnm: six-fold Si, Si-O 1.757 (x4) and 1.808 (x2) angstrom."""
    return Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.1773, 2.6655), ["Si", "O"],
                                     [[0, 0, 0], [0.3061, 0.3061, 0]])


def test_ideal_tetrahedron():
    fs = first_shell(tetrahedron())
    assert fs.coordination_number == 4
    np.testing.assert_allclose(fs.bond_lengths_A, 1.61)
    np.testing.assert_allclose(fs.angles_deg, TETRAHEDRAL, atol=1e-9)
    assert len(fs.angles_deg) == 6


def test_ideal_octahedron():
    fs = first_shell(octahedron())
    assert fs.coordination_number == 6
    np.testing.assert_allclose(fs.angles_deg, [90.0] * 12 + [180.0] * 3, atol=1e-9)


@pytest.mark.parametrize("build, cn", [(quartz, 4), (stishovite, 6)])
def test_crystal_first_shell_matches_pymatgen_neighbours(build, cn):
    s = build()
    site = next(i for i, x in enumerate(s) if x.specie.symbol == "Si")
    cl = cut_cluster(s, site, n_atoms=49)
    assert len(cl) == 49 and cl.absorber == "Si"
    np.testing.assert_allclose(cl.positions[0], 0.0)
    assert np.all(np.diff(cl.distances) >= -1e-9)  # sorted by distance
    ref = sorted(n.nn_distance for n in s.get_neighbors(s[site], 2.2) if n.specie.symbol == "O")
    fs = first_shell(cl)
    assert fs.coordination_number == cn == len(ref)
    np.testing.assert_allclose(fs.bond_lengths_A, ref, atol=1e-6)
    # Every cluster atom is a real atom of the crystal at the right distance: compare distance histograms.
    all_ref = sorted(n.nn_distance for n in s.get_neighbors(s[site], cl.distances.max() - 1e-6))
    np.testing.assert_allclose(np.sort(cl.distances[1:])[: len(all_ref)], all_ref, atol=1e-6)


def test_quartz_and_stishovite_bond_values():
    q = first_shell(cut_cluster(quartz(), 0))
    np.testing.assert_allclose(q.bond_lengths_A, [1.604, 1.604, 1.613, 1.613], atol=2e-3)
    assert 108.0 < q.angles_deg.min() and q.angles_deg.max() < 111.0
    st = first_shell(cut_cluster(stishovite(), 0))
    np.testing.assert_allclose(st.bond_lengths_A, [1.757] * 4 + [1.808] * 2, atol=2e-3)


def test_cut_by_radius():
    cl = cut_cluster(quartz(), 0, radius=3.5, n_atoms=None)
    assert cl.distances.max() <= 3.5
    assert first_shell(cl).coordination_number == 4


def test_perturbations_are_seeded_and_do_what_they_say():
    base = tetrahedron()
    a = perturb(base, "stretch", seed=3, sigma_A=0.05)
    assert np.array_equal(a.positions, perturb(base, "stretch", seed=3, sigma_A=0.05).positions)
    assert not np.array_equal(a.positions, perturb(base, "stretch", seed=4, sigma_A=0.05).positions)
    # stretch moves along the bond: directions unchanged
    u0 = base.positions[1:] / base.distances[1:, None]
    u1 = a.positions[1:] / a.distances[1:, None]
    np.testing.assert_allclose(u0, u1, atol=1e-12)
    assert np.abs(a.distances[1:] - 1.61).max() > 1e-3
    # bend keeps lengths, changes angles
    b = perturb(base, "bend", seed=1, sigma_deg=5.0)
    np.testing.assert_allclose(b.distances, base.distances, atol=1e-12)
    assert np.abs(first_shell(b).angles_deg - TETRAHEDRAL).max() > 0.5
    # vacancy removes exactly one ligand
    v = perturb(base, "vacancy", seed=0)
    assert first_shell(v).coordination_number == 3 and len(v) == 4
    assert v.meta["perturbation"][0]["kind"] == "vacancy"
    # rattle keeps the absorber at the origin
    r = perturb(base, "rattle", seed=0, sigma_A=0.1)
    np.testing.assert_allclose(r.positions[0], 0.0)
    with pytest.raises(XtalsolveError):
        perturb(base, "melt", seed=0)


def test_bond_angles_right_angle():
    np.testing.assert_allclose(bond_angles(np.array([[1.0, 0, 0], [0, 2.0, 0]])), [90.0])


def test_xyz_text():
    text = tetrahedron().to_xyz("t")
    lines = text.splitlines()
    assert lines[0] == "5" and lines[2].split()[0] == "Si"
