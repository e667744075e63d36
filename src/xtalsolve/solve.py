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
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pymatgen.core import Composition, Structure

from xtalsolve.composition import CellTrial, formula_unit_trials, parse_formula
from xtalsolve.errors import XtalsolveError
from xtalsolve.pattern import Pattern
from xtalsolve.prototypes import DEFAULT_LIBRARY

Generator = Callable[..., Sequence[Structure]]
"""generate(cell_composition, n, seed, skip=0) -> n candidate structures with exactly that cell content; ``skip``
is how many this run has already drawn for that cell (a generator with a ranked list goes on from there)."""


RANK_BY = ("auto", "rwp", "fit", "both")
"""Orders of the refined candidates (:class:`SolveSettings` ``rank_by``)."""
BISO_TRIALS = (0.0, 0.5, 1.0)
"""Overall displacement parameters (angstrom^2) the screening fit tries with ``SolveSettings.fit_nuisances``."""
FIT_STRUCTURE = ("auto", "full", "volume")
"""What the fit and the refinement may change in a candidate (:class:`SolveSettings` ``fit_structure``)."""


@dataclass(frozen=True)
class SolveSettings:
    """How hard to search: candidates in all, formula-unit trials tried, refinement effort. Every candidate is
    screened by the batched local fit of :mod:`xtalsolve.polish` (``polish_steps`` iterations), and the
    ``refine_top`` best distinct ones (and the best of each part of a mixed generator, :func:`refinement_choice`)
    are refined fully (all Rietveld stages, ``refine_max_nfev`` evaluations
    per stage, symmetry of the fitted candidate found at ``symprec`` angstrom). A candidate whose Rwp after the
    profile stage is more than ``abandon_factor`` times the best final Rwp so far is abandoned: refining its
    coordinates cannot close such a gap, and they are the most expensive stages.

    Candidates are ranked by their misfit (fit residual, then Rwp) times ``1 + parameter_price * P``, P = the
    structural degrees of freedom in the candidate's space group (cell strains + free coordinates): the
    crystallographer's preference for the simplest model that fits, a free parameter has to buy this share of
    the misfit. Without it a big low-symmetry cell wins by absorbing misfit (e.g. bcc Ti as an 8-atom C2/m cell at
    6.9 % against 7.2 %).

    A candidate that its generator ranked by prior (``structure.properties["prior_rank"]``, 0 = likeliest: the
    prototype library's order) has its fit residual also raised by ``prior_price`` per rank when it is screened:
    broad patterns (10 angstrom crystallites) tell similar structure types apart only weakly, and the prior then
    breaks the tie. 0.01 was chosen on 24 mp20_val crystals at D = 10 A (screened top-1 9 -> 12 loose matches,
    top-10 17 -> 20). When the pattern holds too few observations to fit the structure (the "volume" structure
    fit below) the price is ``broad_prior_price`` instead: there the data decide less and the prior more. 0.15
    was chosen on 100 mp20_val crystals at D = 10 A (seed 0, stored runs re-ranked; rank-1 strict matches 59 %
    at 0.01, 63 % at 0.04, 65 % at 0.05, 67 % at 0.15-0.3, 58 % at 1; docs/solver.md, session 13).

    ``rank_by`` is what orders the refined candidates: "rwp" (the priced Rwp of the Rietveld refinement), "fit"
    (the priced screening residual: every candidate fitted with the same fixed instrument, crystallite size,
    displacement and a 4-term background), "both" (the geometric mean of the two) or "auto": "fit" when the
    pattern holds fewer than ``rwp_ranking_observations`` independent observations
    (:func:`independent_observations`); else "both" when an exact crystallite shape is stated
    (``crystallite_shape`` sphere or cube), "rwp" otherwise. The Rietveld refinement models size broadening
    with the Lorentzian only, so on a pattern of a stated exact shape its Rwp carries a profile misfit that
    differs from candidate to candidate, while the screening fit has the right profile but fixed profile and
    displacement parameters; each misorders some candidates the other orders right. Measured on stored runs
    (session 12, docs/solver.md): PXRDnet protocol at 100 A, 200 materials, rank-1 loose / strict matches
    85.0 / 81.0 % by Rwp, 85.0 / 82.0 % by fit, 86.5 / 83.0 % by both; MP-20 protocol, 161 materials, 81.4 /
    76.4, 83.2 / 80.1 and 83.2 / 79.5 %. A
    Rietveld model has some 15-25 profile, background and structural parameters; when the pattern has fewer than
    about two independent observations per parameter (crystallites of 10 angstrom: 24 observations, the peaks
    are humps 0.6 1/angstrom wide) they fit the humps of a wrong candidate about as well as those of the right
    one, and Rwp no longer tells them apart, while the restrained fit still does. The threshold 40 is that
    argument, checked at both ends only (10 angstrom: restrained fit far better; 100 angstrom, 240: Rwp as good
    or better; measured Rb2S at 55: Rwp right, restrained fit wrong); see docs/solver.md.

    ``crystallite_shape`` is the size-broadening model of the screening fit
    (:data:`xtalsolve.physics.powder.CRYSTALLITE_SHAPES`): the Lorentzian of Rietveld practice, or the exact
    profile of spheres or cubes of one size; the Rietveld refinement always uses the Lorentzian.

    ``fit_structure``: what the screening fit and the refinement may change in a candidate: "full" (cell and
    atom coordinates in its space group) or "volume" (an isotropic scaling of the cell; coordinates and cell
    shape kept as drawn, scale, background and profile fitted); "auto": "volume" when a crystallite size is
    given (``size_hint_A``, else estimated from the pattern's own coherence length, :func:`coherence_length`)
    and the pattern then holds fewer than ``rwp_ranking_observations`` independent observations, else "full".
    The argument of the ranking basis again: with some 24 independent observations (10 angstrom crystallites)
    a cell's shape and the coordinates fit the humps' details, and a prototype's geometry, taken from a real
    crystal, is the better estimate. Measured on the PXRDnet protocol at 10 A:
    candidates that matched the truth as drawn (rms 0.01-0.05) no longer matched after the full fit, and ranked
    by the screening fit the strict matches came first far more often with the volume fit (docs/solver.md).

    ``fit_nuisances``: the screening fit also tries, per candidate, an overall displacement parameter B
    (:data:`BISO_TRIALS`) and, on a max-pooled pattern, a zero offset of one sub-point either way, in place of the
    fixed B = 0.5 angstrom^2 and zero offset (:func:`pattern_loss`). It brings the true crystal's residual on a
    PXRDnet-protocol pattern (B = 0, peaks moved by +0.002 1/angstrom) down to the noise, 0.002 from 0.010, but
    wrong candidates gain too; off by default until it ranks better (docs/solver.md, session 15).

    ``restart_top``, ``restarts``, ``restart_within``: the screening fit of a crystal is multimodal (a
    prototype's cell can be 20 % off the compound's, and the prescan's random trial cells decide which minimum the
    descent ends in): the FeAs2 candidate of the Rb2O type of Pnnm reaches the truth's residual in 11 of 16 fits
    that differ only in the prescan's random numbers, and the one fit of the screen was among the 5 that did not.
    So the ``restart_top`` best distinct screened candidates whose score is within ``restart_within`` times the
    best one's are fitted ``restarts`` more times each from their draws, with other random trial cells, and keep
    their best fit. Full structure fit only (a volume fit scans its one parameter nearly exhaustively). Measured
    on the 13 of the PXRDnet protocol's 24 strict @10 misses at 100 A whose type is in the library (stored runs
    re-fitted offline, ranked by the screen): 3 solved at rank 1 with 8 x 3 restarts (FeAs2, BiI3, BaO6), the
    rescued candidates within 1.85 times the best score; see docs/solver.md, session 16.

    ``scan_top``, ``scan_max_free``, ``scan_max_atoms``, ``scan_trials``, ``scan_keep``: after the restarts, the
    ``scan_top`` best distinct screened candidates (within ``restart_within`` of the best score) that have 1 to
    ``scan_max_free`` free coordinates in their space group and at most ``scan_max_atoms`` atoms in their
    primitive cell get a direct-space search of their coordinates, their fitted cell kept (primitive):
    ``scan_trials`` random placements within the group (:func:`xtalsolve.polish.scan_coordinates`), the
    ``scan_keep`` best distinct ones fitted. The scan proposes and Rietveld decides: the candidate keeps its
    fit, and the best scanned fit that is another crystal and beats it by more than :data:`SCAN_LIST` is listed as
    a candidate of its own, with, when it beats it by more than :data:`SCAN_GAIN`, the next other crystal too;
    both are refined beside the ``refine_top``. On measured patterns the sharp screening residual can prefer a
    placement that Rietveld rejects (Rb2S, Al2O3; docs/solver.md, session 22). Descents from a drawn
    prototype stop in the nearest minimum: ZnGaPS in the
    NaCNO type of R3m kept P a third of the polar axis from where it belongs in every start. Full structure fit
    only; ``scan_top`` 0: none (docs/solver.md, session 22).

    ``second_pass_r_bragg``, ``second_pass_samples``: when :func:`solve` is given a second-pass generator (the
    guided diffusion model behind the structure-type library) and the rank-1 candidate of the first pass refines
    to a Bragg R-factor above ``second_pass_r_bragg``, ``second_pass_samples`` more candidates are drawn from it
    for the best-fitting Z trials (2:1 over the best two) and screened, restarted, scanned and refined as a pass
    of their own; all are ranked together, except that a second-pass candidate must beat the first pass's rank 1
    by 10 % of its ranking value (:data:`SECOND_PASS_MARGIN`) to rank among the first pass's: in a near tie a
    lower-symmetry crystal of the model can fit a little better than the library's right one (PXRDnet protocol
    at 100 A, session 26: three rank-1 matches lost so, the model's candidates within 2-6 % of the library's),
    while the model's right rank-1 candidates beat the library's rank 1 by 17-72 % (:func:`ranked_refined`). A
    crystal of no library type leaves every library candidate a poor structure model; this is the
    crystallographer's "try harder when nothing fits", which reaches such crystals without paying for the model
    on every pattern. R_Bragg compares the integrated intensities, so unlike Rwp and GoF it does not carry the
    profile's and the background's misfit: a correct structure model gives some 2-10 % (Rietveld practice), while
    GoF is near 1 for a right model on measured data, 9-24 at 100 A and 36-87 at 10 A for right ones on the
    noise-free PXRDnet-protocol patterns, and 9.7 for anatase fitted to a rutile pattern of 10^4 counts. Full
    structure fits only (``fit_structure``): on patterns too broad for one (10 A crystallites) the guided
    model's crystals, drawn to fit the humps, fit them about as well as the right one (R_Bragg 3-7 %), and on the
    first 100 PXRDnet materials at 10 A the pass lost 2 strict rank-1 matches and gained 1 @10 (session 26).
    0 or None: never."""

    samples: int = 32
    max_trials: int = 5
    seed: int = 0
    max_atoms: int = 20
    natoms: int | None = None
    refine_max_nfev: int = 15
    polish_steps: int = 80
    refine_top: int = 3
    symprec: float = 0.1
    size_hint_A: float | None = None
    abandon_factor: float = 2.0
    parameter_price: float = 0.01
    prior_price: float = 0.01
    broad_prior_price: float = 0.15
    rank_by: str = "auto"
    rwp_ranking_observations: float = 40.0
    crystallite_shape: str = "lorentzian"
    fit_structure: str = "auto"
    fit_nuisances: bool = False
    restart_top: int = 8
    restarts: int = 3
    restart_within: float = 2.0
    scan_top: int = 4
    scan_max_free: int = 6
    scan_max_atoms: int = 10
    scan_trials: int = 4096
    scan_keep: int = 6
    second_pass_r_bragg: float | None = 0.10
    second_pass_samples: int = 32

    def __post_init__(self):
        from xtalsolve.physics.powder import check_shape

        if self.rank_by not in RANK_BY:
            raise XtalsolveError(f"unknown ranking {self.rank_by!r}; choose from {', '.join(RANK_BY)}", "--rank-by")
        if self.fit_structure not in FIT_STRUCTURE:
            raise XtalsolveError(f"unknown structure fit {self.fit_structure!r}; choose from "
                                 f"{', '.join(FIT_STRUCTURE)}", "--fit-structure")
        check_shape(self.crystallite_shape)
        if self.refine_top < 1:
            raise XtalsolveError(f"at least one candidate must be refined, not {self.refine_top}", "--refine")
        if min(self.scan_top, self.scan_max_free, self.scan_trials, self.scan_keep) < 0:
            raise XtalsolveError("the coordinate scan's settings must be >= 0", "--scan")
        if self.restarts < 0 or self.restart_top < 0:
            raise XtalsolveError(f"restarts must be >= 0, not {min(self.restarts, self.restart_top)}", "--restarts")
        if (self.second_pass_r_bragg or 0) < 0 or self.second_pass_samples < 1:
            raise XtalsolveError("the second pass needs an R_Bragg threshold >= 0 and at least one sample",
                                 "--second-pass-r-bragg")


