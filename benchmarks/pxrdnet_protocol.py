"""Benchmark: the PXRDnet protocol (Guo et al., Nat. Mater. 2025) with the xtalsolve solver.

    python benchmarks/pxrdnet_protocol.py --checkpoint runs/full_gpu/best.pt [--n 200] [--size 10 100]
        [--set pxrdnet|mp20]
        [--candidates 10] [--arms prior conditioned guided symmetric guided+symmetric prototype prototype+guided
        prototype_then_guided] [--steps 200]

Materials: the first --n ids of ../shared/data/benchmarks/pxrdnet_test_ids.txt, structures as PXRDnet stored them.
Patterns simulated the way PXRDnet did (research/pxrd-anchors.md): Cu Kalpha, conventional standard cell, stick
intensities (pymatgen's form-factor table) binned on 4096 Q bins over 0-8.16 1/A, convolved with the size
broadening of a crystallite of size D (the squared Fourier transform of a box of length D,
D sinc^2(D Q / 2), sinc x = sin x / x, unit area), max-normalised, max-pooled to 512 points, Gaussian noise
sigma 1e-3 (the even-length kernel of numpy's "same" convolution puts every peak one 4,096-grid bin, +0.002 1/A,
high; kept as written, so that runs stay comparable). Formula and atom count given (PXRDnet fixed both). The
solver is told the broadening the patterns were made with (--crystallite-shape cube, the Laue function of a cube
edge; lorentzian is the solver's default for measured data) as a user tells it the instrument, and with
--max-pooled that the points are max-pooled by 8; Rietveld refinement always uses the Lorentzian. Arms: the
diffusion model unconditioned (prior),
conditioned on the pattern, conditioned and guided by it; random symmetric crystals alone (symmetric: no model);
half guided diffusion, half symmetric (guided+symmetric); structure types of the training pool with the elements
substituted, then symmetric crystals (prototype, `xtalsolve solve --second-pass-r-bragg 0`); the same with a
second pass from the guided model when the rank 1 refines to an R_Bragg above --second-pass-r-bragg
(prototype_then_guided, the default of `xtalsolve solve` since session 26); half library, half guided
diffusion (prototype+guided, `xtalsolve solve --generator prototype+diffusion`). The prototype library follows
the protocol (--library): for --set pxrdnet the "extended" one, the types of the PXRDnet protocol's training pool
(no benchmark id nor any listed duplicate); for --set mp20 and mp20_val the "mp20" one, from mp20_train alone
(the extended library holds mp20_val and most of mp20_test and is refused there). Each arm draws --candidates structures, refines
them against the pattern and ranks by Rwp priced for free parameters; match @1 / @k at both tolerance sets, RMSE, seconds per material.
Writes benchmarks/results/pxrdnet_protocol.json (resumable: finished materials are kept in a .jsonl beside it).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("prior", "conditioned", "guided", "symmetric", "guided+symmetric", "prototype", "prototype+guided",
        "prototype_then_guided")


def pxrdnet_pattern(structure, size_A: float, rng: np.random.Generator, wavelength: float = 1.54184):
    """(Q grid (512,), intensity (512,)) of ``structure`` as PXRDnet simulated it (see the module docstring)."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    from xtalsolve.physics.powder import bragg_peaks

    conventional = SpacegroupAnalyzer(structure).get_conventional_standard_structure()
    peaks = bragg_peaks(conventional, wavelength, (0.0, 180.0), form_factors="pymatgen")
    q_max = 4 * math.pi / wavelength
    edges = np.linspace(0.0, q_max, 4097)
    centres = 0.5 * (edges[1:] + edges[:-1])
    q_peaks = np.array([2 * math.pi / p["d"] for p in peaks])
    sticks, _ = np.histogram(q_peaks, bins=edges, weights=[p["intensity"] for p in peaks])
    offsets = centres - centres[len(centres) // 2]
    x = size_A * offsets / 2
    kernel = np.where(np.abs(x) < 1e-12, 1.0, np.sin(x) / np.where(np.abs(x) < 1e-12, 1.0, x)) ** 2
    kernel /= kernel.sum()
    y = np.convolve(sticks, kernel, mode="same")
    y /= y.max()
    pooled = y.reshape(512, 8).max(1)
    grid = centres.reshape(512, 8).mean(1)
    return grid, np.clip(pooled + rng.normal(0.0, 1e-3, 512), 0.0, None)


def readable(path: Path):
    """A ranked structure, or None when pymatgen cannot build it (e.g. two atoms refined onto one site)."""
    from pymatgen.core import Structure

    try:
        return Structure.from_file(path)
    except Exception:  # noqa: BLE001
        return None


def main() -> None:
    from xtalsolve.physics.powder import CRYSTALLITE_SHAPES
    from xtalsolve.prototypes import LIBRARIES
    from xtalsolve.solve import FILLS, FIT_STRUCTURE, RANK_BY, SolveSettings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--size", type=float, nargs="+", default=[10.0, 100.0])
    parser.add_argument("--candidates", type=int, default=10, help="ranked candidates scored (@k)")
    parser.add_argument("--samples", type=int, default=32, help="structures drawn per material")
    parser.add_argument("--first", type=int, default=0, help="skip the first ids (to split a run)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="suffix of the results files (separate runs)")
    parser.add_argument("--crystallite-shape", default="cube", choices=CRYSTALLITE_SHAPES,
                        help="size-broadening model of the solver's screening fit; default cube: the patterns "
                             "are made with D sinc^2(D Q / 2), the Laue function of a cube edge, and the "
                             "protocol states it as a user states the instrument's profile")
    parser.add_argument("--max-pooled", action="store_true",
                        help="tell the solver the patterns are max-pooled by 8 (Pattern.max_pool): the screening fit "
                             "then pools its calculated pattern alike on the pattern's own grid")
    parser.add_argument("--fit-nuisances", action="store_true",
                        help="the screening fit also tries an overall B and (max-pooled) a zero offset per candidate")
    parser.add_argument("--restarts", type=int, nargs=2, default=(SolveSettings.restart_top, SolveSettings.restarts),
                        metavar=("TOP", "N"), help="the TOP best screened candidates are fitted N more times from "
                        "other random starts (SolveSettings.restart_top / restarts; 0 0: none)")
    parser.add_argument("--refine-top", type=int, default=SolveSettings.refine_top,
                        help="distinct screened candidates refined by Rietveld and ranked (SolveSettings.refine_top)")
    parser.add_argument("--restart-within", type=float, default=SolveSettings.restart_within,
                        help="only candidates whose screen score is within this factor of the best are restarted")
    parser.add_argument("--scan", type=int, default=SolveSettings.scan_top,
                        help="best distinct screened candidates whose few free coordinates are searched "
                             "(SolveSettings.scan_top; 0: none)")
    parser.add_argument("--rank-by", default="auto", choices=RANK_BY)
    parser.add_argument("--fit-structure", default="auto", choices=FIT_STRUCTURE)
    parser.add_argument("--ids", type=Path, default=None,
                        help="a file of material ids (JSON list or one per line): solve only these of the set; "
                             "the others' patterns are still drawn, so each pattern's noise is that of a full run")
    parser.add_argument("--no-redecorate", action="store_true",
                        help="prototype arm without re-decorated frameworks (ablation)")
    parser.add_argument("--library", choices=tuple(LIBRARIES), default=None,
                        help="prototype library (default: the protocol's, extended for pxrdnet, mp20 otherwise)")
    parser.add_argument("--fill", choices=FILLS, default="symmetric",
                        help="prototype arm: candidates once the library runs out (diffusion and both use "
                             "--checkpoint, guided)")
    parser.add_argument("--second-pass-r-bragg", type=float, default=SolveSettings.second_pass_r_bragg,
                        help="prototype_then_guided arm: the guided model's second pass when the prototype run's "
                             "rank 1 refines to an R_Bragg above this (SolveSettings.second_pass_r_bragg)")
    parser.add_argument("--second-pass-samples", type=int, default=SolveSettings.second_pass_samples)
    parser.add_argument("--set", choices=("pxrdnet", "mp20", "mp20_val"), default="pxrdnet",
                        help="pxrdnet: the first --n benchmark ids; mp20: a random --n of mp20_test, seeded by "
                             "--seed (the MP-20 protocol; use --candidates 20 for @20), results mp20_protocol*; "
                             "mp20_val: the same from mp20_val, for tuning (results mp20_val_protocol*)")
    args = parser.parse_args()
    args.library = args.library or ("extended" if args.set == "pxrdnet" else "mp20")
    if args.set != "pxrdnet" and args.library != "mp20":
        parser.error(f"--set {args.set} must use --library mp20 (the {args.library} library holds its answers)")
    warnings.filterwarnings("ignore")

    from pymatgen.core import Structure

    from xtalsolve.data import evaluation_set, validation_set
    from xtalsolve.data.structures import Pool
    from xtalsolve.metrics import TOLERANCES, match
    from xtalsolve.pattern import Pattern
    from xtalsolve.solve import diffusion_generator, lazy_generator, make_generator, mixed_generator, solve
    from xtalsolve.prototypes import prototype_generator
    from xtalsolve.symmetric import symmetric_generator

    if args.set == "pxrdnet":
        pool = evaluation_set("pxrdnet", first=args.n)
    else:
        every = evaluation_set("mp20") if args.set == "mp20" else validation_set("mp20")
        pick = np.random.default_rng(args.seed).choice(len(every), size=min(args.n, len(every)), replace=False)
        pool = Pool("mp20", every.role, tuple(every.keys[i] for i in sorted(pick)))
    results_name = {"pxrdnet": "pxrdnet_protocol", "mp20": "mp20_protocol", "mp20_val": "mp20_val_protocol"}[args.set]
    tensors = pool.load()
    references = [tensors.structure(i) for i in range(len(tensors))]
    ids = [key[1] for key in pool.keys]
    ids, references = ids[args.first:], references[args.first:]
    RESULTS.mkdir(exist_ok=True)
    done_file = RESULTS / f"{results_name}{args.tag}.jsonl"
    done = {(r["id"], r["size_A"], r["arm"]) for r in map(json.loads, done_file.read_text().splitlines())} \
        if done_file.is_file() else set()
    only = None
    if args.ids is not None:
        text = args.ids.read_text()
        only = {str(i[0] if isinstance(i, list) else i) for i in json.loads(text)} if text.lstrip().startswith("[") \
            else set(text.split())
    rng = np.random.default_rng(args.seed)
    for size in args.size:
        for material, reference in zip(ids, references):
            grid, y = pxrdnet_pattern(reference, size, rng)
            pattern = Pattern(grid, y, np.full_like(y, 1e-3), "q", 1.54184, f"pxrdnet:{material}",
                              max_pool=8 if args.max_pooled else 1)
            for arm in args.arms:
                if (material, size, arm) in done or (only is not None and material not in only):
                    continue
                start = time.perf_counter()
                second = None
                if arm == "symmetric":
                    generate = symmetric_generator()
                elif arm == "prototype+guided":  # the solver's prototype+diffusion generator
                    generate = make_generator("prototype+diffusion", args.checkpoint, pattern, args.steps,
                                              size_hint_A=size, library=args.library, fill=args.fill)
                elif arm in ("prototype", "prototype_then_guided"):
                    if arm == "prototype_then_guided":  # as xtalsolve solve: the guided model when nothing fits
                        second = lazy_generator(lambda: diffusion_generator(args.checkpoint, pattern, args.steps,
                                                                            size_hint_A=size))
                    fill = None if args.fill == "symmetric" else make_generator(
                        args.fill, args.checkpoint, pattern, args.steps, size_hint_A=size)
                    generate = prototype_generator(fill=fill, library_name=args.library,
                                                   redecorate=not args.no_redecorate)
                else:
                    generate = diffusion_generator(args.checkpoint, pattern, args.steps, guided="guided" in arm,
                                                   cfg_scale=0.0 if arm == "prior" else 1.0, size_hint_A=size)
                    if arm == "guided+symmetric":
                        generate = mixed_generator([(generate, 0.5), (symmetric_generator(), 0.5)])
                out = RESULTS / f"{args.set}_runs{args.tag}" / f"{material}_D{size:g}_{arm}"
                settings = SolveSettings(samples=args.samples, natoms=len(reference), seed=args.seed,
                                         size_hint_A=size, crystallite_shape=args.crystallite_shape,
                                         rank_by=args.rank_by, fit_structure=args.fit_structure,
                                         fit_nuisances=args.fit_nuisances, restart_top=args.restarts[0],
                                         restarts=args.restarts[1], restart_within=args.restart_within,
                                         refine_top=args.refine_top, scan_top=args.scan,
                                         second_pass_r_bragg=args.second_pass_r_bragg,
                                         second_pass_samples=args.second_pass_samples)
                try:
                    summary = solve(pattern, reference.composition.reduced_formula, generate, out, settings,
                                    second_pass=second)
                    # refined candidates by priced Rwp, then the other fitted ones by their priced fit residual,
                    # each crystal once (the solver marks a candidate that repeats an earlier one)
                    ranked = [readable(out / c["cif"]) for c in summary["candidates"]]
                    ranked += [readable(out / c["cif"]) for c in summary["screened"]
                               if not c["refined"] and not c.get("same_as")]
                    ranked = [s for s in ranked if s is not None]  # atoms refined onto each other: a miss
                    ranked = ranked[: args.candidates]
                except Exception as err:  # noqa: BLE001 - a failed material is a miss, recorded with its reason
                    ranked, summary = [], {"error": str(err)}
                record = {"id": material, "size_A": size, "arm": arm, "seconds": time.perf_counter() - start}
                if summary.get("candidates"):  # what ranked first, and from which generator
                    first_place = summary["candidates"][0]
                    record |= {"rank1_rwp": first_place["rwp"], "rank1_gof": first_place["gof"],
                               "rank1_r_bragg": first_place.get("r_bragg"), "rank1_origin": first_place.get("origin"),
                               "second_pass": summary.get("second_pass", {}).get("triggered")}
                for name in TOLERANCES:
                    results = [match(c, reference, name) for c in ranked]
                    record[f"{name}@1"] = bool(results and results[0].matched)
                    record[f"{name}@k"] = any(r.matched for r in results)
                    rms = [r.rms for r in results if r.matched]
                    record[f"{name}_rms"] = min(rms) if rms else None
                with done_file.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                print(record, flush=True)

    records = [json.loads(line) for line in done_file.read_text().splitlines()]
    table = {}  # every (size, arm) in the results file, also those of earlier invocations
    for size, arm in sorted({(r["size_A"], r["arm"]) for r in records}, key=lambda k: (-k[0], ARMS.index(k[1]))):
        rows = [r for r in records if r["size_A"] == size and r["arm"] == arm]
        entry = {"n": len(rows), "seconds_per_material": float(np.mean([r["seconds"] for r in rows]))}
        for name in TOLERANCES:
            entry[f"{name}@1"] = float(np.mean([r[f"{name}@1"] for r in rows]))
            entry[f"{name}@{args.candidates}"] = float(np.mean([r[f"{name}@k"] for r in rows]))
            rms = [r[f"{name}_rms"] for r in rows if r[f"{name}_rms"] is not None]
            entry[f"{name}_rmse"] = float(np.mean(rms)) if rms else None
        if arm == "prototype_then_guided":
            entry["second_pass_share"] = float(np.mean([bool(r.get("second_pass")) for r in rows]))
        table[f"D={size:g}A/{arm}"] = entry
    (RESULTS / f"{results_name}{args.tag}.json").write_text(json.dumps(
        {"set": args.set, "checkpoint": str(args.checkpoint), "samples": args.samples, "candidates": args.candidates,
         "steps": args.steps, "crystallite_shape": args.crystallite_shape, "rank_by": args.rank_by,
         "fit_structure": args.fit_structure, "max_pooled": args.max_pooled, "fit_nuisances": args.fit_nuisances,
         "restarts": list(args.restarts), "restart_within": args.restart_within, "refine_top": args.refine_top,
         "scan_top": args.scan, "second_pass_r_bragg": args.second_pass_r_bragg,
         "second_pass_samples": args.second_pass_samples,
         "library": args.library, "redecorate": not args.no_redecorate,
         "ids": sorted(only) if only is not None else None, "table": table},
        indent=2))
    for key, entry in table.items():
        print(key, entry)


if __name__ == "__main__":
    main()
