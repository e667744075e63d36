"""The structure-solution pipeline: formula + pattern -> candidates -> Rietveld refinement -> ranked, verified
solutions written as CIF with a report.

    trials of Z (composition.py) -> generate candidates (any generator: the guided diffusion sampler in
    production) -> fit all of them at once to the pattern (polish.py: cell strain + P1 coordinates, batched
    autograd) and rank them by that fit -> Rietveld refinement of the best few, symmetry found at a tolerance
    (refine/) -> rank by Rwp -> rankNN.cif, summary.json, fit.png

Every refined candidate is saved as it finishes (``candidates/*.json``), so a killed run resumes where it stopped
and no result is lost.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pymatgen.core import Composition, Structure

from xtalsolve.composition import CellTrial, formula_unit_trials, parse_formula
from xtalsolve.errors import XtalsolveError
from xtalsolve.pattern import Pattern

Generator = Callable[[Composition, int, int], Sequence[Structure]]
"""generate(cell_composition, n, seed) -> n candidate structures with exactly that cell content."""


@dataclass(frozen=True)
class SolveSettings:
    """How hard to search: candidates in all, formula-unit trials tried, refinement effort. Every candidate is
    screened by the batched local fit of :mod:`xtalsolve.polish` (``polish_steps`` iterations), and the
    ``refine_top`` best distinct ones are refined fully (all Rietveld stages, ``refine_max_nfev`` evaluations
    per stage, symmetry of the fitted candidate found at ``symprec`` angstrom)."""

    samples: int = 32
    max_trials: int = 3
    seed: int = 0
    max_atoms: int = 20
    natoms: int | None = None
    refine_max_nfev: int = 15
    polish_steps: int = 80
    refine_top: int = 3
    symprec: float = 0.1
    size_hint_A: float | None = None


def diffusion_generator(checkpoint: str | Path, pattern: Pattern, n_steps: int = 200, guided: bool = True,
                        cfg_scale: float = 1.0, size_hint_A: float | None = None) -> Generator:
    """Candidates from the trained diffusion model, conditioned on ``pattern`` and (``guided``) steered by it at
    every reverse step through the differentiable forward model."""
    from xtalsolve.data.augment import Augmentation, model_input
    from xtalsolve.diffusion.guidance import DataGuidance, PatternLoss
    from xtalsolve.diffusion.sampler import generate_structures
    from xtalsolve.diffusion.train import load_model
    from xtalsolve.refine import instrument_of

    model = load_model(checkpoint)
    aug = Augmentation()
    observed, mask = model_input(pattern, aug)
    instrument = instrument_of(pattern)

    def generate(cell: Composition, n: int, seed: int) -> list[Structure]:
        guidance = None
        if guided:
            loss = PatternLoss(aug.grid, observed.double(), mask, instrument=instrument, size=size_hint_A)
            guidance = DataGuidance(loss)
        return generate_structures(model, [cell] * n, n_steps, pattern=observed.expand(n, -1),
                                   mask=mask.expand(n, -1), cfg_scale=cfg_scale, guidance=guidance, seed=seed)

    return generate


def allocate(trials: Sequence[CellTrial], samples: int) -> list[tuple[CellTrial, int]]:
    """Share ``samples`` among trials in proportion to their probability, at least one each."""
    counts = [max(1, round(samples * t.probability)) for t in trials]
    while sum(counts) > max(samples, len(trials)):
        counts[counts.index(max(counts))] -= 1
    return list(zip(trials, counts))


def pattern_loss(pattern: Pattern, size_A: float | None = None):
    """The mismatch the candidates are fitted and ranked by: the pattern on the model's Q grid (normalised,
    masked outside the measured range) against the forward model with free scale and background; crystallite
    size ``size_A`` (angstrom) or fitted per candidate."""
    from xtalsolve.data.augment import Augmentation, model_input
    from xtalsolve.diffusion.guidance import PatternLoss
    from xtalsolve.refine import instrument_of

    aug = Augmentation()
    observed, mask = model_input(pattern, aug)
    return PatternLoss(aug.grid, observed.double(), mask, instrument=instrument_of(pattern), size=size_A)


def distinct(records: Sequence[dict], n: int) -> list[dict]:
    """The first ``n`` records (best first) whose fitted structures are pairwise different crystals
    (pymatgen StructureMatcher, default tolerances): refining the same solution twice wastes the budget."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    matcher = StructureMatcher()
    chosen, structures = [], []
    for record in records:
        if len(chosen) == n:
            break
        structure = Structure.from_str(record["screen_cif"], fmt="cif")
        if any(matcher.fit(structure, other) for other in structures):
            continue
        chosen.append(record)
        structures.append(structure)
    return chosen


def _candidate_file(directory: Path, z: int, index: int) -> Path:
    return directory / f"z{z:02d}_{index:03d}.json"