def shipped_checkpoint() -> Path:
    """The diffusion model trained by this project and shipped with the package (resources/models, with its
    model card README.md)."""
    from importlib import resources

    return Path(str(resources.files("xtalsolve.resources").joinpath("models/gpu_mp20_ft.pt")))


def diffusion_generator(checkpoint: str | Path, pattern: Pattern, n_steps: int = 100, guided: bool = True,
                        cfg_scale: float = 1.0, size_hint_A: float | None = None) -> Generator:
    """Candidates from the trained diffusion model, conditioned on ``pattern`` and (``guided``) steered by it at
    every reverse step through the differentiable forward model."""
    from xtalsolve.data.augment import Augmentation, model_input
    from xtalsolve.diffusion.guidance import DataGuidance
    from xtalsolve.diffusion.sampler import generate_structures
    from xtalsolve.diffusion.train import load_model

    model = load_model(checkpoint)
    observed, mask = model_input(pattern, Augmentation())

    def generate(cell: Composition, n: int, seed: int, skip: int = 0) -> list[Structure]:
        guidance = DataGuidance(pattern_loss(pattern, size_hint_A)) if guided else None
        out = generate_structures(model, [cell] * n, n_steps, pattern=observed.expand(n, -1),
                                  mask=mask.expand(n, -1), cfg_scale=cfg_scale, guidance=guidance, seed=seed)
        for structure in out:
            structure.properties["origin"] = "diffusion model" + (" with data guidance" if guided else "")
        return out

    return generate


