"""Benchmark: speed and accuracy of the powder forward model against pymatgen, and training-pattern throughput.

    python benchmarks/forward_model.py [--n 256] [--threads 2]

Both codes run in the same process on the same MP-20 test structures (random, seed 0), structures already in
memory; pymatgen's XRDCalculator.get_pattern (sticks only) against xtalsolve.simulate_powder (full profile on a
2theta grid 5-90 deg, step 0.02; the compiled model, numba) and against the differentiable torch model
(powder_pattern, merged peaks, no gradients, batches of 32 of similar volume: what simulate_powder ran before
the compiled model). Writes benchmarks/results/forward_model.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="structures")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    from pymatgen.analysis.diffraction.xrd import XRDCalculator

    from xtalsolve.crystal import CrystalBatch
    from xtalsolve.data import evaluation_set, load_structures
    from xtalsolve.data.augment import training_patterns
    from xtalsolve.physics.powder import Instrument, bragg_peaks, cluster_peaks, make_grid, powder_pattern, simulate_powder

    def torch_model(structures, chunk=32):
        """The differentiable model in float32 without gradients, as simulate_powder ran it up to session 20."""
        grid_np, unit = make_grid((5, 90, 0.02))
        grid = torch.as_tensor(grid_np, dtype=torch.float32)
        order = np.argsort([s.volume for s in structures], kind="stable")
        out = np.empty((len(structures), len(grid_np)))
        with torch.no_grad():
            for start in range(0, len(structures), chunk):
                index = order[start : start + chunk]
                batch = CrystalBatch.from_structures([structures[i] for i in index], dtype=torch.float32)
                out[index] = powder_pattern(batch, grid, unit, Instrument(), merge=True).numpy()
        return out

    ids = evaluation_set("mp20").keys
    rng = np.random.default_rng(0)
    chosen = [ids[i][1] for i in rng.choice(len(ids), size=args.n, replace=False)]
    structures = load_structures("mp20_test", ids=chosen).structures
    load_before = os.getloadavg()[0]

    calculator = XRDCalculator()
    t_pymatgen = best_of(args.repeats, lambda: [calculator.get_pattern(s, two_theta_range=(5, 90)) for s in structures])
    simulate_powder(structures[:4], two_theta=(5, 90, 0.02))  # numba: load (or compile) the kernels first
    rows = {}
    t = best_of(args.repeats, lambda: torch_model(structures))
    rows["torch differentiable model, no size broadening"] = {"ms_per_structure": 1e3 * t / len(structures),
                                                              "speedup_vs_pymatgen": t_pymatgen / t}
    for label, size in (("bragg, no size broadening", None), ("bragg, D = 100 A", 100.0), ("bragg, D = 10 A", 10.0)):
        t = best_of(args.repeats, lambda: simulate_powder(structures, two_theta=(5, 90, 0.02), size=size))
        rows[label] = {"ms_per_structure": 1e3 * t / len(structures), "speedup_vs_pymatgen": t_pymatgen / t}

    # accuracy on the same structures: relative integrated intensities with pymatgen's own form-factor table
    worst = 0.0
    for s in structures[:100]:
        ref = calculator.get_pattern(s, scaled=False, two_theta_range=(0, 90))
        ours = bragg_peaks(s, form_factors="pymatgen")
        tt, ii = cluster_peaks([p["two_theta"] for p in ours], [p["intensity"] for p in ours])
        rt, ri = cluster_peaks(ref.x, ref.y)
        for x, y in zip(rt, ri / ri.max()):
            if y > 0.01:
                nearest = np.argmin(np.abs(tt - x))
                worst = max(worst, abs(ii[nearest] / ii.max() / y - 1))

    # training patterns per second (volume-sorted batches of 64, Q grid 0.5-8 1/A, 512 points, full augmentation)
    order = np.argsort([s.volume for s in structures])
    batches = [CrystalBatch.from_structures([structures[i] for i in order[k : k + 64]], dtype=torch.float32)
               for k in range(0, len(structures), 64)]
    gen = torch.Generator().manual_seed(0)
    t_train = best_of(args.repeats, lambda: [training_patterns(b, generator=gen) for b in batches])

    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": args.threads, "load_average_at_start": load_before,
                    "torch": torch.__version__},
        "n_structures": len(structures),
        "pymatgen_ms_per_structure": 1e3 * t_pymatgen / len(structures),
        "xtalsolve": rows,
        "max_relative_intensity_error_vs_pymatgen_same_table_peaks_over_1pct": worst,
        "training_patterns_per_s": len(structures) / t_train,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "forward_model.json").write_text(json.dumps(result, indent=2))
    print(f"{'model':58s} {'ms/structure':>13s} {'x pymatgen':>11s}")
    print(f"{'pymatgen XRDCalculator (sticks)':58s} {result['pymatgen_ms_per_structure']:13.3f} {1.0:11.1f}")
    for label, row in rows.items():
        print(f"{'xtalsolve ' + label:58s} {row['ms_per_structure']:13.3f} {row['speedup_vs_pymatgen']:11.1f}")
    print(f"max relative intensity error vs pymatgen (same table): {worst:.2e}")
    print(f"training patterns/s: {result['training_patterns_per_s']:.1f}   (load average at start {load_before:.1f})")


if __name__ == "__main__":
    main()
