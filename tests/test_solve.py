"""The solve pipeline (trials -> candidates -> refinement -> ranking -> files), driven by a test generator that
returns the true structure perturbed, and by one that returns wrong structures."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure

from xtalsolve.pattern import Pattern
from xtalsolve.physics.powder import Instrument, make_grid, simulate_powder
from xtalsolve.errors import XtalsolveError
from xtalsolve.solve import (SolveSettings, _rank_key, _read_cif, explore_then_exploit, independent_observations,
                             ranking_basis, repeats, solve)
from xtalsolve.composition import CellTrial


@pytest.fixture(scope="module")
def rutile_pattern():
    truth = Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.594, 2.959), ["Ti", "O"],
                                      [[0, 0, 0], [0.3048, 0.3048, 0]])
    grid, unit = make_grid((20.0, 75.0, 0.03))
    y = simulate_powder([truth], instrument=Instrument(wavelength=1.5406, w=0.003), two_theta=(20, 75, 0.03),
                        size=150.0, biso=0.5)[0]
    y = 1e4 * y / y.max() + 50.0
    rng = np.random.default_rng(0)
    y = rng.poisson(y).astype(float)
    return truth, Pattern(grid, y, np.sqrt(np.maximum(y, 1.0)), unit, 1.5406, "rutile-simulated")


def test_z_trials_explored_evenly_then_the_best_fitting_two_exploited():
    trials = [CellTrial(2, 6, 60.0, 0.7), CellTrial(1, 3, 30.0, 0.2), CellTrial(4, 12, 120.0, 0.1)]
    round1, round2 = explore_then_exploit(trials, 32)
    assert [(t.z, n) for t, n in round1] == [(2, 5), (1, 5), (4, 5)]  # half of 32, evenly
    # the data prefer Z = 4 and then Z = 1, whatever the prior said
    assert [(t.z, n) for t, n in round2({2: 0.09, 1: 0.05, 4: 0.01})] == [(4, 12), (1, 5)]
    assert sum(n for _, n in round1) + 17 == 32
    few1, few2 = explore_then_exploit(trials, 2)
    assert [n for _, n in few1] == [2, 2, 2] and few2({2: 0.1}) == []  # every trial is tried at least twice


def test_solve_ranks_the_truth_first_and_resumes(tmp_path, rutile_pattern):
    truth, pattern = rutile_pattern
    calls = []

    def generate(cell, n, seed, skip=0):
        calls.append((cell.reduced_formula, int(cell.num_atoms), n))
        rng = np.random.default_rng(seed)
        out = []
        for i in range(n):
            if int(cell.num_atoms) == len(truth) and i == 0:
                s = truth.copy()
                s.apply_strain(0.01)
                s.perturb(0.05, seed=seed)
            else:  # wrong: a random arrangement of the right atoms in a cube of the right volume
                volume = truth.volume * cell.num_atoms / len(truth)
                species = [el.symbol for el, k in cell.items() for _ in range(int(k))]
                s = Structure(Lattice.cubic(volume ** (1 / 3)), species, rng.random((len(species), 3)))
            out.append(s)
        return out

    settings = SolveSettings(samples=2, max_trials=2, natoms=6, refine_max_nfev=8)
    summary = solve(pattern, "TiO2", generate, tmp_path, settings)
    assert summary["formula"] == "TiO2" and [t["z"] for t in summary["trials"]] == [2]
    best = summary["candidates"][0]
    assert best["rank"] == 1 and best["rwp"] < 0.15
    refined = Structure.from_file(tmp_path / best["cif"])
    assert StructureMatcher().fit(refined, truth)
    assert (tmp_path / "fit.png").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["candidates"][0]["cif"] == "rank01.cif"
    assert all(c["score"] >= best["score"] for c in summary["candidates"])
    listed = {c["cif"] for c in summary["candidates"]} | {c["cif"] for c in summary["screened"]}
    assert all(c["same_as"] is None or c["same_as"] in listed for c in summary["screened"])

    # a second run finds every candidate refined already: nothing is generated or refined again
    calls.clear()
    again = solve(pattern, "TiO2", generate, tmp_path, settings)
    assert calls == [] and again["candidates"] == summary["candidates"]
    assert summary["ranking"]["by"] == "rwp"  # D = 150 A over 20-75 degrees: ~150 independent observations

    # ranked again by the restrained fit instead (same candidates, nothing refined again)
    by_fit = solve(pattern, "TiO2", generate, tmp_path, replace(settings, rank_by="fit"))
    scores = [c["screen_score"] for c in by_fit["candidates"]]
    assert calls == [] and by_fit["ranking"]["by"] == "fit" and scores == sorted(scores)
    assert len(by_fit["candidates"]) == len(summary["candidates"])
    # and by both: the geometric mean of the two scores orders them
    both = solve(pattern, "TiO2", generate, tmp_path, replace(settings, rank_by="both"))
    means = [np.sqrt(c["score"] * c["screen_score"]) for c in both["candidates"]]
    assert calls == [] and both["ranking"]["by"] == "both" and means == sorted(means)


def test_repeats_marks_the_same_crystal_listed_again():
    """A ranked list keeps each crystal once: rock salt, then rock salt in a conventional cell with its atoms moved
    0.01 A (the same crystal), then the CsCl arrangement of the same atoms and volume (another one), then rock
    salt again, and rock salt 10 % larger in volume (a different fit to the same pattern: not compared)."""
    rocksalt = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    moved = rocksalt.copy()
    moved.perturb(0.01, seed=1)
    primitive = rocksalt.get_primitive_structure()
    cscl = Structure(Lattice.cubic(primitive.volume ** (1 / 3)), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    larger = primitive.copy()
    larger.scale_lattice(1.1 * primitive.volume)
    assert repeats([primitive, moved, cscl, primitive.copy(), larger]) == [None, 0, None, 0, None]
    # residuals more than 1.3 apart are not the same crystal's either
    assert repeats([primitive, moved], residuals=[0.02, 0.05]) == [None, None]
    # a candidate fitted with two atoms onto one site leaves a CIF that pymatgen cannot read: it is listed as
    # itself (a solve of session 12 stopped there, before its summary)
    collapsed = Structure(Lattice.cubic(4.0), ["Na", "Na", "Cl"], [[0, 0, 0], [1e-5, 0, 0], [0.5, 0.5, 0.5]])
    assert _read_cif(collapsed.to(fmt="cif")) is None
    assert _read_cif(rocksalt.to(fmt="cif")) is not None
    assert repeats([primitive, None, primitive.copy(), None]) == [None, None, 0, None]


def test_independent_observations_and_the_ranking_basis():
    assert independent_observations(0.5, 8.0, 10.0) == pytest.approx(7.5 * 10.0 / np.pi)  # ~24
    assert independent_observations(0.5, 8.0, 100.0) == pytest.approx(238.7, abs=0.1)
    auto = SolveSettings()
    assert ranking_basis(auto, independent_observations(0.5, 8.0, 10.0)) == "fit"
    assert ranking_basis(auto, independent_observations(0.5, 8.0, 100.0)) == "rwp"
    assert ranking_basis(auto, 55.4) == "rwp"  # the measured Rb2S phase II (MoKa, ~80 A): Rwp ranks it right
    assert ranking_basis(SolveSettings(rank_by="rwp"), 5.0) == "rwp"
    # a stated exact crystallite shape: Rietveld's Lorentzian misfits it, so Rwp and the fit rank together
    cube = SolveSettings(crystallite_shape="cube")
    assert ranking_basis(cube, independent_observations(0.5, 8.0, 100.0)) == "both"
    assert ranking_basis(cube, independent_observations(0.5, 8.0, 10.0)) == "fit"
    assert ranking_basis(SolveSettings(crystallite_shape="sphere", rank_by="rwp"), 200.0) == "rwp"
    assert [r["n"] for r in sorted([{"n": 1, "score": 0.10, "screen_score": 0.040},  # sqrt: 0.063
                                    {"n": 2, "score": 0.12, "screen_score": 0.020},  # 0.049
                                    {"n": 3, "score": 0.05, "screen_score": 0.010, "plausible": False}],
                                   key=lambda r: _rank_key(r, "both"))] == [2, 1, 3]
    with pytest.raises(XtalsolveError, match="unknown ranking"):
        ranking_basis(SolveSettings(rank_by="chi2"), 100.0)


def test_solve_command_end_to_end_with_a_model_checkpoint(tmp_path, rutile_pattern):
    """The CLI wiring: pattern file -> model input -> guided sampling -> refinement -> files. The checkpoint is an
    untrained tiny model, so this checks the pipeline, not the solution."""
    import subprocess
    import sys

    import torch

    from xtalsolve.diffusion.model import CrystalDiffusion, ModelConfig
    from xtalsolve.diffusion.train import CHECKPOINT_FORMAT
    from xtalsolve.io import write_xy

    tiny = {"hidden": 16, "layers": 1, "k_max": 2, "time_dim": 8, "cond_dim": 8, "encoder_channels": 4}
    torch.manual_seed(0)
    model = CrystalDiffusion(ModelConfig(**tiny))
    checkpoint = tmp_path / "tiny.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "config": {"model": tiny}, "ema": model.state_dict()}, checkpoint)
    _, pattern = rutile_pattern
    data = tmp_path / "rutile.xy"
    write_xy(pattern, data)
    args = [sys.executable, "-m", "xtalsolve.cli", "solve", str(data), "--formula", "TiO2", "--natoms", "6",
            "--samples", "1", "--steps", "6", "--generator", "diffusion", "--checkpoint", str(checkpoint),
            "--out", str(tmp_path / "out")]
    result = subprocess.run(args, capture_output=True, text=True)
    # an untrained model may give cells the refinement cannot use: then exit 2, but with every attempt reported
    assert result.returncode == 0 or "no candidate could be refined" in result.stderr, result.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["formula"] == "TiO2" and summary["trials"] == [{"z": 2, "n_atoms": 6, "probability": 1.0}]
    assert len(summary["screened"]) + len(summary["failed"]) == 1  # every draw is accounted for
    for candidate in summary["candidates"]:
        structure = Structure.from_file(tmp_path / "out" / candidate["cif"])
        assert structure.composition.reduced_formula == "TiO2" and len(structure) == 6
    missing = subprocess.run(args[:-4] + ["--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "none.pt: no such checkpoint" in missing.stderr
    unknown = subprocess.run(args[:-2] + ["--generator", "magic", "--out", str(tmp_path / "y")],
                             capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown generator 'magic'" in unknown.stderr
    assert "Traceback" not in unknown.stderr and len(unknown.stderr.strip().splitlines()) == 1


def test_refine_candidate_finds_missed_symmetry(rutile_pattern):
    """A candidate refined in P1 (symmetry search too strict for its displaced atoms) converges towards the
    symmetric positions; the search for missed symmetry then re-refines it in P4_2/mnm."""
    from xtalsolve.refine import instrument_of
    from xtalsolve.solve import refine_candidate

    truth, pattern = rutile_pattern
    start = truth.copy()
    start.perturb(0.03, min_distance=0.02, seed=3)
    settings = SolveSettings(symprec=1e-4, refine_max_nfev=10)
    result = refine_candidate(pattern.in_two_theta(), start, instrument_of(pattern), settings)
    assert result.space_group == "P4_2/mnm (136)"
    assert result.rwp < 0.12 and StructureMatcher().fit(result.structure, truth)


def test_hopeless_candidates_are_abandoned_after_the_profile_stage(rutile_pattern):
    from xtalsolve.refine import instrument_of
    from xtalsolve.solve import CandidateAbandoned, refine_candidate

    truth, pattern = rutile_pattern
    rng = np.random.default_rng(5)
    wrong = Structure(Lattice.cubic(truth.volume ** (1 / 3)), truth.species, rng.random((len(truth), 3)))
    with pytest.raises(CandidateAbandoned) as stop:
        refine_candidate(pattern.in_two_theta(), wrong, instrument_of(pattern), SolveSettings(refine_max_nfev=6),
                         best_rwp=0.05)
    assert stop.value.record["stage"] == "profile" and stop.value.record["rwp"] > 0.1


def test_overlapping_atoms_are_implausible():
    from xtalsolve.solve import contact_check

    rutile = Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.594, 2.959), ["Ti", "O"],
                                       [[0, 0, 0], [0.3048, 0.3048, 0]])
    assert contact_check(rutile)[1]  # Ti-O 1.95 A, O-O 2.53 A
    collapsed = rutile.copy()
    collapsed.replace(2, "O", coords=rutile[3].frac_coords + [0.03, 0.0, 0.0])  # two O 0.14 A apart
    assert not contact_check(collapsed)[1]
    water_like = Structure(Lattice.cubic(6.0), ["O", "H"], [[0, 0, 0], [0.16, 0, 0]])  # O-H 0.96 A
    assert contact_check(water_like)[1]


def test_volume_fit_keeps_the_drawn_geometry_for_patterns_too_broad_to_fit_it(tmp_path, rutile_pattern):
    """fit_structure "volume": the screening fit and the refinement scale the cell and keep its shape and the
    atoms, so a rutile candidate drawn 10 % small in volume with c/a = 0.66 and x = 0.29 keeps the two and is
    scaled to the data's volume, while "full" moves them to the data's 0.644 and 0.3048; "auto" chooses
    "volume" only when a given crystallite size leaves the pattern fewer independent observations than the
    ranking threshold."""
    from xtalsolve.solve import pattern_loss, structure_fit

    truth, pattern = rutile_pattern
    start = Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.40, 2.904), ["Ti", "O"],
                                      [[0, 0, 0], [0.29, 0.29, 0]])

    def generate(cell, n, seed, skip=0):
        return [start.copy() for _ in range(n)]

    def refined(summary, out) -> tuple[float, float, float]:
        """c/a, oxygen x and volume (A^3) of the rank-1 refined crystal."""
        crystal = Structure.from_file(out / summary["candidates"][0]["cif"])
        x = max(site.frac_coords[0] % 0.5 for site in crystal if site.specie.symbol == "O")
        return crystal.lattice.c / crystal.lattice.a, x, crystal.volume

    base = SolveSettings(samples=1, natoms=6, refine_max_nfev=8, refine_top=1)
    held = solve(pattern, "TiO2", generate, tmp_path / "held", replace(base, fit_structure="volume"))
    free = solve(pattern, "TiO2", generate, tmp_path / "free", replace(base, fit_structure="full"))
    assert held["ranking"]["structure_fit"] == "volume" and free["ranking"]["structure_fit"] == "full"
    c_over_a, x, volume = refined(held, tmp_path / "held")
    assert c_over_a == pytest.approx(0.66, abs=1e-6) and x == pytest.approx(0.29, abs=1e-4)
    assert volume == pytest.approx(truth.volume, rel=0.03)  # the scaling is fitted
    c_over_a, x, _ = refined(free, tmp_path / "free")
    assert c_over_a == pytest.approx(2.959 / 4.594, abs=0.005) and x == pytest.approx(0.3048, abs=0.005)
    assert free["candidates"][0]["rwp"] < held["candidates"][0]["rwp"]

    loss = pattern_loss(pattern)  # 20-75 degrees Cu Ka: 1.4-4.8 1/A
    assert structure_fit(SolveSettings(size_hint_A=10.0), loss) == "volume"  # ~11 observations
    assert structure_fit(SolveSettings(size_hint_A=150.0), loss) == "full"
    assert structure_fit(SolveSettings(), loss) == "full"  # no size given: estimated from the pattern
    assert structure_fit(SolveSettings(size_hint_A=10.0, fit_structure="full"), loss) == "full"
    with pytest.raises(XtalsolveError, match="unknown structure fit"):
        SolveSettings(fit_structure="sometimes")


@pytest.mark.parametrize("size", [10.0, 30.0, 100.0])
def test_coherence_length_estimates_crystallite_size_and_chooses_the_fit(size):
    """Without a size hint "auto" must still give 10 A crystallites the volume fit: the pattern's own
    coherence length (no structure used) comes out within a factor 1.6 of the true size of anatase-like
    TiO2 cubes on a wide lab Q range, and decides the fit as the given size would."""
    from xtalsolve.solve import coherence_length, estimated_size, pattern_loss, structure_fit

    truth = Structure.from_spacegroup("I4_1/amd", Lattice.tetragonal(3.785, 9.514), ["Ti", "O"],
                                      [[0, 0.75, 0.125], [0, 0.75, 0.3333]])
    grid, unit = make_grid((10.0, 140.0, 0.02))
    y = simulate_powder([truth], instrument=Instrument(wavelength=1.5406), two_theta=(10.0, 140.0, 0.02), size=size,
                        biso=0.5)[0]
    y = 1e4 * y / y.max() + 30.0
    pattern = Pattern(grid, y, np.sqrt(y), unit, 1.5406, "anatase-simulated")
    loss = pattern_loss(pattern)
    estimate = estimated_size(loss)
    assert size / 1.6 < estimate < size * 1.6
    assert structure_fit(SolveSettings(), loss) == structure_fit(SolveSettings(size_hint_A=size), loss)
    assert structure_fit(SolveSettings(), loss) == ("volume" if size == 10.0 else "full")
    q = np.linspace(0.5, 8.0, 600)  # one damped sine in Q: a single pair distance of 3 A, nothing beyond
    assert coherence_length(q, 1.0 + np.sin(3.0 * q) / (3.0 * q)) < 10.0


def test_solve_takes_a_max_pooled_pattern_and_ranks_the_truth_first(tmp_path, rutile_pattern):
    """PXRDnet's representation end to end: the screening fit pools its calculated pattern alike, the
    refinement and ranking run as for any Q pattern, and the perturbed truth comes first of three."""
    from prototypes import max_pooled_pattern

    truth, _ = rutile_pattern
    grid, y, wavelength = max_pooled_pattern(truth, 100.0)
    pattern = Pattern(grid, y + np.random.default_rng(0).normal(0.0, 1e-3, len(y)), np.full_like(y, 1e-3), "q",
                      wavelength, "rutile-pooled", max_pool=8)

    def generate(cell, n, seed, skip=0):
        rng = np.random.default_rng(seed)
        out = []
        for i in range(skip, skip + n):
            if i == 0:
                s = truth.copy()
                s.apply_strain(0.01)
                s.perturb(0.05, seed=seed)
            else:
                species = [el.symbol for el, k in cell.items() for _ in range(int(k))]
                s = Structure(Lattice.cubic(truth.volume ** (1 / 3)), species, rng.random((len(species), 3)))
            out.append(s)
        return out

    settings = SolveSettings(samples=3, natoms=6, refine_max_nfev=8, size_hint_A=100.0, crystallite_shape="cube")
    summary = solve(pattern, "TiO2", generate, tmp_path, settings)
    assert StructureMatcher().fit(Structure.from_file(tmp_path / summary["candidates"][0]["cif"]), truth)
    fitted = min(summary["screened"], key=lambda c: c["screen_residual"])
    assert fitted["index"] == 0 and fitted["screen_residual"] < 0.01


def must_not_run(*args, **kwargs):
    """Stands in for the generator and the fit of a resumed run, which must reuse what is stored."""
    raise AssertionError("a resumed run drew or fitted again")


def test_a_finished_run_resumed_with_more_refined_refines_only_the_new_ones(tmp_path, monkeypatch, rutile_pattern):
    """``refine_top`` (``solve --refine N``) is how many distinct screened candidates are refined and ranked;
    resuming a finished run with a larger one refines the next candidates without drawing or fitting again, and
    keeps the refinements it has."""
    truth, pattern = rutile_pattern
    rutile = Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.55, 2.93), ["Ti", "O"],
                                       [[0, 0, 0], [0.30, 0.30, 0]])
    anatase = Structure.from_spacegroup("I4_1/amd", Lattice.tetragonal(3.785, 9.514), ["Ti", "O"],
                                        [[0, 0, 0], [0, 0, 0.2083]]).get_primitive_structure()
    assert len(anatase) == 6

    def generate(cell, n, seed, skip=0):
        return [s.copy() for s in [rutile, anatase][skip:skip + n]]

    base = SolveSettings(samples=2, natoms=6, refine_max_nfev=8, refine_top=1, restarts=0)
    once = solve(pattern, "TiO2", generate, tmp_path, base)
    assert len(once["candidates"]) == 1 and len(once["screened"]) == 2

    monkeypatch.setattr("xtalsolve.polish.polish", must_not_run)
    more = solve(pattern, "TiO2", must_not_run, tmp_path, replace(base, refine_top=2))
    assert len(more["candidates"]) + len(more["abandoned"]) == 2  # the second refined (or given up) now
    assert more["candidates"][0]["rwp"] == once["candidates"][0]["rwp"]  # the first kept, not refined again
    assert StructureMatcher().fit(Structure.from_file(tmp_path / "rank01.cif"), truth)
    with pytest.raises(XtalsolveError, match="at least one candidate must be refined"):
        SolveSettings(refine_top=0)


def test_the_best_candidates_are_fitted_again_from_other_starts(tmp_path, monkeypatch):
    """A candidate whose one screening fit ended in a false minimum (the drawn Rb2O-type FeAs2 of
    test_polish) is fitted again from other random starts, keeps its best fit and then refines to the truth; a
    resumed run does not fit it again."""
    from test_polish import MARCASITE_DRAWN, MARCASITE_TRUTH

    from prototypes import lab_pattern

    pattern = lab_pattern(MARCASITE_TRUTH, (15.0, 90.0, 0.02), 100.0, "FeAs2-simulated")

    def generate(cell, n, seed, skip=0):
        return [MARCASITE_DRAWN.copy() for _ in range(n)]

    base = SolveSettings(samples=1, natoms=6, refine_max_nfev=8, refine_top=1, size_hint_A=100.0, scan_top=0)
    once = solve(pattern, "FeAs2", generate, tmp_path / "once", replace(base, restarts=0))
    again = solve(pattern, "FeAs2", generate, tmp_path / "again", replace(base, restarts=3))
    assert again["screened"][0]["screen_residual"] < 0.2 * once["screened"][0]["screen_residual"]
    record = json.loads(next((tmp_path / "again" / "candidates").glob("*.json")).read_text())
    assert record["restarts"] == 3 and record["screen_residual"] == again["screened"][0]["screen_residual"]
    assert record["first_screen_residual"] == pytest.approx(once["screened"][0]["screen_residual"])
    assert set(again["stage_timing_s"]) == {"screen", "restarts", "coordinate scan", "refinement"}
    assert sum(again["stage_timing_s"].values()) <= again["timing_s"]
    matcher = StructureMatcher()
    assert matcher.fit(Structure.from_file(tmp_path / "again" / "rank01.cif"), MARCASITE_TRUTH)
    assert not matcher.fit(Structure.from_file(tmp_path / "once" / "rank01.cif"), MARCASITE_TRUTH)

    monkeypatch.setattr("xtalsolve.polish.polish", must_not_run)
    resumed = solve(pattern, "FeAs2", must_not_run, tmp_path / "again", replace(base, restarts=3))
    assert resumed["screened"] == again["screened"]
    with pytest.raises(XtalsolveError, match="restarts must be >= 0"):
        SolveSettings(restarts=-1)


def test_a_candidate_with_few_free_coordinates_is_searched_and_its_runner_up_listed(tmp_path, monkeypatch):
    """The drawn polar R3m candidate of test_polish (Se and O on the wrong side of their neighbours along the
    threefold axis) stays in its false minimum in the screening fit; the coordinate scan of the solver finds
    the truth and lists it, and the next other placement, as candidates of their own beside the drawn one, which
    keeps its fit; all three are refined, the truth ranks first, and a resumed run does not scan again."""
    from test_polish import _polar_r3m

    from prototypes import lab_pattern
    from xtalsolve.solve import SCAN_CHILD

    truth, drawn = _polar_r3m((0.378, 0.876)), _polar_r3m((0.62, 0.26))
    pattern = lab_pattern(truth, (10.0, 90.0, 0.02), 200.0, "polar-simulated")

    def generate(cell, n, seed, skip=0):
        return [drawn.copy() for _ in range(n)]

    base = SolveSettings(samples=1, natoms=4, refine_max_nfev=8, refine_top=2, size_hint_A=200.0, restarts=0)
    without = solve(pattern, "ZnGaSeO", generate, tmp_path / "without", replace(base, scan_top=0))
    scanned = solve(pattern, "ZnGaSeO", generate, tmp_path / "scanned", base)
    matcher = StructureMatcher()
    assert len(without["candidates"]) == 1
    assert not matcher.fit(Structure.from_file(tmp_path / "without" / "rank01.cif"), truth)
    assert matcher.fit(Structure.from_file(tmp_path / "scanned" / "rank01.cif"), truth)
    assert sorted(c["index"] for c in scanned["screened"]) == [0, SCAN_CHILD, 2 * SCAN_CHILD]
    record = json.loads((tmp_path / "scanned" / "candidates" / "z01_000.json").read_text())
    assert record["scanned"]["free_coordinates"] == 4 and record["scanned"]["listed"] == 2
    assert record["scanned"]["best_residual"] < 0.95 * record["scanned"]["first_screen_residual"]
    kept = [c for c in scanned["screened"] if c["index"] == 0][0]
    assert kept["screen_residual"] == record["scanned"]["first_screen_residual"]  # the drawn fit is not replaced
    assert len(scanned["candidates"]) + len(scanned["abandoned"]) == 3  # all refined (or given up), beside the top 2

    monkeypatch.setattr("xtalsolve.polish.polish", must_not_run)
    monkeypatch.setattr("xtalsolve.polish.scan_coordinates", must_not_run)
    resumed = solve(pattern, "ZnGaSeO", must_not_run, tmp_path / "scanned", base)
    assert resumed["screened"] == scanned["screened"]
    with pytest.raises(XtalsolveError, match="coordinate scan"):
        SolveSettings(scan_keep=-1)


def test_a_species_swap_of_neighbours_in_the_periodic_table_is_recognised():
    """Zn and Ga (Z 30, 31) swapped in a polar R3m crystal is the same crystal for X-rays and is named;
    swapping Se and O (Z 34, 8) is not a near-swap (at pymatgen's default tolerances the two swaps of this
    crystal match each other), and a crystal is no swap of itself."""
    from test_polish import _polar_r3m

    from xtalsolve.solve import species_swap

    truth = _polar_r3m((0.378, 0.876), z_ga=0.21)  # not 0.503: with Ga half a period above Zn its Zn/Ga swap is its Se/O swap
    zn_ga = truth.copy()
    zn_ga.replace_species({"Zn": "Ga", "Ga": "Zn"})
    se_o = truth.copy()
    se_o.replace_species({"Se": "O", "O": "Se"})
    assert species_swap(truth, zn_ga) == ("Zn", "Ga")
    assert species_swap(truth, se_o) is None
    assert species_swap(truth, truth) is None


def test_a_ranked_candidate_that_is_rank_one_with_two_species_swapped_is_a_caution(tmp_path):
    """Candidates: the truth and the truth with Zn and Ga swapped; both are refined and the summary (and so the
    CLI) names the swap instead of letting the second look like an independent solution."""
    from test_polish import _polar_r3m

    from prototypes import lab_pattern

    truth = _polar_r3m((0.378, 0.876), z_ga=0.21)
    swapped = truth.copy()
    swapped.replace_species({"Zn": "Ga", "Ga": "Zn"})
    pattern = lab_pattern(truth, (10.0, 90.0, 0.02), 200.0, "polar-simulated")

    def generate(cell, n, seed, skip=0):
        return [(truth if (skip + i) % 2 == 0 else swapped).copy() for i in range(n)]

    settings = SolveSettings(samples=2, natoms=4, refine_max_nfev=8, refine_top=2, size_hint_A=200.0, restarts=0,
                             scan_top=0, abandon_factor=1e6)  # the swap's Rwp is far above the truth's 0
    summary = solve(pattern, "ZnGaSeO", generate, tmp_path / "run", settings)
    assert len(summary["candidates"]) == 2
    assert len(summary["cautions"]) == 1
    assert "rank02.cif" in summary["cautions"][0] and "Zn and Ga swapped" in summary["cautions"][0]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["cautions"] == summary["cautions"]


def test_a_poor_fit_draws_a_second_pass_that_is_ranked_with_the_first(tmp_path, monkeypatch, rutile_pattern):
    """When the first pass's rank 1 is a poor structure model (R_Bragg above ``second_pass_r_bragg``),
    candidates of the second-pass generator are screened and refined as a pass of their own and ranked with the
    first; a good fit never calls it, and a resumed run draws nothing again."""
    truth, pattern = rutile_pattern
    anatase = Structure.from_spacegroup("I4_1/amd", Lattice.tetragonal(3.785, 9.514), ["Ti", "O"],
                                        [[0, 0, 0], [0, 0, 0.2083]]).get_primitive_structure()
    second_calls = []

    def library(cell, n, seed, skip=0):  # a first pass of the wrong structure type only
        return [anatase.copy() for _ in range(n)]

    def model(cell, n, seed, skip=0):
        second_calls.append(n)
        out = []
        for i in range(n):
            s = truth.copy()
            s.apply_strain(0.01)
            s.perturb(0.03, seed=seed + i)
            s.properties["origin"] = "second-pass test model"
            out.append(s)
        return out

    base = SolveSettings(samples=2, natoms=6, refine_max_nfev=8, refine_top=1, restarts=0, scan_top=0,
                         second_pass_samples=3)
    summary = solve(pattern, "TiO2", library, tmp_path / "poor", base, second_pass=model)
    first_r = summary["second_pass"]["rank1_r_bragg_first_pass"]
    assert summary["second_pass"]["triggered"] and first_r > 0.10
    assert second_calls == [3] and "second-pass screen" in summary["stage_timing_s"]
    assert summary["candidates"][0]["origin"] == "second-pass test model"
    assert StructureMatcher().fit(Structure.from_file(tmp_path / "poor" / "rank01.cif"), truth)
    assert any(c["origin"] is None for c in summary["candidates"][1:])  # the first pass's anatase is ranked too
    listed = [c["origin"] for c in summary["screened"]]  # by fit, the second pass's after the first pass's
    assert listed == sorted(listed, key=lambda o: o == "second-pass test model") and listed[0] is None
    assert summary["candidates"][0]["r_bragg"] < 0.10 < first_r

    monkeypatch.setattr("xtalsolve.polish.polish", must_not_run)
    resumed = solve(pattern, "TiO2", must_not_run, tmp_path / "poor", base, second_pass=must_not_run)
    assert resumed["candidates"] == summary["candidates"]
    monkeypatch.undo()

    good = solve(pattern, "TiO2", model, tmp_path / "good", base, second_pass=must_not_run)
    assert not good["second_pass"]["triggered"] and good["second_pass"]["rank1_r_bragg_first_pass"] < 0.10
    off = solve(pattern, "TiO2", library, tmp_path / "off", replace(base, second_pass_r_bragg=0),
                second_pass=must_not_run)
    assert not off["second_pass"]["triggered"]
    broad = solve(pattern, "TiO2", library, tmp_path / "broad", replace(base, fit_structure="volume"),
                  second_pass=must_not_run)  # too few observations to tell the model's crystals apart
    assert broad["second_pass"]["rank1_r_bragg_first_pass"] > 0.10 and not broad["second_pass"]["triggered"]
    assert broad["second_pass"]["skipped"] == "pattern too broad for a structure fit"
    with pytest.raises(XtalsolveError, match="second pass"):
        SolveSettings(second_pass_samples=0)


def test_a_second_pass_candidate_in_a_near_tie_ranks_after_the_first_pass():
    from xtalsolve.solve import SECOND_PASS, ranked_refined

    def record(name, score, part=None):
        return {"name": name, "rwp": score, "score": score, "screen_score": score, "part": part}

    library, library2 = record("library", 0.120), record("library 2", 0.200)
    records = [library, library2, record("model, near tie", 0.115, SECOND_PASS),
               record("model, better", 0.100, SECOND_PASS), {"name": "screened only", "screen_score": 0.01}]
    order = [r["name"] for r in ranked_refined(records, "rwp", library)]
    assert order == ["model, better", "library", "library 2", "model, near tie"]
    assert [r["name"] for r in ranked_refined(records, "rwp")][:3] == ["model, better", "model, near tie", "library"]