def lazy_generator(build: Callable[[], Generator]) -> Generator:
    """A generator that is built on its first draw (e.g. a model loaded only when a second pass needs it)."""
    made: list[Generator] = []

    def generate(cell: Composition, n: int, seed: int, skip: int = 0) -> list[Structure]:
        if not made:
            made.append(build())
        return made[0](cell, n, seed, skip=skip)

    return generate


def mixed_generator(parts: Sequence[tuple[Generator, float]]) -> Generator:
    """Candidates from several generators at once: ``n`` is split by each part's share (largest remainders,
    ties to the earlier part), and each part draws with its own seed offset. E.g. half from the diffusion
    model and half random symmetric crystals (:func:`xtalsolve.symmetric.symmetric_generator`)."""
    shares = np.array([share for _, share in parts], dtype=float)
    if not len(parts) or (shares < 0).any() or shares.sum() <= 0:
        raise XtalsolveError("a mixed generator needs parts with non-negative shares, not all zero")
    shares = shares / shares.sum()

    def generate(cell: Composition, n: int, seed: int, skip: int = 0) -> list[Structure]:
        exact = shares * n
        counts = np.floor(exact).astype(int)
        for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
            counts[i] += 1
        out: list[Structure] = []
        for k, ((part, _), count) in enumerate(zip(parts, counts)):
            if count:
                drawn = part(cell, int(count), seed + 7919 * k, skip=int(round(skip * shares[k])))
                for structure in drawn:
                    structure.properties["part"] = k  # which generator: each has a candidate refined (solve)
                out.extend(drawn)
        return out

    return generate


GENERATORS = ("prototype", "symmetric", "diffusion", "both", "prototype+diffusion")
FILLS = ("symmetric", "diffusion", "both")  # what the prototype generator draws once its library runs out


def make_generator(kind: str, checkpoint: str | Path, pattern: Pattern, n_steps: int = 100, guided: bool = True,
                   size_hint_A: float | None = None, library: str = DEFAULT_LIBRARY, fill: str = "symmetric"
                   ) -> Generator:
    """The solver's candidate source by name: "prototype" (structure types of training crystals in the prototype
    ``library`` with the elements substituted, then, once the library runs out for a cell, candidates of the
    ``fill`` kind), "diffusion" (the guided model), "symmetric" (random crystals in space groups drawn from the
    training prior), "both" (half diffusion, half symmetric) or "prototype+diffusion" (half library, half guided
    model: the model reaches structure types that no library holds, at the price of its sampling)."""
    from xtalsolve.prototypes import prototype_generator
    from xtalsolve.symmetric import symmetric_generator

    if kind not in GENERATORS:
        raise XtalsolveError(f"unknown generator {kind!r}; choose from {', '.join(GENERATORS)}", "--generator")
    if fill not in FILLS:
        raise XtalsolveError(f"unknown fill {fill!r}; choose from {', '.join(FILLS)}", "--fill")
    if kind == "symmetric":
        return symmetric_generator()
    if kind == "prototype":
        return prototype_generator(library_name=library, fill=None if fill == "symmetric" else
                                   make_generator(fill, checkpoint, pattern, n_steps, guided, size_hint_A))
    model = diffusion_generator(checkpoint, pattern, n_steps, guided, size_hint_A=size_hint_A)
    if kind == "prototype+diffusion":
        library_part = make_generator("prototype", checkpoint, pattern, n_steps, guided, size_hint_A, library, fill)
        return mixed_generator([(library_part, 0.5), (model, 0.5)])
    return model if kind == "diffusion" else mixed_generator([(model, 0.5), (symmetric_generator(), 0.5)])


def explore_then_exploit(trials: Sequence[CellTrial], samples: int, explore: float = 0.5
                         ) -> tuple[list[tuple[CellTrial, int]], Callable[[dict[int, float]], list[tuple[CellTrial, int]]]]:
    """Z by trial sampling: the first round spreads ``explore`` of the samples evenly over the trials (at least
    two each: the composition prior alone is weak, e.g. it puts rock salt's one-formula-unit cell fifth); the
    second round, given each trial's best fit residual, gives the rest to the two best-fitting trials (2:1).
    Returns the first round and the function that makes the second."""
    first = max(2, round(samples * explore / max(len(trials), 1)))
    round1 = [(t, first) for t in trials]
    rest = max(0, samples - first * len(trials))

    def round2(best_residual: dict[int, float]) -> list[tuple[CellTrial, int]]:
        return best_two(trials, best_residual, rest) if rest else []

    return round1, round2


def best_two(trials: Sequence[CellTrial], best_residual: dict[int, float], n: int) -> list[tuple[CellTrial, int]]:
    """``n`` samples for the two trials whose candidates fit best (2:1; all to the best when ``n`` < 3); trials
    without a fitted candidate get none."""
    ranked = sorted((t for t in trials if t.z in best_residual), key=lambda t: best_residual[t.z])
    if not ranked:
        return []
    second = n // 3 if len(ranked) > 1 else 0
    return [(ranked[0], n - second)] + ([(ranked[1], second)] if second else [])


def pattern_loss(pattern: Pattern, size_A: float | None = None, shape: str = "lorentzian",
                 fit_nuisances: bool = False):
    """The mismatch the candidates are fitted and ranked by: the pattern on the model's Q grid (normalised,
    masked outside the measured range) against the forward model with free scale and background; crystallite
    size ``size_A`` (angstrom) or fitted per candidate; size-broadening model ``shape``
    (:data:`xtalsolve.physics.powder.CRYSTALLITE_SHAPES`). A max-pooled pattern (``Pattern.max_pool`` > 1) is
    compared on its own uniform Q grid, in the model's Q window, with the calculated pattern pooled alike:
    interpolating it onto another grid would blend the pooling into a shape no forward model reproduces.
    ``fit_nuisances``: each candidate's residual is the best over an overall displacement parameter B of 0, 0.5
    and 1 angstrom^2 and, on a max-pooled pattern, a zero offset of -1, 0 or +1 sub-point
    (:class:`~xtalsolve.diffusion.guidance.PatternLoss` ``biso_trials``, ``shift_trials``)."""
    import torch

    from xtalsolve.data.augment import Augmentation, model_input
    from xtalsolve.diffusion.guidance import PatternLoss
    from xtalsolve.refine import instrument_of

    aug = Augmentation()
    trials = BISO_TRIALS if fit_nuisances else None
    if pattern.max_pool == 1:
        observed, mask = model_input(pattern, aug)
        return PatternLoss(aug.grid, observed.double(), mask, instrument=instrument_of(pattern), size=size_A,
                           shape=shape, biso_trials=trials)
    q = pattern.q
    steps = np.diff(q)
    if len(q) < 2 or np.ptp(steps) > 1e-6 * steps.mean():
        raise XtalsolveError("a max-pooled pattern must be on a uniform Q grid", pattern.source)
    mask = (q >= float(aug.grid[0])) & (q <= float(aug.grid[-1]))
    if mask.sum() < 2:
        raise XtalsolveError(f"the pattern has no points in Q {float(aug.grid[0]):g}-{float(aug.grid[-1]):g} "
                             "1/angstrom", pattern.source)
    y = pattern.y[mask] - pattern.y[mask].min()
    observed = torch.as_tensor(y / max(float(y.max()), 1e-30), dtype=torch.float64)
    return PatternLoss(torch.as_tensor(q[mask]), observed, torch.ones(int(mask.sum()), dtype=torch.bool),
                       instrument=instrument_of(pattern), size=size_A, shape=shape, pool=pattern.max_pool,
                       biso_trials=trials, shift_trials=int(fit_nuisances))