def solve(
    pattern: Pattern,
    formula: str | Composition,
    generate: Generator,
    out_dir: str | Path,
    settings: SolveSettings = SolveSettings(),
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Solve ``pattern`` for ``formula`` and write the ranked, refined candidates to ``out_dir``.

    Returns the summary (also written as summary.json): formula, trials, candidates ranked by Rwp with their
    CIF file, Rwp, Rp, GoF, space group and lattice (angstrom, degrees), and the time taken (s).
    """
    from xtalsolve.io.structures import write_cif
    from xtalsolve.polish import PolishSettings, polish
    from xtalsolve.refine import instrument_of, refine
    from xtalsolve.refine.report import plot_fit

    start = time.perf_counter()
    composition = parse_formula(formula) if isinstance(formula, str) else formula.reduced_composition
    out = Path(out_dir)
    store = out / "candidates"
    store.mkdir(parents=True, exist_ok=True)
    instrument = instrument_of(pattern)
    measured = pattern.in_two_theta()  # the refinement works in 2theta
    trials = formula_unit_trials(composition, pattern, settings.max_atoms, settings.natoms)[: settings.max_trials]
    say = progress or (lambda message: None)

    options = {"size": settings.size_hint_A} if settings.size_hint_A else {}
    loss = pattern_loss(pattern, settings.size_hint_A)
    records = []
    for trial, count in allocate(trials, settings.samples):
        stored = [_candidate_file(store, trial.z, i) for i in range(count)]
        if all(path.is_file() for path in stored):  # screened in an earlier run
            records += [json.loads(path.read_text()) for path in stored]
            continue
        say(f"Z = {trial.z}: drawing {count} candidates")
        structures = generate(trial.composition(composition), count, settings.seed + 1000 * trial.z)
        say(f"Z = {trial.z}: fitting {count} candidates to the pattern")
        fitted, residuals = polish(structures, loss, PolishSettings(steps=settings.polish_steps))
        for i, path in enumerate(stored):
            record = {"z": trial.z, "index": i, "candidate_cif": structures[i].to(fmt="cif")}
            if np.isfinite(residuals[i]) and fitted[i].volume > 0:
                record |= {"screen_residual": float(residuals[i]), "screen_cif": fitted[i].to(fmt="cif")}
                write_cif(fitted[i], path.with_suffix(".cif"))
            else:  # a collapsed or exploded candidate must not end the run
                record["failed"] = "the local fit diverged"
            path.write_text(json.dumps(record))
            records.append(record)

    # full Rietveld for the best screened candidates (kept on disk too, so a resumed run skips them)
    screened = sorted((r for r in records if "screen_residual" in r), key=lambda r: r["screen_residual"])
    best = None
    for record in distinct(screened, settings.refine_top):
        path = _candidate_file(store, record["z"], record["index"])
        if "rwp" in record or "refine_failed" in record:
            continue
        say(f"Z = {record['z']}: refining candidate {record['index'] + 1} "
            f"(fit residual {record['screen_residual']:.4f})")
        try:
            result = refine(measured, Structure.from_str(record["screen_cif"], fmt="cif"), instrument,
                            max_nfev=settings.refine_max_nfev, symprec=settings.symprec, **options)
        except Exception as err:  # noqa: BLE001 - keep the screened result
            record["refine_failed"] = f"{type(err).__name__}: {err}"
        else:
            record |= {"rwp": result.rwp, "rp": result.rp, "gof": result.gof, "space_group": result.space_group,
                       "lattice": dict(zip(("a", "b", "c", "alpha", "beta", "gamma"), map(float, result.cell))),
                       "cif": result.structure.to(fmt="cif"), "seconds": round(result.seconds, 2)}
            if best is None or result.rwp < best.rwp:
                best = result
        path.write_text(json.dumps(record))

    ranked = sorted((r for r in records if "rwp" in r), key=lambda r: r["rwp"])
    candidates = []
    for rank, record in enumerate(ranked, start=1):
        name = f"rank{rank:02d}.cif"
        write_cif(Structure.from_str(record["cif"], fmt="cif"), out / name)
        candidates.append({"rank": rank, "cif": name, **{k: record[k] for k in
                                                         ("rwp", "rp", "gof", "space_group", "lattice", "z")}})
    if best is not None and abs(best.rwp - ranked[0]["rwp"]) < 1e-12:
        plot_fit(best, out / "fit.png", title=f"{composition.reduced_formula}: rank 1, Rwp {best.rwp:.2%}")
    summary = {
        "formula": composition.reduced_formula,
        "source": pattern.source,
        "trials": [{"z": t.z, "n_atoms": t.n_atoms, "probability": t.probability} for t in trials],
        "candidates": candidates,
        "screened": [{"z": r["z"], "index": r["index"], "screen_residual": r["screen_residual"], "refined": "rwp" in r,
                      "cif": str(_candidate_file(store, r["z"], r["index"]).with_suffix(".cif").relative_to(out))}
                     for r in screened],
        "failed": [{"z": r["z"], "index": r["index"], "reason": r["failed"]} for r in records if "failed" in r],
        "timing_s": round(time.perf_counter() - start, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if not ranked:
        raise XtalsolveError(f"no candidate could be refined (reasons in {out / 'summary.json'})", pattern.source)
    return summary
