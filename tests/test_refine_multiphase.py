"""Multi-phase Rietveld: a rutile + anatase mixture simulated by the independent simulate_powder path (each phase
weighted by its mass fraction / (Z M V), Poisson noise, seeded) must give back the weight fractions (Hill &
Howard) and both cells from perturbed starts; the CLI writes one CIF per phase and the phase table."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from tests.conftest import assert_jacobian_matches_differences
from xtalsolve.io import write_xy
from xtalsolve.pattern import Pattern
from xtalsolve.physics.powder import Instrument, simulate_powder
from xtalsolve.refine import perturb, refine, symmetrize
from xtalsolve.refine.constraints import symmetry_of
from xtalsolve.refine.recipe import Profile

GRID = (15.0, 80.0, 0.02)
INSTRUMENT = Instrument(wavelength=1.5406, w=0.004)
TRUE_FRACTIONS = {"rutile": 0.3, "anatase": 0.7}
SIZES = {"rutile": 800.0, "anatase": 400.0}


def phases() -> dict[str, Structure]:
    rutile = Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.594, 2.959), ["Ti", "O"],
                                       [[0, 0, 0], [0.3049, 0.3049, 0]])
    anatase = Structure.from_spacegroup("I4_1/amd", Lattice.tetragonal(3.7852, 9.5139), ["Ti", "O"],
                                        [[0, 0.75, 0.125], [0, 0.75, 0.3333]])
    return {"rutile": symmetrize(rutile), "anatase": symmetrize(anatase)}


def mixture(structures: dict[str, Structure], counts: float = 3e4, seed: int = 0, grid=GRID) -> Profile:
    """Intensity of phase p per unit mass fraction is |F|^2 LP / (Z M V)_p (no 1/V^2 in simulate_powder)."""
    total = 0.0
    for name, s in structures.items():
        y = simulate_powder(s, two_theta=grid, size=SIZES[name], biso=0.5, instrument=INSTRUMENT)[0]
        total = total + TRUE_FRACTIONS[name] / (float(s.composition.weight) * s.volume) * y
    x = grid[0] + grid[2] * np.arange(len(total))
    observed = np.random.default_rng(seed).poisson(counts * total / total.max() + 80.0).astype(float)
    return Profile.from_arrays(x, observed, np.sqrt(np.maximum(observed, 1.0)))


@pytest.fixture(scope="module")
def two_phase_fit():
    truth = phases()
    starts = [perturb(truth["rutile"], 0.01, 0.05, seed=1), perturb(truth["anatase"], 0.01, 0.05, seed=2)]
    result = refine(mixture(truth), starts, INSTRUMENT, n_background=3, profile_params=("size",), biso=0.5,
                    max_nfev=20, names=["rutile", "anatase"])
    return truth, starts, result


def test_weight_fractions_and_cells_recovered(two_phase_fit):
    truth, starts, result = two_phase_fit
    assert [p.name for p in result.phases] == ["rutile", "anatase"]
    assert abs(starts[1].lattice.c / truth["anatase"].lattice.c - 1) > 0.009  # the starts really were 1 % off
    for phase in result.phases:
        assert phase.weight_fraction == pytest.approx(TRUE_FRACTIONS[phase.name], abs=0.02)
        assert 0 < phase.weight_fraction_esd < 0.02
        assert np.allclose(phase.cell[:3], truth[phase.name].lattice.abc, rtol=1e-3)
        assert symmetry_of(phase.structure, 1e-3).number == {"rutile": 136, "anatase": 141}[phase.name]
        assert phase.r_bragg < 0.03
    assert sum(p.weight_fraction for p in result.phases) == pytest.approx(1.0)
    assert result.gof < 1.5  # down to the noise
    # per-phase parameters are prefixed; the background and zero shift are shared
    assert {"rutile:scale", "anatase:scale", "rutile:size", "anatase:lattice.G33", "zero", "bkg0"} <= set(result.parameters)
    assert result.parameters["anatase:size"]["value"] == pytest.approx(SIZES["anatase"], rel=0.2)
    contributions = np.array([p.rwp_contribution for p in result.phases])
    assert np.all(contributions > 0) and np.sqrt((contributions**2).sum()) <= result.rwp + 1e-12


def test_single_structure_is_one_phase(two_phase_fit):
    """A plain Structure keeps the one-phase names and gets weight fraction 1."""
    truth, _, _ = two_phase_fit
    profile = mixture({"rutile": truth["rutile"]}, seed=3)
    result = refine(profile, truth["rutile"], INSTRUMENT, n_background=3, profile_params=("size",),
                    stages=(("scale+background", ("scale", "background")),), max_nfev=10)
    assert "scale" in result.parameters and len(result.phases) == 1
    assert result.phases[0].weight_fraction == 1.0
    assert result.summary()["phases"][0]["weight_fraction"] == 1.0


def test_cli_two_phases(tmp_path):
    from typer.testing import CliRunner

    from xtalsolve.cli import app

    truth = phases()
    profile = mixture(truth, seed=4, grid=(20.0, 56.0, 0.04))  # a short pattern: this checks the outputs
    pattern = tmp_path / "mix.xy"
    write_xy(Pattern(profile.x, profile.y, profile.sigma, "2theta", 1.5406, "mix"), pattern, {}, sigma=True)
    cifs = []
    for k, (name, s) in enumerate(truth.items()):
        cifs.append(tmp_path / f"{name}.cif")
        perturb(s, 0.005, 0.02, seed=k).to(filename=str(cifs[-1]))
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["refine", str(pattern), *map(str, cifs), "--out", str(out), "--background", "3",
                                   "--no-displacement"])
    assert run.exit_code == 0, run.output
    summary = json.loads((out / "summary.json").read_text())
    by_name = {p["name"]: p for p in summary["phases"]}
    assert set(by_name) == {"rutile", "anatase"}
    for name, p in by_name.items():
        assert {"weight_fraction", "weight_fraction_esd", "rwp_contribution", "cell", "space_group"} <= set(p)
        assert p["weight_fraction"] == pytest.approx(TRUE_FRACTIONS[name], abs=0.03)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            refined = Structure.from_file(out / f"refined_{name}.cif")
        assert refined.lattice.a == pytest.approx(p["cell"]["a"], abs=1e-3)
    assert not (out / "refined.cif").exists()
    assert (out / "fit.png").stat().st_size > 10_000


def test_lebail_start_with_two_phases():
    """refine(lebail_start=True): a two-phase Le Bail fit (intensities free) finds both cells, and the Rietveld
    stages start from them."""
    truth = phases()
    profile = mixture(truth, seed=5)
    starts = [perturb(truth["rutile"], 0.01, 0.0, seed=3), perturb(truth["anatase"], 0.01, 0.0, seed=4)]
    result = refine(profile, starts, INSTRUMENT, n_background=3, profile_params=("w", "size"), max_nfev=10,
                    names=["rutile", "anatase"], lebail_start=True,
                    stages=(("scale+background", ("scale", "background")), ("lattice+zero", ("lattice", "zero"))))
    assert [s["stage"] for s in result.stages] == ["lebail start", "scale+background", "lattice+zero"]
    assert result.stages[0]["rwp"] < 0.2
    for phase in result.phases:
        assert np.allclose(phase.cell[:3], truth[phase.name].lattice.abc, rtol=5e-4)


def test_jacobian_of_two_phases_matches_finite_differences():
    """Both phase scales and each phase's cell, size and coordinates: the chain rule through the peaks of the
    right phase (Recipe._peak_jacobian) against central differences."""
    from xtalsolve.refine.recipe import Recipe

    truth = phases()
    starts = [perturb(truth["rutile"], 0.01, 0.05, seed=1), perturb(truth["anatase"], 0.01, 0.05, seed=2)]
    recipe = Recipe(mixture(truth, grid=(20.0, 60.0, 0.02)), starts, INSTRUMENT, n_background=2,
                    profile_params=("w", "size"), names=["rutile", "anatase"])
    recipe.initialise()
    recipe.parameters.release("scale", "background", "lattice", "zero", "profile", "positions", "biso")
    names = [p.name for p in recipe.parameters.free]
    assert {"rutile:scale", "anatase:scale", "rutile:size", "anatase:O1.z", "zero"} <= set(names)
    # small steps: a peak that changes its window group on a larger step (a rutile peak at 41.5 degrees for
    # G11 -2e-5) makes a jump of 0.06 sigma where its truncated Lorentzian tail ends, which central differences
    # would read as a slope
    assert_jacobian_matches_differences(recipe, names, relative_step=1e-7)