SAME_CRYSTAL = {"ltol": 0.1, "stol": 0.15, "angle_tol": 3}
"""pymatgen StructureMatcher tolerances (half its defaults) at which two fits to one pattern are the same crystal
(:func:`repeats`, :func:`species_swap`)."""

SWAP_MAX_DZ = 2
"""Species whose atomic numbers differ by at most this scatter X-rays almost alike (Zn/Ga, Al/Si, P/S): a
candidate that is rank 1 with two of them swapped is named in the summary's ``cautions``."""


def species_swap(reference: Structure, other: Structure, max_dz: int = SWAP_MAX_DZ) -> tuple[str, str] | None:
    """The pair of elements of ``reference`` whose atomic numbers differ by at most ``max_dz`` and whose swap
    makes it ``other`` (pymatgen StructureMatcher at half its default tolerances, as :func:`repeats`: at the
    defaults a crystal with its atoms on one axis matches swaps it is not), else None: for X-rays the two are
    nearly the same crystal, and the pattern hardly decides between them (ZnGaPS of the PXRDnet benchmark: P and S
    swapped fits its pattern better than the truth; docs/solver.md, session 22)."""
    from itertools import combinations

    from pymatgen.analysis.structure_matcher import StructureMatcher

    matcher = StructureMatcher(**SAME_CRYSTAL)
    elements = sorted(reference.composition.elements, key=lambda e: e.Z)
    for a, b in combinations(elements, 2):
        if abs(a.Z - b.Z) <= max_dz:
            swapped = reference.copy()
            swapped.replace_species({a: b, b: a})
            if matcher.fit(swapped, other):
                return str(a), str(b)
    return None


def repeats(structures: Sequence[Structure | None], residuals: Sequence[float] | None = None) -> list[int | None]:
    """For each structure, the index of the first earlier one that is the same crystal (pymatgen StructureMatcher
    at half its default tolerances: ltol 0.1, stol 0.15, angle 3 degrees), else None: a ranked list keeps only the
    first of each, so that the same solution reached from several candidates does not fill the places of
    different ones. Tighter than the defaults because sameness is not transitive: at the defaults a candidate
    that matches the true structure can be judged the same as an earlier one that does not.

    All are fitted to one pattern, so one crystal has one cell volume (its peak positions) and about one fit
    residual: pairs whose volumes per atom differ by more than 5 %, or (``residuals`` given) whose residuals
    differ by more than a factor 1.3, are not compared (StructureMatcher costs milliseconds per pair; 32
    candidates of 20 atoms took 20-30 s to compare all). A ``None`` (a candidate whose CIF does not read back,
    e.g. two atoms refined onto one site) repeats nothing and is repeated by nothing."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    matcher = StructureMatcher(**SAME_CRYSTAL, primitive_cell=False)  # primitive cells found once
    structures = [None if st is None else st.get_primitive_structure() for st in structures]
    volume = [np.nan if st is None else st.volume / len(st) for st in structures]
    misfit = list(residuals) if residuals is not None else [1.0] * len(structures)

    def close(i: int, k: int) -> bool:
        return (structures[i] is not None and structures[k] is not None
                and abs(volume[i] - volume[k]) <= 0.05 * max(volume[i], volume[k])
                and max(misfit[i], misfit[k]) <= 1.3 * max(min(misfit[i], misfit[k]), 1e-12))

    kept: list[int] = []
    out: list[int | None] = []
    for i, structure in enumerate(structures):
        same = next((k for k in kept if close(i, k) and matcher.fit(structure, structures[k])), None)
        out.append(same)
        if same is None:
            kept.append(i)
    return out


def _read_cif(text: str) -> Structure | None:
    """The structure of a candidate's CIF text, or None when pymatgen cannot build one from it (two atoms refined
    onto one site leave a CIF that its parser rejects)."""
    try:
        return Structure.from_str(text, fmt="cif")
    except Exception:  # noqa: BLE001 - pymatgen raises ValueError, KeyError or IndexError on such files
        return None


def refinement_choice(screened: Sequence[dict], n: int) -> list[dict]:
    """The screened candidates (best first) to refine: the first ``n`` distinct ones and, when they come from the
    parts of a mixed generator (record "part"), the best distinct one of each part that has none among them.
    The screening fit misorders crystals that Rietveld tells apart, and one source's near misses can fill the
    ``n`` places: for PXRDnet's FeCu6GeS8 at 100 A the guided model's right crystal screens at 0.0239 and refines
    to Rwp 10.9 %, while library types screen better (0.0199-0.0214) and refine worse (12.3 % and up), so with
    half the candidates from each only library ones were refined (docs/solver.md, session 24)."""
    chosen = distinct(screened, n)
    for part in sorted({r["part"] for r in screened if r.get("part") is not None}):
        if all(r.get("part") != part for r in chosen):
            chosen = distinct(chosen + [r for r in screened if r.get("part") == part], len(chosen) + 1)
    return chosen


def distinct(records: Sequence[dict], n: int) -> list[dict]:
    """The first ``n`` records (best first) whose fitted structures are pairwise different crystals
    (pymatgen StructureMatcher, default tolerances): refining the same solution twice wastes the budget."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    matcher = StructureMatcher()
    chosen, structures = [], []
    for record in records:
        if len(chosen) == n:
            break
        structure = _read_cif(record["screen_cif"])
        if structure is None or any(matcher.fit(structure, other) for other in structures):
            continue
        chosen.append(record)
        structures.append(structure)
    return chosen


SMALL_CELL = 4
"""Cells of up to this many atoms are always among the trials of Z."""

SECOND_PASS = -1
"""The ``part`` of the candidates a second pass draws (:class:`SolveSettings` ``second_pass_r_bragg``)."""
SECOND_PASS_MARGIN = 0.9
"""A second-pass candidate must beat the first pass's rank 1 by this factor on the ranking value (priced Rwp, fit
or both) to rank among the first pass's candidates (:func:`ranked_refined`)."""

SCAN_CHILD = 1000
"""Index offset of the candidates that a coordinate scan adds beside the one it searched: k x 1000 + its index
for the k-th (k = 1: the scan's best other crystal, k = 2: the next one)."""

SCAN_LIST = 0.99
"""A scanned fit that is another crystal is listed only when its residual is below this factor times the
candidate's own (a gain within the fit's run-to-run spread is not worth a refinement)."""

SCAN_GAIN = 0.95
"""A scan whose best other crystal beats the candidate's fit by more than this factor found the screen stuck in a
false minimum; only then is the next other crystal listed too (near ties such as species swaps)."""

RAISE_SYMPREC = (0.05, 0.1, 0.2)
"""Tolerances (angstrom) of the search for missed symmetry in a refined candidate: the highest point group found
at any of them is tried (at the smallest tolerance that finds it) and kept only if the data agree."""


class CandidateAbandoned(Exception):
    """Raised from the progress hook to stop refining a candidate that cannot win; carries the stage record."""

    def __init__(self, record: dict):
        super().__init__(record["stage"])
        self.record = {"stage": record["stage"], "rwp": float(record["rwp"])}


def refine_candidate(pattern: Pattern, structure: Structure, instrument, settings: SolveSettings,
                     best_rwp: float = np.inf, options: dict | None = None, fit: str = "full"):
    """Rietveld refinement of one screened candidate, symmetry found at ``settings.symprec`` (angstrom); then, as
    a crystallographer checks for missed symmetry, the refined crystal is searched again (at the tolerances
    ``RAISE_SYMPREC``) and re-refined in the higher group when one is found and fits as well (within 2 % of
    Rwp). ``fit`` "volume": no lattice and no positions stage (see ``SolveSettings.fit_structure``). Raises
    :class:`CandidateAbandoned` when the Rwp after the profile stage exceeds ``settings.abandon_factor *
    best_rwp``."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    from xtalsolve.refine import refine
    from xtalsolve.refine.recipe import STAGES

    def watch(stage: dict) -> None:
        if stage["stage"] == "profile" and stage["rwp"] > settings.abandon_factor * best_rwp:
            raise CandidateAbandoned(stage)

    options = options or {}
    stages = STAGES if fit == "full" else tuple(stage for stage in STAGES  # the screened geometry kept
                                                 if stage[0] not in ("lattice+zero", "positions"))
    # early_biso off: the candidates' cells already come from a fit to this pattern, and a second start of the cell
    # stage gained 2 of 200 rank-1 matches at 100 A and none at 10 A on the PXRDnet protocol for several seconds
    # per material (benchmarks/results/pxrdnet_protocol_s2*_early_b*.json)
    kwargs = dict(max_nfev=settings.refine_max_nfev, scan=False, orientations=False, early_biso=False,
                  stages=stages, **options)
    result = refine(pattern, structure, instrument, symprec=settings.symprec, progress=watch, **kwargs)

    def point_group_order(s: Structure, symprec: float) -> int:
        try:
            return len(SpacegroupAnalyzer(s, symprec=symprec).get_point_group_operations())
        except Exception:  # noqa: BLE001 - spglib can fail on odd cells: then there is nothing to raise
            return 0

    for _ in range(3):  # each refinement in a higher group can reveal more symmetry (P1 -> Pm -> P4_2/mnm)
        current = point_group_order(result.structure, 1e-4)
        orders = {tol: point_group_order(result.structure, tol) for tol in RAISE_SYMPREC}
        highest = max(orders.values())
        if highest <= current:
            break
        tolerance = min(tol for tol, order in orders.items() if order == highest)
        try:
            again = refine(pattern, result.structure, instrument, symprec=tolerance, **kwargs)
        except Exception:  # noqa: BLE001 - keep the lower-symmetry result
            break
        if again.rwp > 1.02 * result.rwp:  # the data refuse the higher group
            break
        again.seconds += result.seconds
        result = again
    return result


def contact_check(structure: Structure, factor: float = 0.6) -> tuple[float, bool]:
    """The shortest interatomic distance (angstrom, periodic images included) and whether the geometry is
    plausible: False when two atoms are closer than ``factor`` times the sum of their atomic radii (pymatgen's
    empirical radii; e.g. O-H 0.51, C-C 0.84, Si-O 1.02, Ti-Ti 1.68 angstrom against real contacts of 0.96,
    1.42, 1.61 and 2.86). Overlapping atoms can act as one heavier atom and fit the pattern, but such a
    candidate is not a crystal, so it is ranked after every plausible one."""
    shortest_cell_edge = float(min(structure.lattice.abc))
    if len(structure) < 2:
        return shortest_cell_edge, True
    radii = np.array([float(site.specie.atomic_radius or 1.0) for site in structure])
    distances = structure.distance_matrix + np.diag([np.inf] * len(structure))
    plausible = bool(np.all(distances >= factor * (radii[:, None] + radii[None, :])))
    return float(min(distances.min(), shortest_cell_edge)), plausible


def parsimonious(misfit: float, free_parameters: int, price: float) -> float:
    """A misfit (residual or Rwp) raised by ``price`` per free structural parameter (see SolveSettings)."""
    return misfit * (1.0 + price * free_parameters)


def independent_observations(q_min: float, q_max: float, size_A: float) -> float:
    """Shannon's number of independent observations in a powder pattern measured from ``q_min`` to ``q_max``
    (1/angstrom) on crystallites of ``size_A`` angstrom: the pattern is the Fourier transform of pair
    correlations that end at the particle size, so it is sampled fully by points pi / size_A apart (as for a
    PDF, Farrow & Billinge, Acta Cryst. A 65, 232 (2009)). About 24 for 10 angstrom crystallites over
    0.5-8 1/angstrom, 240 for 100 angstrom."""
    return max(float(q_max) - float(q_min), 0.0) * float(size_A) / np.pi


def coherence_length(q: np.ndarray, intensity: np.ndarray, floor: float = 0.1, r_max: float = 200.0) -> float:
    """Crystallite size estimate (angstrom) from a powder pattern alone, no structure needed: the distance at
    which the pattern's pair correlations die out. The pattern (``intensity`` on an even grid ``q``, 1/angstrom)
    less a smooth quartic background, weighted by Q and a Hann window, is sine-transformed to r (a reduced PDF up
    to normalisation); the answer is the first r beyond 2 angstrom where its envelope (running maximum over 8
    angstrom) falls below ``floor`` of its largest value, at most ``r_max``. Measured on PXRDnet-style patterns
    of 40 crystals (sinc-broadened cubes; docs/solver.md): 10 angstrom -> 10.5-14.2, 30 -> 22-32, 100 -> 60-85;
    an underestimate of large sizes, which matters only to tell very small crystallites from the rest."""
    from scipy.ndimage import maximum_filter1d

    q = np.asarray(q, dtype=float)
    y = np.asarray(intensity, dtype=float)
    background = np.polynomial.polynomial.polyfit(q, y, 4)
    f = q * (y - np.polynomial.polynomial.polyval(q, background)) * np.hanning(len(q))
    r = np.arange(1.0, r_max, 0.25)
    envelope = maximum_filter1d(np.abs(np.sin(r[:, None] * q[None, :]) @ f), size=32)  # 4 angstrom either side
    beyond = (r > 2.0) & (envelope < floor * envelope[r > 2.0].max())
    return float(r[beyond.argmax()]) if beyond.any() else float(r_max)


def estimated_size(loss) -> float:
    """:func:`coherence_length` of the measured pattern of ``loss`` (a :func:`pattern_loss`), angstrom."""
    import torch

    mask = torch.as_tensor(loss.mask).bool().reshape(-1).numpy()
    return coherence_length(loss.grid.numpy()[mask], torch.as_tensor(loss.observed).reshape(-1).numpy()[mask])


def ranking_basis(settings: SolveSettings, observations: float) -> str:
    """"rwp", "fit" or "both": what orders the refined candidates (see :class:`SolveSettings`)."""
    if settings.rank_by != "auto":
        return settings.rank_by
    if observations < settings.rwp_ranking_observations:
        return "fit"
    return "rwp" if settings.crystallite_shape == "lorentzian" else "both"


def structure_fit(settings: SolveSettings, loss, coherence_A: float | None = None) -> str:
    """"full" or "volume": what the fit and the refinement change in a candidate (``SolveSettings.fit_structure``);
    ``loss``: the pattern's :func:`pattern_loss` (its measured Q range); ``coherence_A``: its
    :func:`estimated_size` when already known (angstrom), used without a size hint."""
    if settings.fit_structure != "auto":
        return settings.fit_structure
    size = settings.size_hint_A or (coherence_A if coherence_A is not None else estimated_size(loss))
    enough = _observations(loss, None, size)[0] >= settings.rwp_ranking_observations
    return "full" if enough else "volume"


def _rank_key(record: dict, basis: str = "rwp") -> tuple[bool, float]:
    """Order of refined candidates: by their parameter-priced Rwp (``basis`` "rwp"), priced screening residual
    ("fit") or the geometric mean of the two ("both"), those with atoms on top of each other after every
    plausible one."""
    if basis == "both":
        value = math.sqrt(record["score"] * record["screen_score"])
    else:
        value = record["score" if basis == "rwp" else "screen_score"]
    return not record.get("plausible", True), value


def ranked_refined(records: Sequence[dict], basis: str, first_pass_best: dict | None = None) -> list[dict]:
    """The refined records in ranking order (:func:`_rank_key`). When a second pass ran, its candidates (part
    :data:`SECOND_PASS`) take places among the first pass's only if their ranking value is below
    :data:`SECOND_PASS_MARGIN` times that of the first pass's rank 1 (``first_pass_best``); in a near tie the
    structure type of a real crystal is kept, the others rank after every first-pass candidate."""
    bound = SECOND_PASS_MARGIN * _rank_key(first_pass_best, basis)[1] if first_pass_best is not None else np.inf

    def demoted(r: dict) -> bool:
        return r.get("part") == SECOND_PASS and not _rank_key(r, basis)[1] <= bound

    return sorted((r for r in records if "rwp" in r), key=lambda r: (demoted(r), _rank_key(r, basis)))


def _observations(loss, structure: Structure | None, size_A: float | None) -> tuple[float, float]:
    """(independent observations, crystallite size in angstrom) of the pattern of ``loss``: the size given, else
    the size fitted to ``structure`` (the best-screened candidate)."""
    import torch

    from xtalsolve.crystal.batch import CrystalBatch
    from xtalsolve.diffusion.guidance import fit_size

    if size_A is None:
        size_A = float(fit_size(loss, CrystalBatch.from_structures([structure], dtype=torch.float64))[0])
    q = loss.grid[torch.as_tensor(loss.mask).bool().reshape(-1)]
    return independent_observations(float(q.min()), float(q.max()), size_A), float(size_A)


def prior_price(settings: SolveSettings, fit: str) -> float:
    """Misfit share per prior rank (:class:`SolveSettings`): ``broad_prior_price`` for the "volume" structure
    fit of patterns with few observations, ``prior_price`` otherwise."""
    return settings.broad_prior_price if fit == "volume" else settings.prior_price


def _scored(record: dict, settings: SolveSettings, price: float) -> dict:
    """``record`` with the parameter-priced score of each misfit it holds (screen residual, also priced by
    ``price`` per prior rank, :func:`prior_price`; Rwp), computed afresh (a resumed run ranks by the present
    settings); the free parameters are counted from its CIF when not given (records stored by older runs lack
    them)."""
    from xtalsolve.polish import free_parameters

    prior = 1.0 + price * (record.get("prior_rank") or 0)  # screening only (see SolveSettings)
    for misfit, cif, n_key, score, factor in (
            ("screen_residual", "screen_cif", "screen_free_parameters", "screen_score", prior),
            ("rwp", "cif", "free_parameters", "score", 1.0)):
        if misfit in record:
            if n_key not in record:
                record[n_key] = free_parameters(Structure.from_str(record[cif], fmt="cif"))
            record[score] = factor * parsimonious(record[misfit], record[n_key], settings.parameter_price)
    return record


def _candidate_file(directory: Path, z: int, index: int) -> Path:
    return directory / f"z{z:02d}_{index:03d}.json"


def solve(
    pattern: Pattern,
    formula: str | Composition,
    generate: Generator,
    out_dir: str | Path,
    settings: SolveSettings = SolveSettings(),
    progress: Callable[[str], None] | None = None,
    second_pass: Generator | None = None,
) -> dict:
    """Solve ``pattern`` for ``formula`` and write the ranked, refined candidates to ``out_dir``.

    Returns the summary (also written as summary.json): formula, trials, candidates ranked by Rwp priced for
    their free parameters (``score``, see :class:`SolveSettings`) with their CIF file, Rwp, Rp, GoF, space
    group, lattice (angstrom, degrees) and free parameters, and the time taken (s).

    ``second_pass``: a generator to draw from when the first pass's rank 1 fits poorly (``SolveSettings``
    ``second_pass_r_bragg``; e.g. :func:`diffusion_generator` behind the prototype library); its candidates are
    screened, restarted, scanned and refined as a pass of their own and ranked with the first pass's.
    """
    from xtalsolve.io.structures import write_cif
    from xtalsolve.polish import PolishSettings, free_coordinates, free_parameters, polish, scan_coordinates
    from xtalsolve.refine import instrument_of
    from xtalsolve.refine.report import cif_text, plot_fit

    start = time.perf_counter()
    composition = parse_formula(formula) if isinstance(formula, str) else formula.reduced_composition
    out = Path(out_dir)
    store = out / "candidates"
    store.mkdir(parents=True, exist_ok=True)
    instrument = instrument_of(pattern)
    measured = pattern.in_two_theta()  # the refinement works in 2theta
    every = formula_unit_trials(composition, pattern, settings.max_atoms, settings.natoms)
    trials = every[: settings.max_trials]
    # the smallest cells (Z = 1 and any of up to SMALL_CELL atoms) are always tried: they are the cheapest to
    # sample and the training-set prior underweights them (MP-20 holds few 2-atom cells, so rock salt's Z = 1
    # ranks below Z = 2 ... 6, and hcp Zr's Z = 2 below 4, 6, 5, 8, 10)
    trials += [t for t in every[settings.max_trials:] if t.z == 1 or t.n_atoms <= SMALL_CELL]
    say = progress or (lambda message: None)

    options = {"size": settings.size_hint_A} if settings.size_hint_A else {}
    loss = pattern_loss(pattern, settings.size_hint_A, settings.crystallite_shape, settings.fit_nuisances)
    coherence = estimated_size(loss)
    fit = structure_fit(settings, loss, coherence)
    price = prior_price(settings, fit)
    fit_settings = PolishSettings(steps=settings.polish_steps,
                                  **({} if fit == "full" else {"lattice_only": 1.0, "isotropic": True}))
    records = []

    def keep_fit(record: dict, structure: Structure, residual: float, path: Path) -> None:
        """Set ``structure`` (residual ``residual``) as the fitted crystal of ``record``, scored, its CIF beside
        ``path``."""
        record |= {"screen_residual": residual, "screen_cif": structure.to(fmt="cif"),
                   "screen_free_parameters": free_parameters(structure)}
        _scored(record, settings, price)
        write_cif(structure, path.with_suffix(".cif"))

    def best_score_per_z() -> dict[int, float]:
        """The best screening score among the fitted candidates of each Z."""
        best: dict[int, float] = {}
        for r in records:
            if "screen_score" in r:
                best[r["z"]] = min(best.get(r["z"], np.inf), r["screen_score"])
        return best

    def screen(plan: list[tuple[CellTrial, int]], stage: int, source: Generator = generate,
               part: int | None = None) -> None:
        """Draw candidates of ``plan`` from ``source`` and fit them; every one is stored as it is screened
        (resumable). ``part``: recorded as the candidates' part (else the generator's own, if mixed)."""
        for trial, count in plan:
            first = sum(1 for r in records if r["z"] == trial.z and r["index"] < SCAN_CHILD)
            stored = [_candidate_file(store, trial.z, first + i) for i in range(count)]
            if all(path.is_file() for path in stored):  # screened in an earlier run
                records.extend(_scored(json.loads(path.read_text()), settings, price) for path in stored)
                continue
            say(f"Z = {trial.z}: drawing {count} candidates")
            structures = source(trial.composition(composition), count,
                                  settings.seed + 1000 * trial.z + 100_000 * stage, skip=first)
            say(f"Z = {trial.z}: fitting {count} candidates to the pattern")
            fitted, residuals = polish(structures, loss, fit_settings)
            for i, path in enumerate(stored):
                record = {"z": trial.z, "index": first + i, "candidate_cif": structures[i].to(fmt="cif"),
                          "prior_rank": structures[i].properties.get("prior_rank"),
                          "origin": structures[i].properties.get("origin"),
                          "part": structures[i].properties.get("part") if part is None else part}
                if np.isfinite(residuals[i]) and fitted[i].volume > 0:
                    keep_fit(record, fitted[i], float(residuals[i]), path)
                else:  # a collapsed or exploded candidate must not end the run
                    record["failed"] = "the local fit diverged"
                path.write_text(json.dumps(record))
                records.append(record)

    if len(trials) == 1:
        screen([(trials[0], settings.samples)], 0)
    else:
        round1, round2 = explore_then_exploit(trials, settings.samples)
        screen(round1, 0)
        screen(round2(best_score_per_z()), 1)
    stages, mark = {}, start

    def lap(stage: str) -> None:
        """Record the seconds since the previous lap as ``stage``."""
        nonlocal mark
        now = time.perf_counter()
        stages[stage], mark = now - mark, now

    lap("screen")

    def restart(chosen: list[dict]) -> None:
        """Fit the draws of ``chosen`` again from ``settings.restarts`` other random starts each; a record keeps
        its best fit and is marked (and stored) as restarted, so that a resumed run does not repeat it."""
        bound = settings.restart_within * chosen[0]["screen_score"]
        todo = [r for r in chosen if "restarts" not in r and r["screen_score"] <= bound]
        if not todo:
            return
        say(f"fitting the {len(todo)} best candidates again from {settings.restarts} more starts each")
        draws = [Structure.from_str(r["candidate_cif"], fmt="cif") for r in todo for _ in range(settings.restarts)]
        fitted, residuals = polish(draws, loss, fit_settings, seed=1)
        residuals = np.where(np.isfinite(residuals), residuals, np.inf).reshape(len(todo), settings.restarts)
        for k, record in enumerate(todo):
            j = int(residuals[k].argmin())
            structure = fitted[k * settings.restarts + j]
            record |= {"restarts": settings.restarts, "first_screen_residual": record["screen_residual"]}
            path = _candidate_file(store, record["z"], record["index"])
            if residuals[k, j] < record["screen_residual"] and structure.volume > 0:
                keep_fit(record, structure, float(residuals[k, j]), path)
            path.write_text(json.dumps(record))

    def scan(chosen: list[dict]) -> None:
        """Search the coordinates of ``chosen`` (cell kept) where they have few free ones; a record keeps its own
        fit, the scan's best other crystals (:data:`SCAN_LIST`, :data:`SCAN_GAIN`) become candidates of their own
        (index k x SCAN_CHILD + the record's), and the record is marked (and stored) as scanned, so that a
        resumed run does not repeat it."""
        from pymatgen.analysis.structure_matcher import StructureMatcher

        bound = settings.restart_within * chosen[0]["screen_score"]
        scan_fit = replace(fit_settings, steps=settings.polish_steps // 2, prescan_scalings=0, prescan_starts=0,
                           lattice_only=0.0, blur_start=0.0)
        matcher = StructureMatcher()
        for record in chosen:
            if "scanned" in record:
                for k in (1, 2):  # a resumed run: the candidates it listed
                    index = k * SCAN_CHILD + record["index"]
                    child = _candidate_file(store, record["z"], index)
                    if child.is_file() and not any(r["z"] == record["z"] and r["index"] == index for r in records):
                        records.append(_scored(json.loads(child.read_text()), settings, price))
                continue
            if record["screen_score"] > bound:
                continue
            own = Structure.from_str(record["screen_cif"], fmt="cif")
            structure = own.get_primitive_structure()
            free = free_coordinates(structure)
            record["scanned"] = {"free_coordinates": free}
            if 1 <= free <= settings.scan_max_free and len(structure) <= settings.scan_max_atoms:
                say(f"Z = {record['z']}: searching the {free} free coordinates of candidate {record['index'] + 1}")
                picks = scan_coordinates(structure, loss, settings.scan_trials, settings.scan_keep, settings.seed)
                fitted, residuals = polish(picks, loss, scan_fit)
                first = record["screen_residual"]
                new = [j for j in np.argsort(residuals) if np.isfinite(residuals[j]) and fitted[j].volume > 0
                       and not matcher.fit(fitted[j], own)]  # other crystals than the candidate's own fit
                listed = new[:1] if new and residuals[new[0]] < SCAN_LIST * first else []
                if listed and residuals[listed[0]] < SCAN_GAIN * first:  # the fit was stuck: the next one too
                    listed += [j for j in new[1:] if not matcher.fit(fitted[j], fitted[listed[0]])][:1]
                finite = residuals[np.isfinite(residuals)]
                record["scanned"] |= {"best_residual": float(finite.min()) if len(finite) else None,
                                      "first_screen_residual": first, "listed": len(listed)}
                for k, j in enumerate(listed, 1):
                    index = k * SCAN_CHILD + record["index"]
                    child = {"z": record["z"], "index": index, "candidate_cif": record["candidate_cif"],
                             "prior_rank": record.get("prior_rank"), "part": record.get("part"),
                             "origin": f"{record.get('origin') or 'candidate'}; coordinate scan, "
                                       f"{('best', 'second')[k - 1]}",
                             "scanned": {"child_of": record["index"]}}
                    path = _candidate_file(store, record["z"], index)
                    keep_fit(child, fitted[j], float(residuals[j]), path)
                    path.write_text(json.dumps(child))
                    records.append(child)
            _candidate_file(store, record["z"], record["index"]).write_text(json.dumps(record))

    def by_screen() -> list[dict]:
        return sorted((r for r in records if "screen_residual" in r), key=lambda r: r["screen_score"])

    screened = by_screen()
    if not screened:
        raise XtalsolveError(f"no candidate could be fitted to the pattern (reasons in {store})", pattern.source)
    # the ranking basis from the best screened candidate of the first pass (the second pass is ranked alike)
    observations, size = _observations(loss, Structure.from_str(screened[0]["screen_cif"], fmt="cif"),
                                       settings.size_hint_A)
    basis = ranking_basis(settings, observations)
    results = {}  # id(record) -> its refinement in this run, for the fit plot of rank 1

    def search_and_refine(part: int | None = None, suffix: str = "") -> None:
        """Restarts, coordinate scan and Rietveld refinement of the best screened candidates of one pass (records
        of ``part``); each step skips what is already done, so a resumed run repeats nothing."""

        def pool() -> list[dict]:
            return [r for r in by_screen() if part is None or r.get("part") == part]

        if fit == "full" and settings.restarts > 0 and settings.restart_top > 0:
            restart(distinct(pool(), settings.restart_top))
        lap("restarts" + suffix)
        if fit == "full" and settings.scan_top > 0 and settings.scan_trials > 0 and settings.scan_keep > 0:
            scan(distinct(pool(), settings.scan_top))
        lap("coordinate scan" + suffix)
        # full Rietveld for the best screened candidates (kept on disk too, so a resumed run skips them)
        screened = pool()
        best_rwp = min((r["rwp"] for r in records if "rwp" in r), default=np.inf)
        proposed = sum(1 for r in screened if "child_of" in r.get("scanned", {}))  # the scan's: refined beside the top
        for record in refinement_choice(screened, settings.refine_top + proposed):
            path = _candidate_file(store, record["z"], record["index"])
            if "rwp" in record or "refine_failed" in record or "abandoned" in record:
                continue
            say(f"Z = {record['z']}: refining candidate {record['index'] + 1} "
                f"(fit residual {record['screen_residual']:.4f})")
            try:
                result = refine_candidate(measured, Structure.from_str(record["screen_cif"], fmt="cif"), instrument,
                                          settings, best_rwp, options, fit)
            except CandidateAbandoned as stop:
                record["abandoned"] = stop.record
                say(f"Z = {record['z']}: candidate {record['index'] + 1} abandoned (Rwp {stop.record['rwp']:.2%} "
                    f"after the {stop.record['stage']} stage, more than {settings.abandon_factor:g} x the best "
                    f"{best_rwp:.2%})")
            except Exception as err:  # noqa: BLE001 - keep the screened result
                record["refine_failed"] = f"{type(err).__name__}: {err}"
            else:
                record |= {"rwp": result.rwp, "rp": result.rp, "gof": result.gof, "r_bragg": result.r_bragg,
                           "space_group": result.space_group,
                           "lattice": dict(zip(("a", "b", "c", "alpha", "beta", "gamma"), map(float, result.cell))),
                           "cif": result.structure.to(fmt="cif"), "refined_cif": cif_text(result, "rank"),
                           "free_parameters": free_parameters(result.structure),
                           **dict(zip(("min_distance_A", "plausible"), contact_check(result.structure))),
                           "seconds": round(result.seconds, 2)}
                _scored(record, settings, price)
                results[id(record)] = result
                best_rwp = min(best_rwp, result.rwp)
            path.write_text(json.dumps(record))
        lap("refinement" + suffix)

    search_and_refine()
    first_pass = ranked_refined(records, basis)
    first_r = first_pass[0].get("r_bragg") if first_pass else None
    threshold = settings.second_pass_r_bragg
    second = {"r_bragg_threshold": threshold, "rank1_r_bragg_first_pass": first_r,
              "rank1_gof_first_pass": first_pass[0]["gof"] if first_pass else None,
              "triggered": second_pass is not None and bool(threshold) and fit == "full"
              and (first_r is None or not first_r <= threshold)}
    if second_pass is not None and fit != "full":  # too few observations to tell the model's crystals apart
        second["skipped"] = "pattern too broad for a structure fit"
    if second["triggered"]:
        say((f"rank 1 is a poor structure model (R_Bragg {first_r:.1%} > {threshold:.0%})" if first_r is not None
             else "no candidate refined") + f": drawing {settings.second_pass_samples} more candidates from the "
            "second-pass generator")
        plan = best_two(trials, best_score_per_z(), settings.second_pass_samples)
        screen(plan or [(trials[0], settings.second_pass_samples)], 2, second_pass, part=SECOND_PASS)
        lap("second-pass screen")
        search_and_refine(SECOND_PASS, " (second pass)")
        second["samples"] = settings.second_pass_samples
    # the screened list: by fit, a second pass's candidates after the first pass's (those it adds to the ranked
    # list are the ones that beat it; the rest must not push the library's near misses down the list)
    ranked = ranked_refined(records, basis, first_pass[0] if first_pass else None)
    screened = sorted(by_screen(), key=lambda r: r.get("part") == SECOND_PASS)
    candidates = []
    for rank, record in enumerate(ranked, start=1):
        name = f"rank{rank:02d}.cif"
        if "refined_cif" in record:  # the engine's CIF: esd's, B, R-factors
            (out / name).write_text(record["refined_cif"].replace("data_rank", f"data_rank{rank:02d}", 1))
        else:
            write_cif(Structure.from_str(record["cif"], fmt="cif"), out / name)
        candidates.append({"rank": rank, "cif": name, **{k: record[k] for k in
                                                         ("rwp", "rp", "gof", "space_group", "lattice", "z",
                                                          "free_parameters", "score", "screen_score")},
                           "r_bragg": record.get("r_bragg"),
                           "min_distance_A": record.get("min_distance_A"), "plausible": record.get("plausible"),
                           "origin": record.get("origin")})
    best = results.get(id(ranked[0])) if ranked else None
    if best is not None:
        plot_fit(best, out / "fit.png", title=f"{composition.reduced_formula}: rank 1, Rwp {best.rwp:.2%}")
    # the screened list in ranking order (refined first, by rank), each marked when it repeats an earlier one
    listed = list(ranked) + [r for r in screened if "rwp" not in r]
    def stored_cif(r: dict) -> str:
        return str(_candidate_file(store, r["z"], r["index"]).with_suffix(".cif").relative_to(out))

    cif_of = {id(r): f"rank{k:02d}.cif" if k <= len(ranked) else stored_cif(r) for k, r in enumerate(listed, start=1)}
    structures = [_read_cif(r["cif" if "rwp" in r else "screen_cif"]) for r in listed]  # refined, else fitted
    same = repeats(structures, [r["screen_residual"] for r in listed])
    same_as = {id(r): cif_of[id(listed[k])] for r, k in zip(listed, same) if k is not None}
    cautions = []
    rank_one = structures[0] if ranked else None
    for entry, other in zip(candidates[1:], structures[1:len(ranked)]):
        pair = species_swap(rank_one, other) if rank_one is not None and other is not None else None
        if pair is not None:
            cautions.append(f"{entry['cif']} (Rwp {entry['rwp']:.2%}) is rank 1 (Rwp {candidates[0]['rwp']:.2%}) "
                            f"with {pair[0]} and {pair[1]} swapped: X-rays barely tell them apart (neutron "
                            f"contrast, bond valences or chemistry decide)")
    summary = {
        "formula": composition.reduced_formula,
        "source": pattern.source,
        "trials": [{"z": t.z, "n_atoms": t.n_atoms, "probability": t.probability} for t in trials],
        "ranking": {"by": basis, "prior_price": price, "independent_observations": round(observations, 1),
                    "crystallite_size_A": round(size, 1), "coherence_length_A": round(coherence, 1),
                    "structure_fit": fit},
        "candidates": candidates,
        "cautions": cautions,
        "second_pass": second,
        "screened": [{"z": r["z"], "index": r["index"], "screen_residual": r["screen_residual"],
                      "screen_score": r["screen_score"], "refined": "rwp" in r, "origin": r.get("origin"),
                      "cif": stored_cif(r), "same_as": same_as.get(id(r))}
                     for r in screened],
        "failed": [{"z": r["z"], "index": r["index"], "reason": r["failed"]} for r in records if "failed" in r],
        "abandoned": [{"z": r["z"], "index": r["index"], **r["abandoned"]} for r in records if "abandoned" in r],
        "timing_s": round(time.perf_counter() - start, 2),
        "stage_timing_s": {stage: round(seconds, 2) for stage, seconds in stages.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if not ranked:
        raise XtalsolveError(f"no candidate could be refined (reasons in {out / 'summary.json'})", pattern.source)
    return summary
